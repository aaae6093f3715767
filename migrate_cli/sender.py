"""The sender's data path: a reader that walks the image in batches, and N workers that encode them.

    reader --(batch ranges)--> work queue --> worker 1..N --(EncodedBatch)--> out queue --> network thread

The reader only enumerates batch ranges: it never touches page data and never compresses. Each worker owns, for
its whole life, one compressor and a small ring of gather buffers; per batch it
1. scans the live mapping for zero pages (one vectorised pass),
2. copies the non-zero pages out of the mapping into its own buffer (a guest may write them meanwhile; from here
   on only the copy is used),
3. fingerprints the copy into the shared fingerprint array (disjoint slices: no lock),
4. compresses the copy with one call, and sends it raw instead when that does not shrink it.
A raw batch's buffer travels with it to the network thread, which hands it back after sending.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import codec as codecs
from .digest import fingerprint_pages, zero_fingerprint
from .image import SourceImage
from .pipeline import Failure, Stopped, get, put, spawn
from .protocol import Encoding, Pages
from .stats import Stats

RING = 3  # gather buffers per worker: one being filled, up to two raw batches waiting for the network thread


@dataclass
class EncodedBatch:
    frame: Pages
    release: Callable[[], None] | None  # hands a raw batch's buffer back to its worker, once sent


_DONE = None


class SendPipeline:
    def __init__(
        self,
        source: SourceImage,
        codec: codecs.Codec,
        level: int,
        threads: int,
        batch_pages: int,
        stats: Stats,
        failure: Failure,
    ) -> None:
        self.source = source
        self.codec = codec
        self.level = level
        self.threads = threads
        self.batch_pages = batch_pages
        self.stats = stats
        self.failure = failure
        self.fingerprints = np.empty(source.pages, dtype=np.uint64)
        self.batches = 0
        self._work: queue.Queue[tuple[int, int] | None] = queue.Queue(maxsize=threads * 4)
        self.out: queue.Queue[EncodedBatch | None] = queue.Queue(maxsize=threads * 2)
        self._threads: list[threading.Thread] = []
        self._zero_fp = zero_fingerprint(source.page_size)

    def start(self) -> None:
        ranges = [
            (s, min(self.batch_pages, self.source.pages - s)) for s in range(0, self.source.pages, self.batch_pages)
        ]
        self.batches = len(ranges)
        self._threads.append(spawn("reader", lambda: self._reader(ranges), self.failure))
        for i in range(self.threads):
            self._threads.append(spawn(f"compress-{i}", self._worker, self.failure))

    def join(self, timeout: float = 5.0) -> None:
        for thread in self._threads:
            thread.join(timeout)

    # -- threads -------------------------------------------------------------------------------------------------

    def _reader(self, ranges: list[tuple[int, int]]) -> None:
        for item in ranges:
            put(self._work, item, self.failure)
        for _ in range(self.threads):
            put(self._work, _DONE, self.failure)

    def _worker(self) -> None:
        ps = self.source.page_size
        compressor = None if self.codec.wire_id == Encoding.RAW else self.codec.compressor(self.level)
        free: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        for _ in range(RING):
            free.put(np.empty(self.batch_pages * ps, dtype=np.uint8))
        image = self.source.array
        try:
            while (item := get(self._work, self.failure)) is not _DONE:
                start, count = item
                region = image[start * ps : (start + count) * ps]
                nonzero = region.view(np.uint64).reshape(count, ps // 8).any(axis=1)
                normal = int(np.count_nonzero(nonzero))
                bitmap = np.packbits(~nonzero, bitorder="little").tobytes()
                fps = self.fingerprints[start : start + count]
                if normal == 0:
                    fps[:] = self._zero_fp
                    frame = Pages(start, count, Encoding.RAW, bitmap, b"")
                    put(self.out, EncodedBatch(frame, None), self.failure)
                    continue
                buf = get_free(free, self.failure)
                copy = buf[: normal * ps]
                if normal == count:
                    np.copyto(copy, region)
                else:
                    np.compress(nonzero, region.reshape(count, ps), axis=0, out=copy.reshape(normal, ps))
                    fps[~nonzero] = self._zero_fp
                if normal == count:
                    fingerprint_pages(copy, ps, fps)
                else:
                    normal_fps = np.empty(normal, dtype=np.uint64)
                    fingerprint_pages(copy, ps, normal_fps)
                    fps[nonzero] = normal_fps
                packed = compressor.compress(copy) if compressor is not None else None
                if packed is not None and len(packed) < copy.size:
                    free.put(buf)
                    frame = Pages(start, count, self.codec.wire_id, bitmap, packed)
                    batch = EncodedBatch(frame, None)
                else:
                    frame = Pages(start, count, Encoding.RAW, bitmap, memoryview(copy))
                    batch = EncodedBatch(frame, lambda b=buf: free.put(b))
                put(self.out, batch, self.failure)
        finally:
            # Tell the network thread this worker is done (also on failure, so it never waits forever).
            with contextlib.suppress(queue.Full):
                self.out.put(_DONE, timeout=1.0)


def get_free(free: queue.SimpleQueue[np.ndarray], failure: Failure) -> np.ndarray:
    while True:
        if failure.is_set():
            raise Stopped
        try:
            return free.get(timeout=0.2)
        except queue.Empty:
            continue
