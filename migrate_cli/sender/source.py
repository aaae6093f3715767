"""The source image: a regular file, a file on /dev/shm or hugetlbfs, a memfd as /proc/PID/fd/N, or a block
device, mapped MAP_SHARED read-only: never read whole into memory, so a running guest's writes show through (live
migration relies on that). The destination side is destination.py. Holes of a sparse image are not read (holes.py).
"""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np

from ..errors import SourceError
from ..wire.frames import DEFAULT_PAGE_SIZE
from .holes import data_extents

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFDIR: "a directory"}


def _check_kind(path: str, mode: int) -> None:
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        kind = _KINDS.get(stat.S_IFMT(mode), "a special file")
        raise SourceError(f"source {path} is {kind}: not a regular file, memfd or block device")


def _open_source(path: str) -> int:
    """Open the source read-only, refusing what is not a regular file (memfds are) or a block device first: opening a
    FIFO would wait for a writer forever, a character device may act on open. O_NONBLOCK covers a path swapped for
    a FIFO between the stat and the open; it changes nothing for files and block devices, which are only mapped."""
    try:
        _check_kind(path, os.stat(path).st_mode)  # follows /proc/PID/fd/N to the memfd behind it
        return os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise SourceError(f"source {path}: no such file") from None
    except PermissionError:
        raise SourceError(f"source {path}: permission denied") from None
    except OSError as exc:
        raise SourceError(f"source {path}: cannot open: {exc.strerror}") from None


class SourceImage:
    """A read-only shared mapping of the source image. ``array`` is a uint8 numpy view of the mapping."""

    def __init__(self, path: str, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.path = path
        self.page_size = page_size
        fd = _open_source(path)
        try:
            st = os.fstat(fd)  # again: the path may have been replaced since it was checked
            _check_kind(path, st.st_mode)
            size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
            if size == 0 or size % page_size:
                raise SourceError(
                    f"source {path}: size {size} bytes is not a whole number of {page_size}-byte pages"
                    + (" (empty)" if size == 0 else f" ({size % page_size} bytes left over)")
                )
            try:
                self._mmap = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            except OSError as exc:
                raise SourceError(f"source {path}: cannot map: {exc.strerror}") from None
        except BaseException:
            os.close(fd)
            raise
        # Kept open to notice a source that shrinks while mapped: touching a page past its new end would raise
        # SIGBUS, which Python cannot turn into an error, so readers call check_size() first.
        self._fd = fd if stat.S_ISREG(st.st_mode) else -1
        if self._fd < 0:
            os.close(fd)
        self.size = size
        self.pages = size // page_size
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def data_extents(self) -> np.ndarray | None:
        """The page ranges that hold data now (holes.data_extents); None for a block device or a file without holes."""
        return None if self._fd < 0 else data_extents(self._fd, self.size, self.page_size)

    def check_size(self) -> None:
        """Raise SourceError if the file behind the mapping is now shorter than the image (it was truncated)."""
        if self._fd >= 0 and (now := os.fstat(self._fd).st_size) < self.size:
            raise SourceError(
                f"source {self.path} shrank from {self.size} to {now} bytes while it was being sent: "
                "it is not a guest memory image any more"
            )

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        del self.array
        try:
            self._mmap.close()
        except BufferError:
            pass  # a view is still alive somewhere; the mapping goes when the process exits

    def __enter__(self) -> SourceImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
