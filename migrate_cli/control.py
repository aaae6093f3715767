"""Live control without a monitor protocol: a unix socket (mode 0600) speaking JSON lines.

Requests are one JSON object a line: ``{"command": "status"}``, ``{"command": "set", "name": "max-bandwidth",
"value": "200M"}``, ``{"command": "cancel"}``. Replies are one line: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. The server runs handlers supplied by `send`/`recv`; ``request`` is the client
that `vmmig ctl` uses.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
from collections.abc import Callable
from typing import Any

from .errors import MigrateError, UsageError

Handler = Callable[[dict[str, Any]], Any]
MAX_REQUEST = 4096


class ControlError(UsageError):
    """A control request failed or could not be delivered; `vmmig ctl` exits with the usage code."""


class ControlServer:
    def __init__(self, path: str, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._prepare_path()
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is created 0600: only its owner may steer the migration
        try:
            self.sock.bind(path)
        except OSError as exc:
            self.sock.close()
            raise UsageError(f"--control {path}: cannot create the socket: {exc.strerror}") from None
        finally:
            os.umask(old_umask)
        self.sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def _prepare_path(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise UsageError(f"--control {self.path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except OSError:
            os.unlink(self.path)  # a stale socket from a process that is gone
            return
        finally:
            probe.close()
        raise UsageError(f"--control {self.path}: another vmmig is listening there")

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._client, args=(conn,), name="control-client", daemon=True).start()

    def _client(self, conn: socket.socket) -> None:
        conn.settimeout(10)
        with conn, conn.makefile("rwb") as fh:
            while line := fh.readline(MAX_REQUEST):
                fh.write(json.dumps(self._handle(line)).encode() + b"\n")
                fh.flush()

    def _handle(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            command = request.get("command") if isinstance(request, dict) else None
            handler = self.handlers.get(str(command))
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                return {"ok": False, "error": f"unknown command {command!r} (this end knows: {known})"}
            return {"ok": True, "result": handler(request)}
        except (ValueError, MigrateError) as exc:
            return {"ok": False, "error": str(exc)}

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def request(path: str, message: dict[str, Any], timeout: float = 5.0) -> Any:
    """Send one request to a control socket and return its result; raise ControlError on failure."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        raise ControlError(f"cannot reach {path}: {exc.strerror or exc} (is a vmmig with --control running?)") from None
    try:
        with sock, sock.makefile("rwb") as fh:
            fh.write(json.dumps(message).encode() + b"\n")
            fh.flush()
            line = fh.readline()
    except OSError as exc:
        raise ControlError(f"{path}: {exc}") from None
    if not line:
        raise ControlError(f"{path}: the migration closed the connection (it may have just finished)")
    reply = json.loads(line)
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply.get("result")
