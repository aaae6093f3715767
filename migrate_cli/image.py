"""The source image: a regular file, a file on /dev/shm or hugetlbfs, a memfd as /proc/PID/fd/N, or a block
device, mapped MAP_SHARED read-only: never read whole into memory, so a running guest's writes show through (live
migration relies on that). The destination side is destination.py.
"""

from __future__ import annotations

import mmap
import os
import stat

import numpy as np

from .errors import SourceError

DEFAULT_PAGE_SIZE = 4096
# Pages are read, compressed, framed and checksummed a batch at a time. Per-batch costs (Python glue, frame,
# queue hops, the receiver's dispatch) fall with size: 4 MiB cost 7% less CPU than 1 MiB for zstd (docs/PERFORMANCE.md).
DEFAULT_BATCH_SIZE = 4 * 1024 * 1024
MIN_DEFAULT_BATCH_SIZE = 1024 * 1024
SENDER_BUFFER_BUDGET = 96 * 1024 * 1024  # the sender's gather buffers (RING per worker) stay under this by default


def default_batch_size(threads: int, ring: int) -> int:
    """4 MiB, halved (not below 1 MiB) until ``ring`` buffers per compression thread (send_pipeline.RING) fit the
    budget: a 64-thread host would otherwise hold 768 MiB of batch buffers on the sender."""
    size = DEFAULT_BATCH_SIZE
    while size > MIN_DEFAULT_BATCH_SIZE and ring * threads * size > SENDER_BUFFER_BUDGET:
        size //= 2
    return size


def check_page_size(page_size: int) -> None:
    from .protocol import MAX_PAGE_SIZE, MIN_PAGE_SIZE

    if page_size < MIN_PAGE_SIZE or page_size > MAX_PAGE_SIZE or page_size & (page_size - 1):
        raise ValueError(f"page size {page_size} is not a power of two between {MIN_PAGE_SIZE} and {MAX_PAGE_SIZE}")


class SourceImage:
    """A read-only shared mapping of the source image. ``array`` is a uint8 numpy view of the mapping."""

    def __init__(self, path: str, page_size: int = DEFAULT_PAGE_SIZE) -> None:
        self.path = path
        self.page_size = page_size
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise SourceError(f"source {path}: no such file") from None
        except PermissionError:
            raise SourceError(f"source {path}: permission denied") from None
        except OSError as exc:
            raise SourceError(f"source {path}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                size = st.st_size
            elif stat.S_ISBLK(st.st_mode):
                size = os.lseek(fd, 0, os.SEEK_END)
            else:
                raise SourceError(f"source {path}: not a regular file, memfd or block device")
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
