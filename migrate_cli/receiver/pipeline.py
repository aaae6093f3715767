"""The receiver's data path: payload buffers from a fixed pool, N decompression workers writing into DEST.

    network thread --recv_into(pool buffer)--> work queue --> worker 1..N --> DEST mapping
                         ^                                        |
                         +------------- buffer back to pool ------+

A raw frame's data does not go through the pool buffer where the channel and DEST allow: the network thread
splices it from the socket straight into DEST at its pages' offsets (net/splice.py: no user-space copy, measured
0.67x the CPU of recv_into + pwrite), and the worker then only zeroes its zero pages and checks what landed.

The pool is allocated once, sized to the batch the sender announced: no allocation per batch, and when every
buffer is in use the network thread stops reading, which is the backpressure on the sender (bounded memory).
Each worker owns one decompressor for the session's codec for its whole life. Frames are validated against the
session (page range, sizes) by the network thread before they reach a worker.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, replace

import numpy as np

from ..errors import IntegrityError, ProtocolError
from ..failure import Failure, get, put, spawn
from ..net.transport import Channel
from ..stats import Stats
from ..wire import codec as codecs
from ..wire.frames import Encoding, Pages
from ..wire.protocol import Header, max_pages_payload
from .destination import DestinationImage
from .page_check import undecodable

_DONE = None


POOL_BUDGET = 128 * 1024 * 1024  # bytes of payload buffers a receiver holds at most (6 buffers whatever the size)


def pool_count(threads: int, payload_max: int) -> int:
    """Two buffers per worker and two more (one being read, one queued), but at most POOL_BUDGET of them (never
    fewer than 6): a many-core receiver needs no more batches in flight than a few workers decompress at link
    speed, and 64 threads of 4 MiB batches would otherwise pin 520 MiB."""
    return min(threads * 2 + 2, max(6, POOL_BUDGET // payload_max))


class BufferPool:
    def __init__(self, count: int, size: int, failure: Failure) -> None:
        self.size = size
        self.failure = failure
        self._free: queue.SimpleQueue[bytearray] = queue.SimpleQueue()
        for _ in range(count):
            self._free.put(bytearray(size))

    def take(self) -> bytearray:
        return get(self._free, self.failure)

    def give(self, buf: bytearray) -> None:
        self._free.put(buf)


@dataclass(eq=False)
class RecvPipeline:
    dest: DestinationImage
    codec: codecs.Codec
    threads: int
    batch_pages: int
    stats: Stats
    failure: Failure

    def __post_init__(self) -> None:
        payload_max = max_pages_payload(self.batch_pages, self.dest.page_size)
        self.pool = BufferPool(pool_count(self.threads, payload_max), payload_max, self.failure)
        self._work: queue.Queue[tuple[Pages, bytearray, bool] | None] = queue.Queue(maxsize=self.threads * 2)
        self._threads: list[threading.Thread] = []
        self._local = threading.local()  # each channel's reader thread has its own buffer in flight
        self._count_lock = threading.Lock()
        self.batches = 0  # submitted, over all passes and channels
        self._applied = 0
        self._applied_cond = threading.Condition()
        # Pages already carried in the current pass: a page twice in one pass would race between workers.
        self._seen = np.zeros(self.dest.pages, dtype=bool)
        self._seen_lock = threading.Lock()

    def start(self) -> None:
        for i in range(self.threads):
            self._threads.append(spawn(f"decompress-{i}", self._worker, self.failure))

    def alloc(self, header: Header) -> memoryview:
        """Payload buffer for the PAGES frame the network thread is about to read (see Channel.read_frame)."""
        if header.length > self.pool.size:
            raise ProtocolError(
                f"PAGES frame of {header.length} bytes exceeds the announced batch of {self.batch_pages} pages"
            )
        self._local.current = self.pool.take()
        return memoryview(self._local.current)[: header.length]

    def receive(self, frame: Pages, channel: Channel, wire_bytes: int) -> None:
        """Take the validated frame whose head ``channel`` just read (its data still unread) into the buffer from the
        last ``alloc``: land its data in DEST (raw, where DEST and the channel allow) or read it into the buffer,
        then queue it for a worker."""
        buf, self._local.current = self._local.current, None
        assert buf is not None
        if frame.encoding not in (Encoding.RAW, self.codec.wire_id):
            self.pool.give(buf)
            known = ", ".join(f"{c}={int(codecs.by_name(c).wire_id)}" for c in codecs.names())
            raise ProtocolError(
                f"PAGES frame uses codec id {frame.encoding}, but the session announced "
                f"{self.codec.name}={int(self.codec.wire_id)} (known: {known})"
            )
        try:
            self._claim(frame)
            runs = self.dest.landing_runs(frame) if frame.encoding == Encoding.RAW else None
            landed = runs is not None and channel.land_data(self.dest.fd, runs, self.dest.write_at)
            if not landed:
                frame = replace(frame, data=channel.read_data())
        except BaseException:
            self.pool.give(buf)
            raise
        self.stats.add_wire(wire_bytes)
        with self._count_lock:
            self.batches += 1
        put(self._work, (frame, buf, landed), self.failure)

    def _claim(self, frame: Pages) -> None:
        with self._seen_lock:
            if frame.indices is None:
                region = self._seen[frame.start : frame.start + frame.count]
                if region.any():
                    raise ProtocolError(f"page {frame.start + int(np.argmax(region))} sent twice in one pass")
                region[:] = True
            else:
                ids = frame.index_array()
                if self._seen[ids].any():
                    raise ProtocolError(f"page {int(ids[np.argmax(self._seen[ids])])} sent twice in one pass")
                self._seen[ids] = True

    def new_pass(self) -> None:
        """Called at the pass barrier, with every channel waiting: the next pass may carry any page again."""
        with self._seen_lock:
            self._seen[:] = False

    def drain(self) -> None:
        """Block until every submitted batch is written: the pass barrier that makes 'last one wins' hold."""
        with self._applied_cond:
            while self._applied < self.batches:
                self.failure.raise_if_set()
                self._applied_cond.wait(0.2)
        self.failure.raise_if_set()

    def release_current(self) -> None:
        """Give back the buffer of a frame that failed validation."""
        current = getattr(self._local, "current", None)
        if current is not None:
            self.pool.give(current)
            self._local.current = None

    def finish(self) -> None:
        """Wait until every queued batch is written; raises the first worker error."""
        for _ in self._threads:
            put(self._work, _DONE, self.failure)
        for thread in self._threads:
            while thread.is_alive():
                thread.join(0.2)
        self.failure.raise_if_set()

    def abandon(self) -> None:
        for thread in self._threads:
            thread.join(2.0)

    def _worker(self) -> None:
        decompressor = self.codec.decompressor()
        ps = self.dest.page_size
        while (item := get(self._work, self.failure)) is not _DONE:
            frame, buf, landed = item
            try:
                size = frame.normal_count * ps
                try:
                    if landed or frame.encoding == Encoding.RAW:
                        data = frame.data
                    else:
                        data = decompressor.decompress(frame.data, size)
                except IntegrityError as exc:
                    raise undecodable(frame.index_array(), exc) from None
                self.dest.write_batch(frame, data, landed)
                self.stats.add_batch(
                    frame.zero_count, frame.normal_count, len(frame.data), frame.encoding == Encoding.RAW
                )
            finally:
                del frame
                self.pool.give(buf)
            with self._applied_cond:
                self._applied += 1
                self._applied_cond.notify_all()
