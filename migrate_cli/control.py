"""Live control without a monitor protocol: a unix socket (mode 0600) speaking JSON lines.

Requests are one JSON object a line: ``{"command": "status"}``, ``{"command": "set", "name": "max-bandwidth",
"value": "200M"}``, ``{"command": "cancel"}``. Replies are one line: ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. The server runs handlers supplied by `send`/`recv`; ``request`` is the client
that `vmmig ctl` uses. Whatever a client does (a request a handler fails on, silence past IDLE_TIMEOUT, hanging up
mid-reply), it gets a one-line error reply or a closed connection, and the migration's stderr stays clean.
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

from .errors import ControlError, MigrateError, UsageError

Handler = Callable[[dict[str, Any]], Any]
MAX_REQUEST = 4096
IDLE_TIMEOUT = 10.0  # seconds a client may stay silent before the server closes its connection


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
        conn.settimeout(IDLE_TIMEOUT)
        try:
            with conn, conn.makefile("rwb") as fh:
                self._converse(fh)
        except OSError:
            pass  # the client went away mid-reply: nothing to tell anyone

    def _converse(self, fh: Any) -> None:
        try:
            while line := fh.readline(MAX_REQUEST):
                if not line.endswith(b"\n") and len(line) == MAX_REQUEST:
                    self._reply(fh, _error(f"request longer than {MAX_REQUEST} bytes"))
                    return
                self._reply(fh, self._handle(line))
        except TimeoutError:  # a silent client must not hold a thread, nor print anything on the migration's stderr
            self._reply(fh, _error(f"no request for {IDLE_TIMEOUT:g}s: closing"))

    @staticmethod
    def _reply(fh: Any, reply: dict[str, Any]) -> None:
        try:
            data = json.dumps(reply)
        except (TypeError, ValueError) as exc:  # a handler's result that JSON cannot carry: a bug, said in one line
            data = json.dumps(_error(f"cannot encode the reply: {exc}"))
        fh.write(data.encode() + b"\n")
        fh.flush()

    def _handle(self, line: bytes) -> dict[str, Any]:
        command: object = None
        try:
            request = json.loads(line)
            command = request.get("command") if isinstance(request, dict) else None
            handler = self.handlers.get(str(command))
            if handler is None:
                known = ", ".join(sorted(self.handlers))
                return _error(f"unknown command {command!r} (this end knows: {known})")
            return {"ok": True, "result": handler(request)}
        except (ValueError, MigrateError) as exc:
            return _error(str(exc))
        except Exception as exc:  # any other failure of a handler is this request's error, never a dead connection
            return _error(f"{command} failed: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def _error(message: str) -> dict[str, Any]:
    """An error reply: one line, whatever the message held."""
    return {"ok": False, "error": " ".join(message.split()) or "failed"}


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
    try:
        reply = json.loads(line)
    except ValueError:
        reply = None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: not a vmmig control reply: {line[:80]!r}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error")))
    return reply.get("result")
