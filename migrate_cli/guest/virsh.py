"""One long-lived ``virsh`` shell per libvirt connection, fed commands on its standard input.

libvirt's Python binding ships no wheels (it needs a compiler), and a ``virsh`` process per QMP command would cost
a process start and a new libvirt connection each time (tens of milliseconds, inside the downtime). So vmmig keeps
one ``virsh`` running and writes commands to it: after each command an ``echo`` of a marker nobody else can
produce tells where its output ends. virsh echoes its prompt and the command (it runs readline even on a pipe);
those lines are dropped. Its errors (``error: …`` on standard error) share the pipe, so they arrive in order.
"""

from __future__ import annotations

import os
import secrets
import select
import subprocess
import threading
import time
from urllib.parse import urlsplit

from ..errors import QemuError, UsageError

PROMPT = "virsh # "
LOCAL_TRANSPORTS = ("", "unix")


def quote(arg: str) -> str:
    """``arg`` as one word of virsh's shell: double quotes, with backslash before backslash and double quote."""
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def check_local_uri(uri: str) -> None:
    """vmmig maps the guest's RAM on this host: a libvirt URI naming another host (or a remote transport) is
    refused, as is a driver other than QEMU's."""
    parts = urlsplit(uri)
    driver, _, transport = parts.scheme.partition("+")
    if transport not in LOCAL_TRANSPORTS or parts.hostname:
        raise UsageError(
            f"--libvirt-uri {uri} is remote: vmmig maps the guest's RAM on this host; run vmmig on the guest's host "
            "with a local URI (qemu:///system or qemu:///session)"
        )
    if driver != "qemu":
        raise UsageError(f"--libvirt-uri {uri}: vmmig moves QEMU guests (qemu:///system or qemu:///session)")


class Virsh:
    """A running ``virsh`` connected to ``uri`` (None: libvirt's default, LIBVIRT_DEFAULT_URI included)."""

    def __init__(self, uri: str | None, timeout: float = 30.0) -> None:
        if uri is not None:
            check_local_uri(uri)
        self.timeout = timeout
        self._lock = threading.Lock()  # one command and its output at a time, whichever thread asks
        self._buffer = b""
        self._count = 0
        self._nonce = secrets.token_hex(6)
        env = {**os.environ, "TERM": "dumb", "LC_ALL": "C"}  # no terminal escapes, messages in English
        argv = ["virsh", "-q"] + (["-c", uri] if uri is not None else [])
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, bufsize=0
            )
        except FileNotFoundError:
            raise QemuError("libvirt: virsh is not installed (Debian: apt-get install libvirt-clients)") from None
        try:
            self.uri = self.run("uri").strip()  # the one virsh actually connected to: the default is checked too
            if not self.uri:
                raise QemuError("libvirt: virsh could not connect" + (f" to {uri}" if uri else ""))
            check_local_uri(self.uri)
        except BaseException:
            self.close()
            raise

    def run(self, *words: str) -> str:
        """Run one virsh command; its output without the echoed prompt. ``error: …`` from virsh raises QemuError."""
        with self._lock:
            self._count += 1
            marker = f"@@vmmig-{self._nonce}-{self._count}@@".encode()
            line = " ".join(words[:1] + tuple(quote(word) for word in words[1:]))
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.write(line.encode() + b"\necho " + marker + b"\n")
            except OSError:
                raise QemuError(f"libvirt: virsh exited ({self._proc.poll()}): {words[0]} not run") from None
            raw = self._read_until(b"\n" + marker, words[0])
        lines = [each for each in raw.decode(errors="replace").splitlines() if not each.startswith(PROMPT.strip())]
        errors = [each[len("error: ") :] for each in lines if each.startswith("error: ")]
        if errors:
            raise QemuError(f"libvirt: {words[0]}: {'; '.join(errors)}")
        return "\n".join(lines)

    def _read_until(self, marker: bytes, what: str) -> bytes:
        assert self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        while marker not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._proc.kill()  # its late answer would be read as the next command's: no next command
                raise QemuError(f"libvirt: virsh {what} did not answer within {self.timeout:g}s")
            chunk = os.read(fd, 65536)
            if not chunk:
                raise QemuError(f"libvirt: virsh exited ({self._proc.wait()}) during {what}")
            self._buffer += chunk
        raw, _, self._buffer = self._buffer.partition(marker)
        return raw

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                assert self._proc.stdin is not None
                self._proc.stdin.close()  # end of input: virsh quits
                self._proc.wait(5)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()
