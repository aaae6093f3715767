"""The sender's data path: a reader that walks the image in batches, and N workers that encode them.

    reader --(batch ranges)--> work queue --> worker 1..N --(EncodedBatch)--> out queue --> network thread

Workers live for the whole migration; each pass (one for a plain copy, several for a live migration) starts a
reader for its list of ranges. The reader only enumerates batch ranges, each with the pass's hole map (holes.py,
asked once per pass): it never touches page data and never compresses. Each worker owns, for its whole life, one
compressor and a small ring of gather buffers; per batch it
0. takes the pages that lie in a hole of a sparse image as zero pages without reading them (a batch entirely in a
   hole is not read at all),
1. scans the live mapping for zero pages (one vectorised pass),
2. copies the non-zero pages out of the mapping into its own buffer (a guest may write them meanwhile; from here
   on only the copy is used),
3. fingerprints the copy: the fingerprints travel in the frame, for the receiver's check of every page it lands,
   and are what the receiver will hold (receiver_copy.py; disjoint slices: no lock),
4. compresses the copy with one call, and sends it raw instead when that does not shrink it.
A raw batch's buffer travels with it to the network thread, which hands it back after sending.

A pass over a *frozen* source (plain mode, where it must not change; a paused guest) skips step 2 where it can: a
batch that goes raw is fingerprinted in the mapping and sent from it (views of the mapping, one sendmsg), and a
batch without zero pages is compressed straight from it. A page that changes anyway between its fingerprint and
its send fails the receiver's check (copy_modes.py then blames the source, not the link). A live pass before the
pause keeps the copy: a page rewritten while it is sent must leave a fingerprint that matches what was sent.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from ..failure import Failure, get, put, spawn, stop_workers
from ..page_runs import run_bounds, true_runs
from ..wire import codec as codecs
from ..wire.codec import Compressor
from ..wire.digest import fingerprint_pages, zero_fingerprint
from ..wire.frames import Encoding, Pages, Scattered
from ..wire.protocol import encode_parts
from .adaptive import MARGIN, AutoPolicy, Stopwatch
from .entropy import MIN_RUN, incompressible_batch, runs
from .holes import HoleMap
from .receiver_copy import ReceiverCopy
from .source import SourceImage

RING = 3  # gather buffers per worker: one being filled, up to two raw batches waiting for the network thread
MAX_PARTS = 64  # views of the mapping one frame's data may be sent from; more, and the pages are copied instead

Batch = tuple[int, int] | np.ndarray  # (start, count) of consecutive pages, or sorted page numbers


@dataclass
class EncodedBatch:
    """One batch as it goes on the wire: usually one frame; a batch that mixes incompressible pages with others is
    split into a frame per run (entropy.py), all sent with one sendmsg."""

    frames: list[Pages]
    release: Callable[[], None] | None  # hands a raw batch's buffer back to its worker, once sent
    # Encoded by the worker, header and CRC included: the CRC of a 1 MiB batch is work the single network thread
    # would otherwise do while the workers wait for it.
    parts: list[bytes | bytearray | memoryview] = field(init=False)

    def __post_init__(self) -> None:
        self.parts = [part for frame in self.frames for part in encode_parts(frame)]


_DONE = None


@dataclass(eq=False)
class SendPipeline:
    """Long-lived workers; each pass feeds them a list of batch ranges and takes back as many encoded batches."""

    source: SourceImage
    codec: codecs.Codec
    level: int
    threads: int
    batch_pages: int
    failure: Failure
    auto: AutoPolicy | None = None
    sent: ReceiverCopy | None = None

    def __post_init__(self) -> None:
        # What was sent: the fingerprint of the copy of each page that went on the wire (digest.py).
        self.sent = self.sent if self.sent is not None else ReceiverCopy(self.source.pages)
        self._work: queue.Queue[tuple[Batch, HoleMap, bool] | None] = queue.Queue(maxsize=self.threads * 4)
        self.out: queue.Queue[EncodedBatch] = queue.Queue(maxsize=self.threads * 2)
        self._workers: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._zero_fp = zero_fingerprint(self.source.page_size)

    @property
    def fingerprints(self) -> np.ndarray:
        return self.sent.as_array()

    def start(self) -> None:
        for i in range(self.threads):
            self._workers.append(spawn(f"compress-{i}", self._worker, self.failure))

    def feed(self, ranges: list[Batch], frozen: bool = False) -> None:
        """Start a reader thread that hands ``ranges`` to the workers; the caller takes len(ranges) batches.

        ``frozen``: the source must not change during this pass (plain mode, a paused guest), so raw batches may be
        sent straight from the mapping (module docstring)."""
        if self._reader is not None:
            self._reader.join()
        self._reader = spawn("reader", lambda: self._read(ranges, frozen), self.failure)

    def stop(self, timeout: float = 5.0) -> None:
        """Let the workers exit (after the last pass, or on failure) and wait for them."""
        stop_workers(self._work, self._workers, self.failure, self._reader, timeout)

    # -- threads -------------------------------------------------------------------------------------------------

    def _read(self, batches: list[Batch], frozen: bool) -> None:
        holes = HoleMap(self.source.data_extents())  # once per pass: a hole filled since is caught by the dirty scan
        for item in batches:
            put(self._work, (item, holes, frozen), self.failure)

    def _worker(self) -> None:
        ps = self.source.page_size
        compressor = None if self.codec.wire_id == Encoding.RAW else self.codec.compressor(self.level)
        free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(RING):
            free.put(np.empty(self.batch_pages * ps, dtype=np.uint8))
        while (item := get(self._work, self.failure)) is not _DONE:
            put(self.out, self._encode(item, free, compressor), self.failure)

    def _encode(
        self, work: tuple[Batch, HoleMap, bool], free: queue.SimpleQueue[np.ndarray], compressor: Compressor | None
    ) -> EncodedBatch:
        item, holes, frozen = work
        ps = self.source.page_size
        gathered = not isinstance(item, tuple)
        # Which pages to read: a page in a hole of the image is a zero page without being read.
        if isinstance(item, tuple):
            data_runs = holes.runs(item[0], item[0] + item[1])
            in_hole = not data_runs
        else:
            data = holes.mask(item)  # None: every page holds data
            in_hole = data is not None and not data.any()
        if in_hole:
            return self._hole_batch(item)
        # The buffer first: waiting for it can take long (backpressure), and the mapping is read only after.
        buf = get(free, self.failure)
        self.source.check_size()  # one fstat per batch, instead of a SIGBUS on a truncated file
        pages2d = self.source.array.reshape(self.source.pages, ps)
        raw_link = compressor is None or (self.auto is not None and self.auto.link_faster())
        if frozen and raw_link:
            if isinstance(item, tuple):
                in_place = self._in_place(np.arange(item[0], item[0] + item[1]), None, data_runs)
            else:
                in_place = self._in_place(item, item.astype(">u8").tobytes(), _page_runs(item, data))
            if in_place is not None:
                free.put(buf)
                return in_place
        if isinstance(item, tuple):  # a contiguous range: scan the live mapping, copy out only non-zero pages
            start, count = item
            ids = np.arange(start, start + count)
            region = pages2d[start : start + count]
            indices = None
            if data_runs == [(start, start + count)]:
                nonzero = _nonzero_pages(region)
            else:  # partly in a hole: only its data pages are scanned (and, below, copied)
                nonzero = np.zeros(count, dtype=bool)
                for first, end in data_runs:
                    nonzero[first - start : end - start] = _nonzero_pages(pages2d[first:end])
        else:  # scattered pages (a later pass): gathering them is the copy out of the mapping
            ids, count = item, len(item)
            start = int(ids[0])
            read = ids if data is None else ids[data]  # a page in a hole is not gathered
            region = buf[: read.size * ps].reshape(read.size, ps)
            np.take(pages2d, read, axis=0, out=region, mode="clip")  # "clip": one copy (below)
            indices = ids.astype(">u8").tobytes()
            read_nonzero = _nonzero_pages(region)
            if data is None:
                nonzero = read_nonzero
            else:
                nonzero = np.zeros(count, dtype=bool)
                nonzero[data] = read_nonzero
        normal = int(np.count_nonzero(nonzero))
        bitmap = np.packbits(~nonzero, bitorder="little").tobytes()
        self.sent.record(ids[~nonzero], self._zero_fp)
        if normal == 0:
            free.put(buf)
            return EncodedBatch([Pages(start, count, Encoding.RAW, bitmap, b"", indices)], None)
        if not gathered:
            copy = buf[: normal * ps].reshape(normal, ps)
            if normal == count and frozen:
                copy = region  # compressed straight from the mapping: nothing may change it (module docstring)
            elif normal == count:
                np.copyto(copy, region)
            else:
                # mode="clip": with the default "raise" (np.compress too) numpy copies ``out`` into a temporary
                # and back, three copies of the batch instead of one (perf: 4% of the sender). Indices are valid.
                np.take(region, np.flatnonzero(nonzero), axis=0, out=copy, mode="clip")
        else:
            if normal < region.shape[0]:
                region[:normal] = region[read_nonzero]  # compact in place (the right side is a temporary copy)
            copy = region[:normal]
        # Fingerprints of the copy that goes on the wire, never of the live page (docs/ARCHITECTURE.md).
        normal_fps = np.empty(normal, dtype=np.uint64)
        fingerprint_pages(copy.reshape(-1), ps, normal_fps)
        self.sent.record(ids[nonzero], normal_fps)
        flat = copy.reshape(-1)
        # auto on a link faster than the compressors (loopback, LAN): raw, before any other work on the batch
        if compressor is None or raw_link:
            frame = Pages(start, count, Encoding.RAW, bitmap, memoryview(flat), indices, _wire(normal_fps))
            return EncodedBatch([frame], partial(free.put, buf))
        if not self.codec.skips_incompressible and normal >= 2 * MIN_RUN:
            segments = runs(incompressible_batch(copy))
        else:
            segments = [(0, normal, False)]
        frames = self._frames_by_run(compressor, item, nonzero, flat, normal_fps, segments)
        if all(frame.encoding != Encoding.RAW or not frame.data for frame in frames):
            free.put(buf)
            return EncodedBatch(frames, None)
        return EncodedBatch(frames, partial(free.put, buf))

    def _in_place(self, ids: np.ndarray, indices: bytes | None, read: list[tuple[int, int]]) -> EncodedBatch | None:
        """A raw batch of a frozen source, sent from the mapping: its non-zero pages as views of it (no copy),
        fingerprinted there. ``read`` are the runs of the batch's pages [first, end) that hold data (the others lie
        in holes: zero pages). None when the non-zero pages lie in more than MAX_PARTS pieces: copy them instead."""
        ps = self.source.page_size
        pages2d = self.source.array.reshape(self.source.pages, ps)
        nonzero = np.zeros(ids.size, dtype=bool)
        pieces: list[tuple[int, int]] = []
        for first, end in read:
            found = _nonzero_pages(pages2d[first:end])
            at = int(np.searchsorted(ids, first))  # where this run of pages sits in the batch
            nonzero[at : at + end - first] = found
            pieces += [(first + lo, first + hi) for lo, hi in true_runs(found)]
            if len(pieces) > MAX_PARTS:
                return None
        fps = np.empty(int(np.count_nonzero(nonzero)), dtype=np.uint64)
        parts, done = [], 0
        for first, end in pieces:
            fingerprint_pages(pages2d[first:end], ps, fps[done : done + end - first])
            parts.append(memoryview(self.source.array[first * ps : end * ps]))
            done += end - first
        self.sent.record(ids[~nonzero], self._zero_fp)
        self.sent.record(ids[nonzero], fps)
        bitmap = np.packbits(~nonzero, bitorder="little").tobytes()
        data: bytes | memoryview | Scattered = b"" if not parts else parts[0] if len(parts) == 1 else Scattered(parts)
        return EncodedBatch([Pages(int(ids[0]), ids.size, Encoding.RAW, bitmap, data, indices, _wire(fps))], None)

    def _hole_batch(self, item: Batch) -> EncodedBatch:
        """A batch that lies entirely in holes of the image: all zero pages, framed exactly as if they had been read
        and found zero, without reading them (nor taking a buffer)."""
        self.source.check_size()  # as for any batch: a truncated source fails here, not later
        if isinstance(item, tuple):
            start, count = item
            ids: np.ndarray | slice = slice(start, start + count)
            indices = None
        else:
            ids, start, count = item, int(item[0]), len(item)
            indices = item.astype(">u8").tobytes()
        self.sent.record(ids, self._zero_fp)
        bitmap = np.packbits(np.ones(count, dtype=bool), bitorder="little").tobytes()
        return EncodedBatch([Pages(start, count, Encoding.RAW, bitmap, b"", indices)], None)

    def _frame(
        self,
        compressor: Compressor,
        start: int,
        count: int,
        bitmap: bytes,
        indices: bytes | None,
        data: np.ndarray,
        fingerprints: bytes,
        raw: bool,
    ) -> Pages:
        """One frame: ``data`` (its non-zero pages) compressed, or raw when it looks incompressible or would not
        shrink. A raw frame's data is a view of the worker's buffer (or of a frozen source's mapping)."""
        if raw and self.auto is not None:
            self.auto.note_incompressible()
        packed = None if raw else self._compress(compressor, data, self.source.page_size)
        if packed is not None and len(packed) < data.size:
            return Pages(start, count, self.codec.wire_id, bitmap, packed, indices, fingerprints)
        return Pages(start, count, Encoding.RAW, bitmap, memoryview(data), indices, fingerprints)

    def _frames_by_run(
        self,
        compressor: Compressor,
        item: Batch,
        nonzero: np.ndarray,
        flat: np.ndarray,
        fingerprints: np.ndarray,
        segments: list[tuple[int, int, bool]],
    ) -> list[Pages]:
        """A frame per run of the batch's non-zero pages (usually one run: the whole batch); each run's zero pages
        travel in the frame before it."""
        ps = self.source.page_size
        positions = np.flatnonzero(nonzero)  # where in the batch each non-zero page sits
        count = nonzero.size
        frames = []
        for first, end, raw in segments:
            lo = 0 if first == 0 else int(positions[first])
            hi = count if end == positions.size else int(positions[end])
            bitmap = np.packbits(~nonzero[lo:hi], bitorder="little").tobytes()
            if isinstance(item, tuple):
                start, indices = item[0] + lo, None
            else:
                start, indices = int(item[lo]), item[lo:hi].astype(">u8").tobytes()
            data = flat[first * ps : end * ps]
            fps = _wire(fingerprints[first:end])
            frames.append(self._frame(compressor, start, hi - lo, bitmap, indices, data, fps, raw))
        return frames

    def _compress(self, compressor: Compressor, flat: np.ndarray, ps: int) -> bytes | None:
        """Compress a batch (None: send it raw). With --compress auto, only when it pays (adaptive.py).

        zlib first compresses a sample of the batch (4 pages spread over it) and sends the batch raw when the sample
        does not shrink: random or already-compressed pages cost zlib-ng ~85 MB/s a core for a ratio of 0.95
        (zstd makes this check itself, at ~4 GB/s). A wrong guess costs ratio, never correctness.
        """
        if self.auto is None:
            if self.codec.wire_id == Encoding.ZLIB and sample_ratio(compressor, flat, ps) <= 1 + MARGIN:
                return None
            return compressor.compress(flat)
        if not self.auto.worth_compressing(sample_ratio(compressor, flat, ps)):
            return None
        watch = Stopwatch()
        packed = compressor.compress(flat)
        self.auto.note_compression(flat.size, watch.elapsed())
        return packed


def sample_ratio(compressor: Compressor, flat: np.ndarray, ps: int) -> float:
    """Compression ratio of up to 4 pages spread over the batch, each compressed on its own: how the pipeline decides
    that a zlib batch goes raw (SendPipeline._compress; the downtime estimate applies the same rule). They go through
    the worker's own compressor: Z_FULL_FLUSH leaves no state behind."""
    pages = flat.size // ps
    samples = [flat[i * ps : (i + 1) * ps] for i in sorted({0, pages // 4, pages // 2, 3 * pages // 4})]
    return sum(s.size for s in samples) / max(1, sum(len(compressor.compress(s)) for s in samples))


def _wire(fingerprints: np.ndarray) -> bytes:
    """Fingerprints as a frame carries them: 8 bytes little-endian each."""
    return fingerprints.astype("<u8", copy=False).tobytes()


def _page_runs(ids: np.ndarray, data: np.ndarray | None) -> list[tuple[int, int]]:
    """Runs [first, end) of consecutive page numbers among ``ids`` that hold data (``data``: None, all of them)."""
    read = ids if data is None else ids[data]
    return [(int(read[lo]), int(read[hi - 1]) + 1) for lo, hi in run_bounds(read)]


def _nonzero_pages(region: np.ndarray) -> np.ndarray:
    """Which rows (pages) of ``region`` hold a non-zero byte."""
    # OR-reducing the 64-bit words of each page is ~1.5x faster than .any(axis=1), which casts every word to bool.
    return np.bitwise_or.reduce(region.view(np.uint64), axis=1) != 0


def batch_ranges(pages: np.ndarray, batch_pages: int) -> list[Batch]:
    """Cover sorted page indices with batches of at most ``batch_pages`` pages.

    A chunk of consecutive pages becomes a (start, count) range (a PAGES frame); a chunk with gaps stays a list
    of page numbers (a PAGE_LIST frame), so scattered dirty pages still travel in full-size batches.
    """
    batches: list[Batch] = []
    for lo in range(0, pages.size, batch_pages):
        chunk = pages[lo : lo + batch_pages]
        first, last = int(chunk[0]), int(chunk[-1])
        batches.append((first, chunk.size) if last - first + 1 == chunk.size else chunk.astype(np.int64))
    return batches


def all_ranges(total_pages: int, batch_pages: int) -> list[Batch]:
    return [(s, min(batch_pages, total_pages - s)) for s in range(0, total_pages, batch_pages)]
