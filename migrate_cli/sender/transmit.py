"""Sending one pass over every channel: the network side of the sender.

A pass is a list of batch ranges fed to the pipeline (send_pipeline.py). The calling thread drives channel 0 and one
short-lived ``send-i`` thread drives each other channel: all take encoded batches from the same out queue, claim
them from one per-pass counter, charge the one token bucket, and count each batch in the statistics once it is on
the wire. Then every channel sends PASS_END with the number of batches it carried (the receiver's barrier adds
them up). Any channel can carry any batch: batches are self-contained.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..errors import SourceError
from ..failure import Failure, spawn
from ..net.transport import Channel
from ..ratelimit import TokenBucket
from ..stats import Stats
from ..wire.frames import Encoding, Keepalive, PassEnd
from ..wire.protocol import pages_wire_size
from .adaptive import AutoPolicy, Stopwatch
from .pipeline import SendPipeline, all_ranges, batch_ranges
from .precopy import PassRecord
from .source import SourceImage

KEEPALIVE_INTERVAL = 0.5  # as the receiver's: any --io-timeout >= 1s holds on a healthy link


class PassShare:
    """The batches of a pass still to be claimed by the channels' senders (one lock, one decrement a batch)."""

    def __init__(self, batches: int) -> None:
        self._left = batches
        self._lock = threading.Lock()

    def claim(self) -> bool:
        with self._lock:
            if self._left == 0:
                return False
            self._left -= 1
            return True


@dataclass
class ChannelTotals:
    batches: int = 0
    normal: int = 0
    wire: int = 0


@dataclass(eq=False)
class PassSender:
    channels: list[Channel]
    pipeline: SendPipeline
    source: SourceImage
    bucket: TokenBucket
    stats: Stats
    failure: Failure
    auto: AutoPolicy | None

    def __post_init__(self) -> None:
        self.batches = 0  # batches sent by the last call to send()

    def send(
        self, number: int, pages: np.ndarray | None, paused: bool, throttle: int, frozen: bool = False
    ) -> PassRecord:
        """Send pass ``number``: every page (``pages`` None) or the given ones; returns its record. ``frozen``: the
        source must not change meanwhile, so raw pages may go from its mapping without a copy (pipeline.py)."""
        source, pipeline = self.source, self.pipeline
        if pages is None:
            ranges = all_ranges(source.pages, pipeline.batch_pages)
        else:
            ranges = batch_ranges(pages, pipeline.batch_pages)
        page_count = source.pages if pages is None else int(pages.size)
        self.stats.begin_pass(number, page_count * source.page_size)
        started = time.monotonic()
        pipeline.sent.begin_pass()
        pipeline.feed(ranges, frozen)
        return self.carry(number, len(ranges), page_count, started, paused, throttle)

    def carry(
        self, number: int, batches: int, page_count: int, started: float, paused: bool = False, throttle: int = 0
    ) -> PassRecord:
        """Put the ``batches`` encoded batches of pass ``number`` already fed to the pipeline on the channels, then
        PASS_END on each (a snapshot source feeds its stored frames: snapshot/send.py)."""
        source = self.source
        share = PassShare(batches)
        totals = [ChannelTotals() for _ in self.channels]
        threads = [
            spawn(f"send-{i}", partial(self._send_share, each, share, totals[i]), self.failure)
            for i, each in enumerate(self.channels[1:], start=1)
        ]
        try:
            self._send_share(self.channels[0], share, totals[0])
        finally:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
        self.failure.raise_if_set()
        for each, total in zip(self.channels, totals, strict=True):
            sent = each.send_frame(PassEnd(number, total.batches))
            total.wire += sent
            self.stats.add_wire(sent)
        self.batches = sum(total.batches for total in totals)  # frames: a split batch counts each of its frames
        return PassRecord(
            number=number,
            pages=page_count,
            normal_pages=sum(t.normal for t in totals),
            image_bytes=page_count * source.page_size,
            wire_bytes=sum(t.wire for t in totals),
            duration=time.monotonic() - started,
            dirty_pages=page_count,
            dirty_rate=0.0,
            expected_downtime=None,
            throttle=throttle,
            paused=paused,
        )

    def _send_share(self, channel: Channel, share: PassShare, totals: ChannelTotals) -> None:
        """Send batches of the current pass on ``channel`` until the pass has none left to claim."""
        stats = self.stats

        def keep_alive() -> None:  # while waiting for a batch, or for the cap to let one go
            if time.monotonic() - channel.last_send >= KEEPALIVE_INTERVAL:
                stats.add_wire(channel.send_frame(Keepalive()))

        while share.claim():
            while True:
                self.failure.raise_if_set()
                try:
                    batch = self.pipeline.out.get(timeout=0.1)  # short: a cancel is noticed within 100 ms
                    break
                except queue.Empty:
                    keep_alive()
            frames = batch.frames
            watch = Stopwatch()
            self.bucket.consume(sum(pages_wire_size(f) for f in frames), self.failure.event, keep_alive)
            try:
                sent = channel.send_parts(batch.parts)
            except SourceError:
                self.source.check_size()  # name the truncation (sizes) when that is what made the mapping unreadable
                raise
            if self.auto is not None:
                self.auto.note_wire(sent, watch.elapsed())
            stats.add_wire(sent)
            for frame in frames:
                # Counted once on the wire, not when encoded: progress never runs ahead of what was sent.
                stats.add_batch(frame.zero_count, frame.normal_count, len(frame.data), frame.encoding == Encoding.RAW)
                totals.normal += frame.normal_count
            if batch.release:
                batch.release()
            totals.batches += len(frames)
            totals.wire += sent
