"""`vmmig recv --stdio`: the protocol on standard input and output (``ssh dsthost vmmig recv --stdio DEST``).

The two descriptors are taken over at once and fds 0 and 1 pointed at /dev/null and stderr, so that nothing printed
later can corrupt the stream. A socket on both (a local ``exec:`` gives one end of a socketpair) is used as a socket;
anything else (ssh's pipes) as a PipeStream. ``StdioListener`` hands that one connection to the receiver's admission
as a listener would, once.
"""

from __future__ import annotations

import os
import socket
import stat
import time

from .pipe_stream import PipeStream
from .transport import Stream

STDIO = "stdio"  # how the ready line, --ready-file and log lines name the stream


def take_stdio() -> Stream:
    read_fd, write_fd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)  # a stray print goes to stderr, never into the stream
    r, w = os.fstat(read_fd), os.fstat(write_fd)
    if stat.S_ISSOCK(r.st_mode) and (r.st_dev, r.st_ino) == (w.st_dev, w.st_ino):
        os.close(write_fd)
        return socket.socket(fileno=read_fd)
    return PipeStream(read_fd, write_fd)


class StdioListener:
    """A listener whose ``accept`` returns standard input and output once, then only times out."""

    def __init__(self, stream: Stream) -> None:
        self._stream: Stream | None = stream
        self._timeout = 0.1
        self._closed = False

    def settimeout(self, timeout: float) -> None:
        self._timeout = timeout

    def accept(self) -> tuple[Stream, str]:
        if self._stream is None:
            time.sleep(self._timeout)
            raise TimeoutError
        stream, self._stream = self._stream, None
        return stream, STDIO

    def fileno(self) -> int:
        return -1 if self._closed else 0

    def close(self) -> None:
        self._closed = True
