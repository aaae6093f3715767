"""Dirty-page tracking: which pages differ from what the destination was sent.

One small interface, two trackers:

- ``FingerprintTracker`` (default; any mapping, no help from the VMM): hashes every live page and compares it with
  the fingerprint of the copy that was *sent* (kept by the sender pipeline). A page written while it was being
  copied or hashed is caught at the latest by the next scan, so it is correct under concurrent writes by
  construction. Memory: 8 bytes per page for the live fingerprints (0.2% of the image). Given the source's hole
  query, it reads only the pages that hold data now (asked afresh at each scan: a hole may have been filled since);
  a page in a hole has the zero page's fingerprint.
- ``SoftDirtyTracker`` (experimental): the kernel's soft-dirty bits of the writing process (``/proc/PID/clear_refs``
  + bit 55 of ``/proc/PID/pagemap``). Only pages whose bit is set are hashed. Needs a kernel built with
  CONFIG_MEM_SOFT_DIRTY; ``soft_dirty_supported`` probes that and the caller falls back to fingerprints.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..wire.digest import fingerprint_image, fingerprint_pages, in_chunks, zero_fingerprint
from .holes import HoleMap

PAGEMAP_SOFT_DIRTY = 1 << 55
PAGEMAP_PRESENT = 1 << 63


class DirtyTracker(Protocol):
    name: str

    def start(self) -> None:
        """Called once before the first pass starts sending (soft-dirty clears the bits here)."""

    def scan(self) -> np.ndarray:
        """Sorted indices of pages whose live content differs from what was last sent."""
        ...

    def live_fingerprints(self) -> np.ndarray:
        """Fingerprints of the live pages as of the last scan (every page; the end digest comes from these)."""
        ...


def _no_guard() -> None:
    pass


class FingerprintTracker:
    name = "fingerprint"

    def __init__(
        self,
        image: np.ndarray,
        page_size: int,
        sent: np.ndarray,
        threads: int = 1,
        guard: Callable[[], None] = _no_guard,
        extents: Callable[[], np.ndarray | None] | None = None,
    ) -> None:
        self.image = image
        self.page_size = page_size
        self.sent = sent
        self.threads = threads
        self.guard = guard  # raises if the image can no longer be read whole (SourceImage.check_size)
        self.extents = extents  # the pages that hold data now (SourceImage.data_extents); None: read every page
        self._live = np.empty(0, dtype=np.uint64)

    def start(self) -> None:
        pass

    def scan(self) -> np.ndarray:
        self.guard()
        holes = HoleMap(self.extents() if self.extents is not None else None)
        if holes.sparse:
            self._live = fingerprint_data(self.image, self.page_size, holes, self.threads)
        else:
            self._live = fingerprint_image(self.image, self.page_size, self.threads)
        return np.flatnonzero(self._live != self.sent)

    def live_fingerprints(self) -> np.ndarray:
        return self._live


def fingerprint_data(
    image: np.ndarray, page_size: int, holes: HoleMap, threads: int = 1, chunk_pages: int = 16384
) -> np.ndarray:
    """Fingerprint every page as fingerprint_image does, reading only the pages ``holes`` says hold data: the others
    get the zero page's fingerprint. Work goes in chunks of the image (as there), each hashing its data runs."""
    pages = image.size // page_size
    fps = np.full(pages, zero_fingerprint(page_size), dtype=np.uint64)

    def work(first: int) -> None:
        for start, end in holes.runs(first, min(pages, first + chunk_pages)):
            fingerprint_pages(image[start * page_size : end * page_size], page_size, fps[start:end])

    in_chunks(work, pages, chunk_pages, threads)
    return fps


# --- soft-dirty ---------------------------------------------------------------------------------------------------


def read_pagemap(path: str | Path, first_vpage: int, count: int) -> np.ndarray:
    """Read ``count`` 64-bit pagemap entries starting at virtual page ``first_vpage`` (one pread)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, count * 8, first_vpage * 8)
    finally:
        os.close(fd)
    if len(data) != count * 8:
        raise OSError(f"{path}: short read of pagemap ({len(data)} of {count * 8} bytes)")
    return np.frombuffer(data, dtype="<u8")


def soft_dirty_pages(entries: np.ndarray) -> np.ndarray:
    """Indices (relative to the first entry) whose soft-dirty bit is set."""
    return np.flatnonzero(entries & np.uint64(PAGEMAP_SOFT_DIRTY))


def soft_dirty_supported() -> bool:
    """Probe on our own memory: clear the bits, write a page, and see whether its bit comes back."""
    page = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        page[0:1] = b"\x01"
        address = _buffer_address(page)
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("4")
        page[0:1] = b"\x02"
        entry = read_pagemap("/proc/self/pagemap", address // mmap.PAGESIZE, 1)[0]
        return bool(entry & np.uint64(PAGEMAP_SOFT_DIRTY))
    except OSError:
        return False
    finally:
        page.close()


def _buffer_address(buf: mmap.mmap) -> int:
    import ctypes

    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


def find_mapping(pid: int, path: str) -> tuple[int, int]:
    """(start address, file offset) of ``pid``'s shared mapping of the file ``path`` (matched by device and inode)."""
    st = os.stat(path)
    with open(f"/proc/{pid}/maps") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 6:
                continue
            span, _, offset, dev, inode = fields[:5]
            major, minor = (int(x, 16) for x in dev.split(":"))
            if int(inode) == st.st_ino and os.makedev(major, minor) == st.st_dev:
                return int(span.split("-")[0], 16), int(offset, 16)
    raise LookupError(f"process {pid} does not map {path}")


class SoftDirtyTracker:
    """Experimental. Hashes only the pages the kernel marks soft-dirty in ``pid``'s mapping of the image."""

    name = "soft-dirty"

    def __init__(self, pid: int, path: str, image: np.ndarray, page_size: int, sent: np.ndarray) -> None:
        if page_size != mmap.PAGESIZE:
            raise ValueError(f"soft-dirty tracking needs --page-size {mmap.PAGESIZE}")
        self.pid = pid
        self.image = image
        self.page_size = page_size
        self.sent = sent
        address, offset = find_mapping(pid, path)
        self._first_vpage = (address - offset) // page_size
        self._live: np.ndarray | None = None

    def _clear(self) -> None:
        with open(f"/proc/{self.pid}/clear_refs", "w") as fh:
            fh.write("4")

    def start(self) -> None:
        self._clear()

    def scan(self) -> np.ndarray:
        entries = read_pagemap(f"/proc/{self.pid}/pagemap", self._first_vpage, self.sent.size)
        self._clear()  # before hashing: a write during the hash sets the bit again for the next scan
        candidates = soft_dirty_pages(entries)
        if self._live is None:  # first scan, after pass 1: what was sent is what the destination holds
            self._live = self.sent.copy()
        fps = np.empty(1, dtype=np.uint64)
        for page in candidates.tolist():
            fingerprint_pages(self.image[page * self.page_size : (page + 1) * self.page_size], self.page_size, fps)
            self._live[page] = fps[0]
        return np.flatnonzero(self._live != self.sent)

    def live_fingerprints(self) -> np.ndarray:
        return self._live if self._live is not None else self.sent.copy()


__all__ = [
    "PAGEMAP_PRESENT",
    "PAGEMAP_SOFT_DIRTY",
    "DirtyTracker",
    "FingerprintTracker",
    "SoftDirtyTracker",
    "find_mapping",
    "fingerprint_data",
    "read_pagemap",
    "soft_dirty_pages",
    "soft_dirty_supported",
]
