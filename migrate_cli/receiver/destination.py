"""The destination image: created, filled, read back, published (or discarded).

``DEST.partial`` is created beside DEST (O_EXCL | O_NOFOLLOW, mode 0600), sized, and allocated in full on a thread
of its own while pages arrive (allocate.py; the first 16 MiB before the sender is welcomed, so a full disk usually
fails before any page is sent). Workers write it with pwrite and read it back through a read-only mapping for the
fingerprints; it is flushed, and renamed to DEST only after the digest matched. Nothing else ever creates DEST.
``recv --in-place`` writes an existing file or device instead; ``recv --discard`` keeps nothing (discard.py).
What DEST may be is checked before any of this (dest_checks.py).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import mmap
import os
import stat
import threading
from collections.abc import Callable

import numpy as np

from ..errors import DestinationError
from ..page_runs import run_bounds
from ..wire.digest import fingerprint_image, fingerprint_pages, image_digest, zero_fingerprint
from ..wire.frames import Pages
from .allocate import Allocation
from .dest_checks import partial_path
from .page_check import check_landed

ZERO_CHUNK = 1 << 20  # bytes of zeros one pwrite puts over a run of pages that must read as zero
MAX_LANDING_RUNS = 64  # splices of one frame's data; a frame of more scattered pages is read into a buffer


class DestinationImage:
    """DEST.partial: written with pwrite by the workers (disjoint page ranges, no lock), read back through a
    read-only shared mapping for the fingerprints, allocated in full on a thread of its own (allocate.py)."""

    def __init__(self, dest: str, size: int, page_size: int, sparse: bool = False) -> None:
        self.dest = dest
        self.partial = partial_path(dest)
        self.size = size
        self.page_size = page_size
        self.pages = size // page_size
        self._mmap: mmap.mmap | None = None
        # What DEST holds, page by page (a fresh file is all zeros); kept current by write_batch. Allocated first:
        # an image too large to track fails here, before any file exists.
        self._init_writes(page_size)
        self.fingerprints = fingerprint_array(self.pages, self._zero_fp, dest)
        self._allocation: Allocation | None = None  # allocated on a thread ahead of the writers (allocate.py)
        try:
            self._fd = os.open(self.partial, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            raise DestinationError(f"{self.partial} appeared while preparing (another vmmig recv?)") from None
        except OSError as exc:
            raise DestinationError(f"destination {self.partial}: cannot create: {exc.strerror}") from None
        try:  # --sparse allocates nothing
            if sparse:
                os.ftruncate(self._fd, size)
            else:
                self._allocation = Allocation(self._fd, size)
                self._allocation.start()
            self._mmap = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            self._stop_allocation()
            self._cleanup_fd()
            os.unlink(self.partial)
            raise self._allocation_error(exc) from None
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def _init_writes(self, page_size: int) -> None:
        # A batch was applied to this file by this process: a DEST.partial nothing reached holds nothing worth
        # keeping for a resume (a client that said HELLO and hung up must not leave one behind).
        self.pages_written = False
        self._zero_fp = zero_fingerprint(page_size)
        self._zeros = memoryview(bytes(max(page_size, ZERO_CHUNK)))  # zero-page writes' source (slices: no copy)
        self._stores: np.ndarray | None = None  # a writable mapping, only where pwrite is refused (hugetlbfs)
        self._stores_mmap: mmap.mmap | None = None
        self._stores_lock = threading.Lock()

    def _allocation_error(self, exc: OSError) -> DestinationError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return DestinationError(f"destination {self.partial}: no space left on device for {self.size} bytes")
        return DestinationError(f"destination {self.partial}: cannot allocate {self.size} bytes: {exc.strerror}")

    def allocate_rest(self) -> None:
        """Start allocating the rest of DEST.partial on a thread (allocate.py), from here on while pages arrive."""
        if self._allocation is not None:
            self._allocation.continue_in_background()

    @property
    def allocation_failed(self) -> bool:
        """The allocation thread stopped on an error (a full disk): DEST.partial is short of its size."""
        return self._allocation is not None and self._allocation.error is not None

    def stop_allocation(self) -> None:
        """Stop the allocation thread (within one chunk) and keep what it allocated: a session parked for a resume
        must not go on filling the disk; ``finish_allocation`` (at publish) allocates the rest."""
        if self._allocation is not None:
            self._allocation.stop()

    def check_allocation(self) -> None:
        """Raise now if the allocation thread hit a full disk: the migration fails while it runs, not at END (an
        image of mostly zero pages may otherwise write nothing that would hit it)."""
        if self._allocation is not None and self._allocation.error is not None:
            raise self._allocation_error(self._allocation.error)

    def finish_allocation(self) -> None:
        """Wait for the whole of DEST.partial to be allocated: a published DEST is never short of space."""
        if self._allocation is not None:
            try:
                self._allocation.finish()
            except OSError as exc:
                raise self._allocation_error(exc) from None

    def _stop_allocation(self) -> None:
        """For good: the fd closes next."""
        if self._allocation is not None:
            self._allocation.close()

    @classmethod
    def adopt(cls, dest: str, size: int, page_size: int) -> DestinationImage:
        """Open the DEST.partial an interrupted migration left (``recv --resume``); its content is kept as it is."""
        self = cls.__new__(cls)
        self._map_existing(
            dest, partial_path(dest), size, page_size, os.O_NOFOLLOW, check=_check_adoptable,
            opening=f"cannot open {partial_path(dest)} to resume",
            mapping=f"cannot map {partial_path(dest)}",
            wrong_size=lambda actual: (
                f"{partial_path(dest)} is {actual} bytes, but its state file says {size}: it cannot be resumed"
            ),
        )  # fmt: skip
        return self

    def _map_existing(
        self,
        dest: str,
        path: str,
        size: int,
        page_size: int,
        flags: int,
        opening: str,
        mapping: str,
        wrong_size: Callable[[int], str],
        check: Callable[[str, os.stat_result], None] | None = None,
    ) -> None:
        """Map an existing file (or device) of exactly ``size`` bytes read-write, its content unknown: the
        fingerprints start at 0, which no page hashes to (an adopted DEST.partial, an --in-place DEST)."""
        self.dest, self.partial, self.size, self.page_size = dest, path, size, page_size
        self.pages = size // page_size
        self._mmap = None
        self._allocation = None  # an existing file: allocated already (or by its owner)
        self._init_writes(page_size)
        self.fingerprints = fingerprint_array(self.pages, 0, dest)
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP and flags & os.O_NOFOLLOW and os.path.islink(path):
                raise DestinationError(f"{opening}: it is a symbolic link (not followed)") from None
            raise DestinationError(f"{opening}: {exc.strerror}") from None
        try:
            if check is not None:
                check(path, os.fstat(self._fd))
            actual = destination_size(self._fd)
            if actual != size:
                raise DestinationError(wrong_size(actual))
            self._mmap = mmap.mmap(self._fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        except OSError as exc:
            self._cleanup_fd()
            raise DestinationError(f"{mapping}: {exc.strerror}") from None
        except DestinationError:
            self._cleanup_fd()
            raise
        self.array = np.frombuffer(self._mmap, dtype=np.uint8)

    def refingerprint(self, threads: int) -> np.ndarray:
        """Fingerprint what DEST.partial holds now, read back from the file: the truth a resume starts from."""
        self.fingerprints[:] = fingerprint_image(self.array, self.page_size, threads)
        return self.fingerprints

    @property
    def fd(self) -> int:
        return self._fd

    def landing_runs(self, frame: Pages) -> list[tuple[int, int]] | None:
        """Where a raw frame's data goes in DEST, as (offset, length) runs of its non-zero pages, for the network
        thread to splice it there (pipeline.py); None where it must be read into a buffer instead: no data, a
        DEST stored through a mapping (hugetlbfs), or pages scattered in more than MAX_LANDING_RUNS runs."""
        if frame.normal_count == 0 or self._stores is not None:
            return None
        self.pages_written = True  # the network thread writes into DEST from here on: worth keeping for a resume
        ps, count = self.page_size, frame.count
        zero = np.unpackbits(np.frombuffer(frame.zero_bitmap, np.uint8), count=count, bitorder="little").astype(bool)
        normal = frame.index_array()[~zero]
        bounds = run_bounds(normal)
        if len(bounds) > MAX_LANDING_RUNS:
            return None
        return [(int(normal[lo]) * ps, (hi - lo) * ps) for lo, hi in bounds]

    def write_at(self, data: bytes, offset: int) -> None:
        """Write ``data`` at ``offset`` as the workers do (what a splice into DEST could not place)."""
        self._pwrite(data, offset)

    def write_batch(self, frame: Pages, data: bytes | memoryview, landed: bool = False) -> None:
        """Place a decoded batch, fingerprint what DEST now holds at those pages, and check each non-zero page
        against the sender's fingerprint (page_check.py). ``landed``: its non-zero pages are in DEST already
        (spliced by the network thread); only its zero pages and the check are left.

        ``data`` holds the non-zero pages in order; zero pages become zeros. The fingerprints are read back from the
        mapping (not from ``data``), so the check is on what DEST holds, and the end digest is computed over DEST
        itself, incrementally: at END only hashing the fingerprint array remains, which keeps the receiver's share
        of a live downtime small.

        A zero page is neither read nor written where the fingerprint array says DEST holds zeros there already
        (a fresh file is all zeros): on a typical guest that skips 40% of the pages, their page faults included.
        """
        self.pages_written = True
        start, count = frame.start, frame.count
        zero = np.unpackbits(np.frombuffer(frame.zero_bitmap, np.uint8), count=count, bitorder="little").astype(bool)
        if frame.indices is not None:
            self._write_list(frame.index_array(), zero, data, frame.fingerprint_array(), landed)
            return
        ps = self.page_size
        base = start * ps
        region = self.array[base : base + count * ps]
        fps = self.fingerprints[start : start + count]
        if not zero.any():
            if not landed:
                self._pwrite(data, base)
            fingerprint_pages(region, ps, fps)
            check_landed(np.arange(start, start + count), fps, frame.fingerprint_array())
            return
        src = np.frombuffer(data, dtype=np.uint8) if len(data) and not landed else None
        pos = 0
        # Walk runs of equal kind: one write per run, not per page.
        edges = np.flatnonzero(np.diff(zero.view(np.int8))) + 1
        bounds = [0, *edges.tolist(), count]
        for lo, hi in itertools.pairwise(bounds):
            if zero[lo]:
                held = np.flatnonzero(fps[lo:hi] != self._zero_fp)
                self._write_zeros(start + lo + held)  # only pages that hold something else are zeroed
                fps[lo:hi] = self._zero_fp
            else:
                n = (hi - lo) * ps
                if src is not None:
                    self._pwrite(src[pos : pos + n], base + lo * ps)
                pos += n
                fingerprint_pages(region[lo * ps : hi * ps], ps, fps[lo:hi])
        normal = np.flatnonzero(~zero)
        check_landed(start + normal, fps[normal], frame.fingerprint_array())

    def _write_list(
        self, ids: np.ndarray, zero: np.ndarray, data: bytes | memoryview, sent: np.ndarray, landed: bool
    ) -> None:
        ps = self.page_size
        pages2d = self.array.reshape(self.pages, ps)
        normal_ids = ids[~zero]
        if normal_ids.size:
            src = np.frombuffer(data, dtype=np.uint8).reshape(-1, ps) if not landed else None
            for lo, hi in run_bounds(normal_ids) if src is not None else []:  # one write per run of pages
                self._pwrite(src[lo:hi], int(normal_ids[lo]) * ps)
            fps = np.empty(normal_ids.size, dtype=np.uint64)
            fingerprint_pages(pages2d[normal_ids], ps, fps)  # read back from DEST (a gathered copy)
            self.fingerprints[normal_ids] = fps
            check_landed(normal_ids, fps, sent)
        zero_ids = ids[zero]
        if zero_ids.size:
            self._write_zeros(zero_ids[self.fingerprints[zero_ids] != self._zero_fp])
            self.fingerprints[zero_ids] = self._zero_fp

    def _write_zeros(self, pages: np.ndarray) -> None:
        """Zero ``pages`` (sorted page numbers): one pwrite per run of consecutive pages, not one per page (an
        adopted or --in-place DEST starts with unknown fingerprints, so every zero page of the image comes here)."""
        ps = self.page_size
        for lo, hi in run_bounds(pages):
            offset, end = int(pages[lo]) * ps, (int(pages[hi - 1]) + 1) * ps
            while offset < end:
                n = min(end - offset, len(self._zeros))
                self._pwrite(self._zeros[:n], offset)
                offset += n

    def _pwrite(self, data: bytes | memoryview | np.ndarray, offset: int) -> None:
        """Write through the file, never through the mapping (which is read-only): a page written whole is neither
        faulted in nor zeroed first (tmpfs: half the cost of a store through the mapping), and a full disk is
        ENOSPC here instead of a SIGBUS."""
        view = memoryview(data).cast("B")
        while view:
            if self._stores is not None:
                self._stores[offset : offset + len(view)] = np.frombuffer(view, dtype=np.uint8)
                return
            try:
                written = os.pwrite(self._fd, view, offset)
            except OSError as exc:
                if exc.errno == errno.EINVAL:  # hugetlbfs has no write(2): store through a writable mapping
                    self._map_for_stores()
                    continue
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise self._allocation_error(exc) from None
                raise DestinationError(f"destination {self.partial}: write failed: {exc.strerror}") from None
            view, offset = view[written:], offset + written

    def _map_for_stores(self) -> None:
        with self._stores_lock:
            if self._stores is None:
                try:
                    self._stores_mmap = mmap.mmap(self._fd, self.size, flags=mmap.MAP_SHARED)
                except OSError as exc:
                    raise DestinationError(
                        f"destination {self.partial}: cannot map for writing: {exc.strerror}"
                    ) from None
                self._stores = np.frombuffer(self._stores_mmap, dtype=np.uint8)

    def digest(self, threads: int) -> bytes:
        """The image digest over DEST.partial's own content, as fingerprinted after each write (see write_batch)."""
        return image_digest(self.fingerprints)

    def flush(self) -> None:
        assert self._mmap is not None
        try:
            self._mmap.flush()
            os.fsync(self._fd)
        except OSError as exc:
            raise DestinationError(f"destination {self.partial}: flush failed: {exc.strerror}") from None

    def publish(self, force: bool = False) -> None:
        """Rename DEST.partial to DEST (after verification) and make the rename durable.

        Without ``force`` a DEST that appeared during the migration is not replaced: link(2) fails on it. The file
        stays open and mapped: the caller closes it once the verdict is out, since unmapping is not free (12 ms for
        a written 256 MiB tmpfs image here, 45 ms per GiB) and would otherwise count as downtime.
        """
        self.finish_allocation()
        try:
            if force:
                os.rename(self.partial, self.dest)
            else:
                try:
                    os.link(self.partial, self.dest)
                    os.unlink(self.partial)
                except FileExistsError:
                    raise DestinationError(
                        f"destination {self.dest} appeared during the migration: not replaced (use --force)"
                    ) from None
                except OSError as exc:
                    if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
                        raise
                    if os.path.lexists(self.dest):  # no hard links here: check, then rename
                        raise DestinationError(
                            f"destination {self.dest} appeared during the migration: not replaced (use --force)"
                        ) from None
                    os.rename(self.partial, self.dest)
            dir_fd = os.open(os.path.dirname(os.path.abspath(self.dest)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            raise DestinationError(f"destination {self.dest}: cannot publish: {exc.strerror}") from None

    def discard(self, keep_partial: bool = False) -> None:
        self.close()
        if not keep_partial:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.partial)

    def _cleanup_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def close(self) -> None:
        self._stop_allocation()
        if self._stores_mmap is not None:
            self._stores = None
            with contextlib.suppress(BufferError):
                self._stores_mmap.close()
            self._stores_mmap = None
        if self._mmap is not None:
            self.array = np.empty(0, dtype=np.uint8)
            with contextlib.suppress(BufferError):
                self._mmap.close()
            self._mmap = None
        self._cleanup_fd()


class InPlaceDestination(DestinationImage):
    """`recv --in-place`: write straight into an existing file, memfd or block device of exactly the image size.

    Nothing is created, truncated or renamed (a destination QEMU may already have the file open). Nothing is
    assumed about the old content: every page of pass 1 is written, zero pages as zeros. A failure leaves DEST
    modified but unverified (exit code 13), since the old content cannot be restored.
    """

    def __init__(self, dest: str, size: int, page_size: int) -> None:
        self.modified = False
        # Unknown old content: pass 1 writes every page (a fingerprint of 0 makes write_batch zero the zero pages).
        self._map_existing(
            dest, dest, size, page_size, 0,
            opening=f"destination {dest}: cannot open for writing",
            mapping=f"destination {dest}: cannot map",
            wrong_size=lambda actual: (
                f"destination {dest} is {actual} bytes, but the image is {size} bytes: --in-place needs them equal"
            ),
        )  # fmt: skip

    def write_batch(self, frame: Pages, data: bytes | memoryview, landed: bool = False) -> None:
        self.modified = True
        super().write_batch(frame, data, landed)

    def landing_runs(self, frame: Pages) -> list[tuple[int, int]] | None:
        self.modified = True  # the network thread writes into DEST from here on
        return super().landing_runs(frame)

    def publish(self, force: bool = False) -> None:
        """Written in place: nothing to rename (the caller closes it after the verdict, as for DEST.partial)."""

    def discard(self, keep_partial: bool = False) -> None:
        self.close()  # never delete someone else's file


def fingerprint_array(pages: int, fill: int, dest: str) -> np.ndarray:
    """8 bytes per page to track what DEST holds; a size the receiver cannot track is a destination error."""
    try:
        return np.full(pages, fill, dtype=np.uint64)
    except (MemoryError, ValueError):
        raise DestinationError(
            f"destination {dest}: cannot track {pages} pages ({pages * 8} bytes of fingerprints): image too large"
        ) from None


def _check_adoptable(path: str, st: os.stat_result) -> None:
    """A DEST.partial to resume into is one vmmig created: a regular file of ours with no other name. Anything
    else (a hard link planted at the name, a device) would have pages written into someone else's file."""
    if not stat.S_ISREG(st.st_mode):
        raise DestinationError(f"cannot resume into {path}: it is not a regular file")
    if st.st_uid != os.geteuid():
        raise DestinationError(f"cannot resume into {path}: it belongs to user {st.st_uid}, not to this one")
    if st.st_nlink != 1:
        raise DestinationError(f"cannot resume into {path}: it has {st.st_nlink} hard links (remove it to start over)")


def destination_size(fd: int) -> int:
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        return os.lseek(fd, 0, os.SEEK_END)
    return st.st_size
