"""The sender's data path: a reader that walks the image in batches, and N workers that encode them.

    reader --(batch ranges)--> work queue --> worker 1..N --(EncodedBatch)--> out queue --> network thread

Workers live for the whole migration; each pass (one for a plain copy, several for a live migration) starts a
reader for its list of ranges. The reader only enumerates batch ranges: it never touches page data and never
compresses. Each worker owns, for its whole life, one compressor and a small ring of gather buffers; per batch it
1. scans the live mapping for zero pages (one vectorised pass),
2. copies the non-zero pages out of the mapping into its own buffer (a guest may write them meanwhile; from here
   on only the copy is used),
3. fingerprints the copy into the shared fingerprint array (disjoint slices: no lock),
4. compresses the copy with one call, and sends it raw instead when that does not shrink it.
A raw batch's buffer travels with it to the network thread, which hands it back after sending.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np

from . import codec as codecs
from .digest import fingerprint_pages, zero_fingerprint
from .image import SourceImage
from .pipeline import Failure, Stopped, get, put, spawn
from .protocol import Encoding, Pages

RING = 3  # gather buffers per worker: one being filled, up to two raw batches waiting for the network thread


@dataclass
class EncodedBatch:
    frame: Pages
    release: Callable[[], None] | None  # hands a raw batch's buffer back to its worker, once sent


_DONE = None


class SendPipeline:
    """Long-lived workers; each pass feeds them a list of batch ranges and takes back as many encoded batches."""

    def __init__(
        self,
        source: SourceImage,
        codec: codecs.Codec,
        level: int,
        threads: int,
        batch_pages: int,
        failure: Failure,
    ) -> None:
        self.source = source
        self.codec = codec
        self.level = level
        self.threads = threads
        self.batch_pages = batch_pages
        self.failure = failure
        # What was sent: the fingerprint of the copy of each page that went on the wire (digest.py).
        self.fingerprints = np.empty(source.pages, dtype=np.uint64)
        self._work: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=threads * 4)
        self.out: queue.Queue[EncodedBatch] = queue.Queue(maxsize=threads * 2)
        self._workers: list[threading.Thread] = []
        self._reader: threading.Thread | None = None
        self._zero_fp = zero_fingerprint(source.page_size)

    def start(self) -> None:
        for i in range(self.threads):
            self._workers.append(spawn(f"compress-{i}", self._worker, self.failure))

    def feed(self, ranges: list[tuple[int, int]]) -> None:
        """Start a reader thread that hands ``ranges`` to the workers; the caller takes len(ranges) batches."""
        if self._reader is not None:
            self._reader.join()
        self._reader = spawn("reader", lambda: self._read(ranges), self.failure)

    def stop(self, timeout: float = 5.0) -> None:
        """Let the workers exit (after the last pass, or on failure) and wait for them."""
        if not self.failure.is_set():
            for _ in self._workers:
                put(self._work, _DONE, self.failure)
        for thread in [*self._workers, *([self._reader] if self._reader else [])]:
            thread.join(timeout)

    # -- threads -------------------------------------------------------------------------------------------------

    def _read(self, ranges: list[tuple[int, int]]) -> None:
        for item in ranges:
            put(self._work, item, self.failure)

    def _worker(self) -> None:
        ps = self.source.page_size
        compressor = None if self.codec.wire_id == Encoding.RAW else self.codec.compressor(self.level)
        free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(RING):
            free.put(np.empty(self.batch_pages * ps, dtype=np.uint8))
        image = self.source.array
        while (item := get(self._work, self.failure)) is not _DONE:
            start, count = item
            region = image[start * ps : (start + count) * ps]
            nonzero = region.view(np.uint64).reshape(count, ps // 8).any(axis=1)
            normal = int(np.count_nonzero(nonzero))
            bitmap = np.packbits(~nonzero, bitorder="little").tobytes()
            fps = self.fingerprints[start : start + count]
            if normal == 0:
                fps[:] = self._zero_fp
                put(self.out, EncodedBatch(Pages(start, count, Encoding.RAW, bitmap, b""), None), self.failure)
                continue
            buf = get_free(free, self.failure)
            copy = buf[: normal * ps]
            if normal == count:
                np.copyto(copy, region)
                fingerprint_pages(copy, ps, fps)
            else:
                np.compress(nonzero, region.reshape(count, ps), axis=0, out=copy.reshape(normal, ps))
                normal_fps = np.empty(normal, dtype=np.uint64)
                fingerprint_pages(copy, ps, normal_fps)
                fps[nonzero] = normal_fps
                fps[~nonzero] = self._zero_fp
            packed = compressor.compress(copy) if compressor is not None else None
            if packed is not None and len(packed) < copy.size:
                free.put(buf)
                batch = EncodedBatch(Pages(start, count, self.codec.wire_id, bitmap, packed), None)
            else:
                batch = EncodedBatch(
                    Pages(start, count, Encoding.RAW, bitmap, memoryview(copy)), partial(free.put, buf)
                )
            put(self.out, batch, self.failure)


def batch_ranges(pages: np.ndarray, batch_pages: int) -> list[tuple[int, int]]:
    """Cover sorted page indices with (start, count) ranges of consecutive pages, at most ``batch_pages`` each."""
    if pages.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    starts = pages[np.concatenate(([0], breaks))]
    ends = pages[np.concatenate((breaks - 1, [pages.size - 1]))] + 1
    ranges: list[tuple[int, int]] = []
    for lo, hi in zip(starts.tolist(), ends.tolist(), strict=True):
        ranges.extend((s, min(batch_pages, hi - s)) for s in range(lo, hi, batch_pages))
    return ranges


def all_ranges(total_pages: int, batch_pages: int) -> list[tuple[int, int]]:
    return [(s, min(batch_pages, total_pages - s)) for s in range(0, total_pages, batch_pages)]


def get_free(free: queue.SimpleQueue[np.ndarray], failure: Failure) -> np.ndarray:
    while True:
        if failure.is_set():
            raise Stopped
        try:
            return free.get(timeout=0.2)
        except queue.Empty:
            continue
