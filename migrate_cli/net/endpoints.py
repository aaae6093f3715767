"""Where a migration goes, by scheme (QEMU's names): ``HOST:PORT``, ``unix:PATH`` or ``exec:COMMAND`` for the
sender; ``HOST:PORT`` or ``unix:PATH`` for the receiver's --listen. Unix sockets: connect with retries, and a
listener created 0600 whose file is removed when it closes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import time
from dataclasses import dataclass

from ..errors import NetworkError, UsageError
from .transport import format_address, listen, parse_address

TCP, UNIX, EXEC = "tcp", "unix", "exec"


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # TCP, UNIX or EXEC
    host: str = ""
    port: int = 0
    target: str = ""  # unix: the socket's path; exec: the shell command

    def __str__(self) -> str:
        return format_address(self.host, self.port) if self.scheme == TCP else f"{self.scheme}:{self.target}"


def parse_endpoint(text: str, exec_ok: bool = True) -> Endpoint:
    """``unix:PATH``, ``exec:COMMAND`` (only where ``exec_ok``) or ``HOST:PORT`` (parse_address)."""
    scheme, colon, rest = text.partition(":")
    if colon and scheme in (UNIX, EXEC):
        if scheme == EXEC and not exec_ok:
            raise UsageError(f"address {text!r}: exec: is for send's destination; listen on HOST:PORT or unix:PATH")
        if not rest.strip():
            raise UsageError(f"address {text!r}: {scheme}: needs a {'path' if scheme == UNIX else 'command'}")
        return Endpoint(scheme, target=rest)
    host, port = parse_address(text)
    return Endpoint(TCP, host=host, port=port)


def connect_unix(path: str, timeout: float) -> socket.socket:
    """Connect to a unix socket, retrying while it does not exist or refuses (the receiver may start later)."""
    deadline = time.monotonic() + timeout
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(max(0.1, min(5.0, deadline - time.monotonic())))
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            if time.monotonic() >= deadline:
                why = "no such socket" if isinstance(exc, FileNotFoundError) else "connection refused"
                raise NetworkError(
                    f"cannot connect to unix:{path}: {why} (gave up after {timeout:g}s, --connect-timeout)"
                ) from None
            time.sleep(0.1)
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot connect to unix:{path}: {exc.strerror or exc}") from None


class UnixListener(socket.socket):
    """A listening unix socket whose file is removed when it is closed (if it is still ours)."""

    path = ""
    inode = 0

    def close(self) -> None:
        if self.path:
            path, self.path = self.path, ""
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == self.inode:
                    os.unlink(path)
        super().close()


def listen_unix(path: str) -> UnixListener:
    """Listen at ``path``, created 0600 (only its owner may connect); a stale socket file there is replaced, a live
    one or any other file is refused."""
    _clear_stale(path)
    sock = UnixListener(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # created 0600 from the start: no moment when others may connect
    try:
        sock.bind(path)
        sock.path, sock.inode = path, os.lstat(path).st_ino
        sock.listen(4)
    except OSError as exc:
        sock.close()
        raise NetworkError(f"cannot listen on unix:{path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _clear_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise NetworkError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise NetworkError(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:  # nobody listens: left by a process that is gone
        os.unlink(path)
        return
    except OSError as exc:
        raise NetworkError(f"cannot listen on unix:{path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise NetworkError(f"cannot listen on unix:{path}: address already in use")


def peer_name(conn: socket.socket, address: object) -> str:
    """How log lines name an accepted connection: its address, or for a unix socket the peer's process."""
    if isinstance(address, str) and address:
        return address  # standard input and output (stdio.py)
    if isinstance(address, tuple):
        return format_address(*address[:2])
    try:
        pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
        return f"local process {pid}"
    except OSError:
        return "a local process"


def listen_at(where: Endpoint) -> socket.socket:
    """The receiver's listening socket for --listen HOST:PORT or unix:PATH."""
    return listen_unix(where.target) if where.scheme == UNIX else listen(where.host, where.port)


def bound_name(where: Endpoint, listener: socket.socket) -> str:
    """What the ready line and --ready-file report: the bound HOST:PORT (port 0 resolved), or unix:PATH."""
    return str(where) if where.scheme == UNIX else format_address(*listener.getsockname()[:2])
