#!/usr/bin/env python3
"""Start the test guest built by ``build_guest.sh`` under QEMU (TCG) with file-backed shared RAM, and talk to it.

Library (import this file, e.g. with ``importlib.util.spec_from_file_location``, or put ``examples/qemu`` on
``sys.path``)::

    g = start_guest(workdir, "/dev/shm/src.ram", role="source", write_mb=0)
    wait_for_line(g.serial_log, r"^HEARTBEAT 3 ", timeout=120, proc=g)  # returns the re.Match
    with Qmp(g.qmp_path) as q:
        q.execute("stop")
        print(q.execute("query-status"))
    print(heartbeats(g.serial_log))
    g.kill()

Both roles use the same QEMU command line (see ``qemu_command``); the destination adds ``-S -incoming defer``::

    qemu-system-x86_64 -accel tcg -machine pc,memory-backend=mem -m 256M
        -object memory-backend-file,id=mem,size=256M,mem-path=RAMFILE,share=on
        -kernel vmlinuz -initrd initrd.gz -append "console=ttyS0,115200 panic=-1 vmmig_write_mb=N"
        -nographic -nodefaults -chardev file,id=ser,path=WORKDIR/ROLE.serial.log -serial chardev:ser
        -qmp unix:WORKDIR/ROLE.qmp.sock,server=on,wait=off [-S -incoming defer]

The guest's RAM is entirely in RAMFILE (put it on /dev/shm), so with the ``x-ignore-shared`` migration capability
QEMU only transfers device state, and the RAM can be moved by another tool (vmmig).

The serial console goes to a plain file that the guest appends to; ``wait_for_line`` and ``heartbeats`` read it.

CLI::

    run_guest.py start --workdir DIR --ram /dev/shm/src.ram [--role source|dest] [--write-mb N] [--wait-heartbeat N]
    run_guest.py qmp SOCKET COMMAND ['{"json": "arguments"}']
    run_guest.py heartbeats SERIAL_LOG

``start`` prints one JSON object (pid, qmp_path, serial_log, ram_path, boot_seconds) and leaves QEMU running in its
own session; stop it with ``run_guest.py qmp SOCKET quit`` or ``kill PID``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BUILD_DIR = Path(os.environ.get("VMMIG_GUEST_DIR", HERE / "build"))
QEMU = os.environ.get("VMMIG_QEMU", "qemu-system-x86_64")
DEFAULT_MEM_MB = 256
DEFAULT_APPEND = "console=ttyS0,115200 panic=-1"

HEARTBEAT_RE = re.compile(r"^HEARTBEAT (\d+) ([\d.]+)\s*$")
DATA_RE = re.compile(r"^DATA (OK|BAD) (\d+)")


def kernel_paths(build_dir: Path | str | None = None) -> tuple[Path, Path]:
    """vmlinuz and initrd.gz made by build_guest.sh; raises FileNotFoundError with a hint if they are missing."""
    d = Path(build_dir) if build_dir is not None else BUILD_DIR
    kernel, initrd = d / "vmlinuz", d / "initrd.gz"
    for p in (kernel, initrd):
        if not p.is_file():
            raise FileNotFoundError(f"{p} is missing: run {HERE / 'build_guest.sh'} {d}")
    return kernel, initrd


def qemu_command(
    *,
    ram_path: Path | str,
    qmp_path: Path | str,
    serial_log: Path | str,
    role: str = "source",
    write_mb: int = 0,
    mem_mb: int = DEFAULT_MEM_MB,
    kernel: Path | str | None = None,
    initrd: Path | str | None = None,
    extra_append: str = "",
) -> list[str]:
    """The QEMU argv. Identical for both roles except the paths and, for ``dest``, ``-S -incoming defer``."""
    if role not in ("source", "dest"):
        raise ValueError(f"role must be 'source' or 'dest', not {role!r}")
    if kernel is None or initrd is None:
        k, i = kernel_paths()
        kernel = kernel if kernel is not None else k
        initrd = initrd if initrd is not None else i
    append = " ".join(a for a in (DEFAULT_APPEND, f"vmmig_write_mb={write_mb}" if write_mb else "", extra_append) if a)
    cmd = [
        QEMU,
        "-accel", "tcg",
        "-machine", "pc,memory-backend=mem",
        "-m", f"{mem_mb}M",
        "-object", f"memory-backend-file,id=mem,size={mem_mb}M,mem-path={ram_path},share=on",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", append,
        "-nographic",
        "-nodefaults",
        "-chardev", f"file,id=ser,path={serial_log}",
        "-serial", "chardev:ser",
        "-qmp", f"unix:{qmp_path},server=on,wait=off",
    ]  # fmt: skip
    if role == "dest":
        cmd += ["-S", "-incoming", "defer"]
    return cmd


@dataclass
class GuestProcess:
    """A running QEMU. ``kill()`` is idempotent; the RAM file is left in place (the caller owns it)."""

    popen: subprocess.Popen[bytes]
    role: str
    workdir: Path
    ram_path: Path
    qmp_path: Path
    serial_log: Path
    stderr_log: Path
    command: list[str]
    started: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int | None:
        """Send ``sig`` (SIGKILL by default) to this QEMU and reap it; returns its exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        return self.popen.poll()

    def stderr_text(self) -> str:
        try:
            return self.stderr_log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def qmp(self, timeout: float = 10.0) -> Qmp:
        """A connected QMP client (waits for the socket to appear)."""
        deadline = time.monotonic() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{self.role} QEMU exited with {self.popen.returncode}: {self.stderr_text()}")
            try:
                return Qmp(self.qmp_path, timeout=timeout)
            except (FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def __enter__(self) -> GuestProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()


def start_guest(
    workdir: Path | str,
    ram_path: Path | str,
    role: str = "source",
    write_mb: int = 0,
    *,
    name: str | None = None,
    new_session: bool = False,
    **qemu: Any,
) -> GuestProcess:
    """Start QEMU as ``role`` ('source' boots at once; 'dest' waits with ``-S -incoming defer``); ``qemu`` passes
    qemu_command's other options (mem_mb, kernel, initrd, extra_append).

    Files in ``workdir``: NAME.qmp.sock, NAME.serial.log, NAME.stderr.log (NAME defaults to ``role``); any old ones
    are removed first. ``ram_path`` is created by QEMU if it does not exist; an existing file of the right size is
    mapped as it is (its contents become the guest's RAM on the destination).
    """
    if shutil.which(QEMU) is None:
        raise FileNotFoundError(f"{QEMU} not found: run {HERE / 'build_guest.sh'} (it installs qemu-system-x86)")
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    name = name or role
    qmp_path = workdir / f"{name}.qmp.sock"
    serial_log = workdir / f"{name}.serial.log"
    stderr_log = workdir / f"{name}.stderr.log"
    for p in (qmp_path, serial_log, stderr_log):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
    serial_log.touch()  # so readers can open it before QEMU does
    cmd = qemu_command(
        ram_path=ram_path, qmp_path=qmp_path, serial_log=serial_log, role=role, write_mb=write_mb, **qemu
    )
    with open(stderr_log, "wb") as err:
        popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, start_new_session=new_session)
    return GuestProcess(popen, role, workdir, Path(ram_path), qmp_path, serial_log, stderr_log, cmd)


