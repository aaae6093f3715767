"""The network side of a receiving attempt: one reader per channel puts PAGES into the pipeline (pipeline.py) and
PASS_END into the pass barrier; END on channel 0 ends the transfer.

    channel 0 (calling thread) ─┐                      ┌─> decompression workers ─> DEST
    channel 1..N-1 (threads)  ──┴─> RecvPipeline.submit ┤
                  PASS_END ─────> PassBarrier ──────────┘ (drain: every batch of the pass applied)

The readers are the data path: nothing per frame beyond validating it and handing it on (the lifecycle is read
only when a channel closes, to tell the sender's closing after END from a fault).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from ..errors import MigrateError, NetworkError, ProtocolError, peer_abort
from ..failure import Failure, spawn
from ..net.transport import Channel
from ..stats import Stats
from ..wire import codec as codecs
from ..wire.frames import Abort, End, Hello, Pages, PassEnd
from ..wire.protocol import validate_pages
from .destination import DestinationImage, InPlaceDestination
from .discard import DiscardSink
from .lifecycle import Lifecycle, Phase
from .pipeline import RecvPipeline


class PassBarrier:
    """PASS_END from every channel closes a pass: the last channel to arrive waits for the workers to apply every
    batch of the pass, then releases the others. Only then may any batch of the next pass be applied."""

    def __init__(self, channels: int, pipeline: RecvPipeline, failure: Failure, on_pass: Callable[[int, int], None]):
        self.channels = channels
        self.pipeline = pipeline
        self.failure = failure
        self.on_pass = on_pass
        self._cond = threading.Condition()
        self._arrived = 0
        self._batches = 0
        self.completed = 0  # the last pass every channel finished

    def arrive(self, number: int, announced: int, carried: int) -> None:
        if announced != carried:
            raise ProtocolError(f"PASS_END {number} reports {announced} batches, but this channel carried {carried}")
        with self._cond:
            if number != self.completed + 1:
                raise ProtocolError(f"PASS_END {number} arrived while pass {self.completed + 1} is open")
            self._arrived += 1
            self._batches += carried
            if self._arrived == self.channels:
                self.pipeline.drain()
                self.pipeline.new_pass()
                self.completed, self._arrived = number, 0
                self.on_pass(number, self._batches)
                self._batches = 0
                self._cond.notify_all()
                return
            while self.completed < number:
                self.failure.raise_if_set()
                self._cond.wait(0.2)


@dataclass(eq=False)
class Transfer:
    """Frames from every channel of an admitted sender until END; raises the first error of any reader or worker."""

    dest: DestinationImage | InPlaceDestination | DiscardSink
    hello: Hello
    codec: codecs.Codec
    channels: list[Channel]
    threads: int
    stats: Stats
    failure: Failure
    lifecycle: Lifecycle
    on_pass: Callable[[int, int], None]

    def __post_init__(self) -> None:
        self.pipeline = RecvPipeline(
            self.dest, self.codec, self.threads, self.hello.batch_pages, self.stats, self.failure
        )
        self.barrier = PassBarrier(len(self.channels), self.pipeline, self.failure, self.on_pass)

    def run(self) -> End:
        """Read every channel (channel 0 on the calling thread) until END, wait for the workers, check END's count."""
        pipeline, failure = self.pipeline, self.failure
        pipeline.start()
        for channel in self.channels[1:]:
            spawn(f"channel-{channel.index}", partial(self._read_channel, channel), failure)
        try:
            end = self._read_channel(self.channels[0])
            assert end is not None
            pipeline.finish()
            self.stats.begin_pass(max(1, self.barrier.completed), 0)  # the report names the last pass, not the next
        except BaseException as exc:
            if isinstance(exc, MigrateError) and exc.resumable and not failure.is_set():
                # The link failed, not the data: apply the batches that arrived intact (CRC-checked, queued) so
                # that a resume does not send them again. A worker's own error still wins.
                with contextlib.suppress(MigrateError):
                    pipeline.finish()
            failure.set(exc)  # first error wins: if a worker failed first, that one is kept
            pipeline.abandon()
            raise
        if end.total_pages != self.dest.pages or end.batches != pipeline.batches:
            raise ProtocolError(
                f"END frame reports {end.total_pages} pages in {end.batches} batches, "
                f"but {self.dest.pages} pages in {pipeline.batches} batches were expected/received"
            )
        return end

    def _read_channel(self, channel: Channel) -> End | None:
        """Read one channel's frames: batches to the workers, PASS_END to the barrier; END (channel 0) ends it."""
        hello, pipeline, barrier, failure, stats = self.hello, self.pipeline, self.barrier, self.failure, self.stats
        total_pages, carried = self.dest.pages, 0
        while True:
            failure.raise_if_set()
            try:
                frame, wire = channel.read_frame(pipeline.alloc, head_only=True)
            except NetworkError:
                if not self.lifecycle.transferring:
                    return None  # END arrived: the sender closes its other channels once the migration is over
                failure.raise_if_set()  # woken by a worker's failure: report that, not the wake-up
                raise
            if isinstance(frame, Pages):
                try:
                    validate_pages(frame, hello.page_size, total_pages, hello.batch_pages)
                except ProtocolError:
                    pipeline.release_current()
                    raise
                pipeline.receive(frame, channel, wire)
                carried += 1
            elif isinstance(frame, PassEnd):
                stats.add_wire(wire)
                barrier.arrive(frame.number, frame.batches, carried)
                carried = 0
            elif isinstance(frame, End):
                if channel.index != 0:
                    raise ProtocolError(f"END frame on channel {channel.index}: it belongs on channel 0")
                stats.add_wire(wire)
                self.lifecycle.move(Phase.VERIFYING)
                return frame
            elif isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            else:
                stats.add_wire(wire)
