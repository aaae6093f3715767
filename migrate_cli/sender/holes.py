"""Holes of a sparse source image: the page ranges lseek(SEEK_DATA/SEEK_HOLE) says hold no data, so read as zeros.

A 5 GiB image with a few MiB of data would otherwise be read whole through the mapping: each hole page faulted in
as a page of zeros, gigabytes of page cache (on tmpfs, of memory: a read fault there allocates the page) for
nothing. The sender asks the file system once per pass and once per dirty scan which pages hold data; a page that
lies entirely in a hole is a zero page without being read, and its fingerprint is the zero page's.

Holes shorter than MIN_HOLE are read anyway, and on a file fragmented finer than one extent per BYTES_PER_EXTENT the
walk stops early (the rest is read): both bound what skipping costs where it would save little.

The answer can be stale by the time a batch is encoded. A hole filled meanwhile was sent, and fingerprinted, as the
zero page: the same as a write just after the page was copied, which the next dirty scan (with a fresh map) catches.

Sources that cannot tell are read whole: block devices (not asked), and file systems without SEEK_DATA support,
where the kernel's generic lseek reports the whole file as data (hugetlbfs, for one). tmpfs and memfds answer.
"""

from __future__ import annotations

import errno
import os

import numpy as np

# Smaller holes are read with their neighbours: a fault on a data page reads the pages around it (the kernel's
# read-around, 128 KiB to a few MiB) anyway, and each run of data pages costs the worker a numpy call.
MIN_HOLE = 128 * 1024
# The walk costs two lseeks per extent (~3 us on ext4): on a file fragmented finer than this on average it stops,
# and the rest counts as data. Bounds the walk to ~12 ms per GiB, against ~100 ms per GiB to hash the image.
BYTES_PER_EXTENT = 256 * 1024


def data_extents(fd: int, size: int, page_size: int) -> np.ndarray | None:
    """The ``[first, end)`` page ranges of the first ``size`` bytes of ``fd`` that hold data, as an (n, 2) int64
    array (sorted, disjoint; a page partly in data, or in a hole shorter than MIN_HOLE, counts as data); None when
    the file has no holes or the file system cannot tell: read every page."""
    spans: list[tuple[int, int]] = []
    offset = 0
    budget = max(1024, size // BYTES_PER_EXTENT)
    try:
        # A file with as many blocks allocated as it is long has no hole worth looking for; asking would cost a walk
        # over all of it on tmpfs (~20 ms per GiB, at every pass and every dirty scan, some of them in the downtime).
        if os.fstat(fd).st_blocks * 512 >= size:
            return None
        while offset < size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data at or after offset: the rest is a hole
                    break
                raise
            if start >= size:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            if end <= start:  # cannot happen on a sane file system: do not trust the answer
                return None
            spans.append((start, min(end, size)))
            offset = end
            if len(spans) >= budget and offset < size:
                spans.append((offset, size))
                break
    except OSError:  # EINVAL and the like: no hole information, read everything
        return None
    if spans == [(0, size)]:
        return None
    if not spans:
        return np.empty((0, 2), dtype=np.int64)
    edges = np.array(spans, dtype=np.int64)
    first, end = edges[:, 0] // page_size, -(-edges[:, 1] // page_size)
    # Extents that share a page (file system blocks smaller than the page) or lie closer than MIN_HOLE merge.
    gaps = np.flatnonzero(first[1:] - end[:-1] >= max(1, MIN_HOLE // page_size))
    merged = np.column_stack((first[np.r_[0, gaps + 1]], end[np.r_[gaps, end.size - 1]]))
    if merged.shape[0] == 1 and merged[0, 0] == 0 and merged[0, 1] >= -(-size // page_size):
        return None
    return merged


class HoleMap:
    """Which pages hold data, as of one query. ``extents`` None: every page does (nothing is skipped)."""

    def __init__(self, extents: np.ndarray | None) -> None:
        # Flattened [first0, end0, first1, end1, ...], strictly increasing: a page holds data iff an odd number of
        # bounds are <= it.
        self._bounds = None if extents is None else np.ascontiguousarray(extents, dtype=np.int64).ravel()

    @property
    def sparse(self) -> bool:
        return self._bounds is not None

    def runs(self, first: int, end: int) -> list[tuple[int, int]]:
        """The ``[a, b)`` runs of data pages within pages ``[first, end)``: [] if all of it is a hole."""
        if self._bounds is None:
            return [(first, end)]
        bounds = self._bounds
        i = int(np.searchsorted(bounds, first, side="right"))  # bounds[i:] > first
        j = int(np.searchsorted(bounds, end, side="left"))  # bounds[:j] < end
        edges = ([first] if i & 1 else []) + bounds[i:j].tolist() + ([end] if j & 1 else [])
        return list(zip(edges[::2], edges[1::2], strict=True))

    def mask(self, pages: np.ndarray) -> np.ndarray | None:
        """For sorted page numbers, whether each holds data; None when all do."""
        if self._bounds is None:
            return None
        data = (np.searchsorted(self._bounds, pages, side="right") & 1).astype(bool)
        return None if data.all() else data