class QmpError(RuntimeError):
    def __init__(self, command: str, error: dict[str, Any]) -> None:
        super().__init__(f"QMP {command}: {error.get('class')}: {error.get('desc')}")
        self.error = error


class Qmp:
    """Minimal synchronous QMP client: ``Qmp(path).execute("query-status")`` returns the ``return`` value.

    Asynchronous ``event`` lines are skipped (kept in ``self.events``); errors raise ``QmpError``.
    """

    def __init__(self, path: Path | str, timeout: float = 30.0) -> None:
        self.path = str(path)
        self.events: list[dict[str, Any]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(self.path)
            self._file = self._sock.makefile("rwb")
            self.greeting = self._read()
            if "QMP" not in self.greeting:
                raise RuntimeError(f"{self.path}: not a QMP greeting: {self.greeting}")
            self.execute("qmp_capabilities")
        except BaseException:
            self._sock.close()
            raise

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise ConnectionError(f"{self.path}: QMP connection closed")
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments  # hyphenated keys: execute("x", **{"downtime-limit": 300})
        self._file.write(json.dumps(msg).encode() + b"\r\n")
        self._file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QmpError(command, reply["error"])
            return reply.get("return")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
        self._sock.close()

    def __enter__(self) -> Qmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_lines(log: Path | str) -> list[str]:
    """Complete lines of a serial log (CR stripped; a trailing line without newline is left out)."""
    data = Path(log).read_bytes().decode("utf-8", errors="replace")
    lines = data.split("\n")
    return [line.rstrip("\r") for line in lines[:-1]]


def partial_tail(log: Path | str) -> str:
    """Text after the last newline of the log (a line the guest was still writing), CR stripped."""
    data = Path(log).read_bytes().decode("utf-8", errors="replace")
    return data.rsplit("\n", 1)[-1].strip("\r")


def wait_for_line(
    log: Path | str, regex: str | re.Pattern[str], timeout: float, proc: GuestProcess | None = None
) -> re.Match[str]:
    """Wait until a complete line of ``log`` matches ``regex`` (re.search); return the match.

    Raises TimeoutError (with the log's tail) after ``timeout`` seconds, or RuntimeError if ``proc`` exits.
    """
    pattern = re.compile(regex) if isinstance(regex, str) else regex
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(FileNotFoundError):
            for line in read_lines(log):
                m = pattern.search(line)
                if m:
                    return m
        if proc is not None and not proc.alive():
            raise RuntimeError(f"{proc.role} QEMU exited with {proc.popen.returncode}: {proc.stderr_text()}")
        if time.monotonic() > deadline:
            tail = "\n".join(read_lines(log)[-10:]) if Path(log).exists() else "(no log)"
            raise TimeoutError(f"no line matching {pattern.pattern!r} in {log} after {timeout}s; tail:\n{tail}")
        time.sleep(0.1)


def heartbeats(log: Path | str) -> list[int]:
    """The n of every complete ``HEARTBEAT n uptime`` line, in order."""
    return [int(m.group(1)) for line in read_lines(log) if (m := HEARTBEAT_RE.match(line))]


def heartbeat_times(log: Path | str) -> list[tuple[int, float]]:
    """(n, guest uptime in seconds) of every complete heartbeat line, in order."""
    return [(int(m.group(1)), float(m.group(2))) for line in read_lines(log) if (m := HEARTBEAT_RE.match(line))]


def continued(
    source_log: Path, dest_log: Path, combined: Path, dest_gone: Callable[[], str | None], timeout: float = 60.0
) -> tuple[bool, str]:
    """Did the guest continue on the destination: consecutive heartbeats past the source's last, then DATA OK and
    no DATA BAD? Waits up to ``timeout``; ``dest_gone()`` returns why the destination stopped, or None. Returns
    the verdict and a line saying what was seen. ``combined`` is a scratch file: a line the guest was printing at
    the pause is split between the two logs, so they are read as one stream."""
    src_beats = heartbeats(source_log)
    last = src_beats[-1] if src_beats else 0
    deadline = time.monotonic() + timeout
    while True:
        combined.write_bytes(Path(source_log).read_bytes() + Path(dest_log).read_bytes())
        beats = heartbeats(combined)
        checks = [(kind, n) for kind, n in data_checks(dest_log) if n > last]
        ok_after = [n for kind, n in checks if kind == "OK"]
        bad = [n for kind, n in checks if kind == "BAD"]
        new = [n for n in beats if n > last]
        if bad or (new and ok_after):
            break
        if (why := dest_gone()) is not None:
            return False, why
        if time.monotonic() > deadline:
            return False, f"source last {last}, destination beats {new[:5]}, no DATA OK after {last}"
        time.sleep(0.2)
    consecutive = beats == list(range(1, len(beats) + 1))
    first = new[0] if new else None
    detail = (
        f"source last {last}, destination first {first}, DATA OK {ok_after[0] if ok_after else None}"
        + (f", DATA BAD {bad}" if bad else "")
        + ("" if consecutive else f", not consecutive: {beats[-12:]}")
    )
    return bool(consecutive and first == last + 1 and not bad and ok_after), detail


def data_checks(log: Path | str) -> list[tuple[str, int]]:
    """Every ``DATA OK n`` / ``DATA BAD n`` line as ("OK"|"BAD", n), in order."""
    return [(m.group(1), int(m.group(2))) for line in read_lines(log) if (m := DATA_RE.match(line))]


def _cli(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = ap.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("start", help="start a source or destination QEMU and leave it running")
    st.add_argument("--workdir", required=True, type=Path)
    st.add_argument("--ram", required=True, type=Path, help="RAM file, e.g. /dev/shm/src.ram")
    st.add_argument("--role", choices=("source", "dest"), default="source")
    st.add_argument("--write-mb", type=int, default=0, help="guest rewrites this many MiB per second")
    st.add_argument("--mem-mb", type=int, default=DEFAULT_MEM_MB)
    st.add_argument("--name", help="file name prefix in WORKDIR (default: the role)")
    st.add_argument("--wait-heartbeat", type=int, default=3, help="source: wait for HEARTBEAT N (0: do not wait)")
    st.add_argument("--timeout", type=float, default=180.0)
    q = sub.add_parser("qmp", help="run one QMP command and print its JSON result")
    q.add_argument("socket", type=Path)
    q.add_argument("command")
    q.add_argument("arguments", nargs="?", default="{}", help="JSON object")
    hb = sub.add_parser("heartbeats", help="print the heartbeat numbers and data checks of a serial log")
    hb.add_argument("log", type=Path)
    args = ap.parse_args(argv)

    if args.cmd == "start":
        g = start_guest(
            args.workdir, args.ram, args.role, args.write_mb, mem_mb=args.mem_mb, name=args.name, new_session=True
        )
        info: dict[str, Any] = {
            "pid": g.pid,
            "role": g.role,
            "qmp_path": str(g.qmp_path),
            "serial_log": str(g.serial_log),
            "ram_path": str(g.ram_path),
            "command": g.command,
        }
        try:
            g.qmp().close()  # the socket exists: QEMU is up
            if args.role == "source" and args.wait_heartbeat > 0:
                wait_for_line(g.serial_log, rf"^HEARTBEAT {args.wait_heartbeat} ", args.timeout, proc=g)
                info["boot_seconds"] = round(time.monotonic() - g.started, 2)
        except BaseException:
            g.kill()
            raise
        print(json.dumps(info, indent=2))
        return 0
    if args.cmd == "qmp":
        with Qmp(args.socket) as qmp:
            print(json.dumps(qmp.execute(args.command, **json.loads(args.arguments)), indent=2))
        return 0
    hbs = heartbeats(args.log)
    checks = data_checks(args.log)
    print(json.dumps({"heartbeats": hbs, "data_checks": checks}))
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
