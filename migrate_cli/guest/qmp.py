"""A minimal QMP client: QEMU's JSON monitor over a unix socket, one command at a time (stdlib only).

One command at a time across threads too: the pre-copy pauses QEMU over the connection the auto-converge throttle
asks for vCPU threads on, and `vmmig ctl set auto-converge on` starts that throttle from the control thread."""

from __future__ import annotations

import json
import socket
import threading
from typing import Any, Protocol

from ..errors import QemuError


class QmpChannel(Protocol):
    """What QEMU mode needs of a monitor: this socket client, or libvirt's passthrough (libvirt.LibvirtQmp)."""

    path: str

    def execute(self, command: str, **arguments: Any) -> Any: ...

    def status(self) -> str: ...


class Qmp:
    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self._lock = threading.Lock()  # a command and its reply are never interleaved with another thread's
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(path)
        except OSError as exc:
            self._sock.close()
            raise QemuError(f"QMP {path}: cannot connect: {exc.strerror or exc}") from None
        self._file = self._sock.makefile("rwb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise QemuError(f"QMP {path}: not a QMP monitor (greeting {greeting!r})")
        self.execute("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        try:
            line = self._file.readline()
        except OSError as exc:
            raise QemuError(f"QMP {self.path}: {exc}") from None
        if not line:
            raise QemuError(f"QMP {self.path}: QEMU closed the monitor (did it exit?)")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def execute(self, command: str, **arguments: Any) -> Any:
        with self._lock:
            return self._execute(command, arguments)

    def _execute(self, command: str, arguments: dict[str, Any]) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        try:
            self._file.write(json.dumps(message).encode() + b"\n")
            self._file.flush()
        except OSError as exc:
            raise QemuError(f"QMP {self.path}: {command}: {exc}") from None
        return self._reply(command)

    def _reply(self, command: str) -> Any:
        while True:
            reply = self._read()
            if "event" in reply:
                continue  # asynchronous events (STOP, RESUME, MIGRATION) interleave with replies
            if "error" in reply:
                desc = reply["error"].get("desc", reply["error"])
                raise QemuError(f"QMP {command} failed: {desc}")
            return reply.get("return")

    def send_fd(self, name: str, fd: int) -> None:
        """Hand QEMU a file descriptor under ``name`` (``getfd``, the fd in SCM_RIGHTS): a migration URI
        ``fd:NAME`` then uses it, with no path anyone else could open."""
        message = json.dumps({"execute": "getfd", "arguments": {"fdname": name}}).encode() + b"\n"
        with self._lock:
            try:
                self._file.flush()
                socket.send_fds(self._sock, [message], [fd])
            except OSError as exc:
                raise QemuError(f"QMP {self.path}: getfd: {exc}") from None
            self._reply("getfd")

    def status(self) -> str:
        return str(self.execute("query-status").get("status"))

    def close(self) -> None:
        try:
            self._file.close()
        finally:
            self._sock.close()
