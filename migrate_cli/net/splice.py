"""Raw page data from a TCP socket into DEST without passing through user space: splice(2), socket -> pipe -> file.

Measured (benchmarks/bench_land.py, 512 MiB into /dev/shm): 0.67x the receiving thread's CPU of recv_into + pwrite
and half its wall time, where receiving straight into a writable mapping of DEST cost 1.23x (its page faults).
Only for plain TCP (a TLS stream is decrypted in user space anyway) and files that take splice: the first refusal
(hugetlbfs takes no write(2) and no splice either) hands that data to ``fallback`` and turns the path off.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
from collections.abc import Callable

from ..errors import NetworkError

F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in Python 3.10+ only on some builds
PIPE_SIZE = 1 << 20  # fewer, larger splices; the default 64 KiB pipe works too (a non-root limit may refuse this)


class Splicer:
    """One channel's pipe; ``into`` moves the next bytes of its socket to runs of a file."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_CLOEXEC)
        self.chunk = 1 << 16
        try:
            self.chunk = fcntl.fcntl(self._w, F_SETPIPE_SZ, PIPE_SIZE)
        except OSError:
            pass
        self.file_takes_splice = True

    def into(
        self,
        sock: socket.socket,
        fd: int,
        runs: list[tuple[int, int]],
        timeout: float,
        fallback: Callable[[bytes, int], None],
    ) -> None:
        """Move ``sum(length)`` bytes from ``sock`` to ``fd``: each (offset, length) run in turn."""
        for offset, length in runs:
            while length:
                n = self._from_socket(sock, min(length, self.chunk), timeout)
                self._to_file(fd, n, offset, fallback)
                offset, length = offset + n, length - n

    def _from_socket(self, sock: socket.socket, most: int, timeout: float) -> int:
        while True:
            try:
                n = os.splice(sock.fileno(), self._w, most)
            except BlockingIOError:  # a socket with a timeout is non-blocking underneath
                if not select.select([sock], [], [], timeout)[0]:
                    raise NetworkError(f"no data from peer for {timeout:g}s (--io-timeout)") from None
                continue
            except ConnectionResetError:
                raise NetworkError("connection reset by peer") from None
            except OSError as exc:
                raise NetworkError(f"connection lost: {exc.strerror}") from None
            if n == 0:
                raise NetworkError("stream truncated: connection closed in the middle of a PAGES frame")
            return n

    def _to_file(self, fd: int, n: int, offset: int, fallback: Callable[[bytes, int], None]) -> None:
        while n and self.file_takes_splice:
            try:
                moved = os.splice(self._r, fd, n, offset_dst=offset)
            except OSError:
                self.file_takes_splice = False  # the rest goes through ``fallback``, which reports a real error
                break
            offset, n = offset + moved, n - moved
        while n:  # what the file refused is still in the pipe
            data = os.read(self._r, n)
            fallback(data, offset)
            offset, n = offset + len(data), n - len(data)

    def close(self) -> None:
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
