"""A byte stream over two file descriptors (one pipe each way, as ssh may give a command's standard input and
output): the few socket methods ``Channel`` calls (recv_into, recv, sendmsg, sendall, settimeout, shutdown, close).

Reads and writes wait in select with the channel's timeout; ``shutdown`` wakes a thread blocked in either through a
wake pipe of its own, as shutting down a socket does. Splicing (splice.py) is for sockets only: Channel lands a pipe
stream's page data through user space.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
from collections.abc import Sequence


class PipeStream:
    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._r, self._w = read_fd, write_fd
        os.set_blocking(read_fd, False)
        os.set_blocking(write_fd, False)
        self._wake_reader = os.pipe2(os.O_CLOEXEC)
        self._wake_writer = os.pipe2(os.O_CLOEXEC)
        self._read_shut = self._write_shut = self._closed = False
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def fileno(self) -> int:
        return self._r

    def _wait(self, readable: bool) -> bool:
        """Wait until the stream can be read (or written); False once shut down; TimeoutError past the timeout."""
        wake = self._wake_reader[0] if readable else self._wake_writer[0]
        fds = ([self._r, wake], [], []) if readable else ([wake], [self._w], [])
        ready = select.select(*fds, self._timeout)
        if not any(ready):
            raise TimeoutError
        return not (wake in ready[0] or (self._read_shut if readable else self._write_shut))

    def recv_into(self, view: memoryview) -> int:
        while True:
            if self._read_shut or not self._wait(readable=True):
                return 0  # what a socket's reader sees after shutdown(SHUT_RD)
            try:
                return os.readv(self._r, [view])
            except BlockingIOError:
                continue

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: self.recv_into(memoryview(buffer))])

    def sendmsg(self, parts: Sequence[memoryview]) -> int:
        while True:
            if self._write_shut or not self._wait(readable=False):
                raise BrokenPipeError
            try:
                return os.writev(self._w, parts)
            except BlockingIOError:
                continue

    def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            view = view[self.sendmsg([view]) :]

    def shutdown(self, how: int) -> None:
        if self._closed:
            return
        if how in (socket.SHUT_RD, socket.SHUT_RDWR) and not self._read_shut:
            self._read_shut = True
            os.write(self._wake_reader[1], b"x")
        if how in (socket.SHUT_WR, socket.SHUT_RDWR) and not self._write_shut:
            self._write_shut = True
            os.write(self._wake_writer[1], b"x")
            with contextlib.suppress(OSError):
                os.close(self._w)  # the peer reads end-of-stream

    def close(self) -> None:
        if self._closed:
            return  # never close descriptors twice: the numbers may belong to another file by now
        self.shutdown(socket.SHUT_RDWR)
        self._closed = True
        for fd in (self._r, *self._wake_reader, *self._wake_writer):
            with contextlib.suppress(OSError):
                os.close(fd)
