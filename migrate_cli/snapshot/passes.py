"""The passes of `vmmig save`, by mode, with the sender's own pre-copy: only the destination is a file.

``FilePasses.send_pass`` is the seam: the same ``SendPass`` that sender/transmit.py runs over channels, here writing
each batch's frames to the snapshot and pointing the index at each page's latest copy. The modes mirror
sender/copy_modes.py:

- plain (no pause option): one pass; the image must not change (a stopped guest, a copy);
- stop-and-copy (a pause option without --live): pause, one pass, then a re-scan: a page that changed while paused
  fails the save (exit 14);
- live (--live): sender/precopy.py Precopy (passes while the guest runs, the downtime limit, --max-passes,
  --max-time, --on-no-converge), then pause and a last pass; the post-pause scan must match what was written.

An incremental save (--base) starts from the base's fingerprints, as a resumed session starts from the receiver's:
its first pass carries only the pages whose fingerprints differ.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import PauseError
from ..failure import Failure, get
from ..ratelimit import TokenBucket
from ..sender.dirty import FingerprintTracker
from ..sender.downtime import DowntimeEstimator, SwitchoverCost
from ..sender.guest_hold import GuestHold
from ..sender.pipeline import SendPipeline, all_ranges, batch_ranges
from ..sender.precopy import ConvergencePolicy, LiveResult, PassRecord, Precopy
from ..sender.reporting import notice
from ..sender.source import SourceImage
from ..stats import Stats
from ..wire.frames import PassEnd
from ..wire.protocol import encode_parts, pages_wire_size

if TYPE_CHECKING:
    from .writer import Output


@dataclass(frozen=True)
class LivePlan:
    """How the guest is held while it is saved: no pauser is a plain save."""

    live: bool = False
    policy: ConvergencePolicy | None = None
    abort_on_no_converge: bool = True
    pauser_kind: str = "pid"  # for the switchover cost estimate: pid, qmp or command


class FilePasses:
    """Passes of frames into the snapshot: ``send_pass`` for Precopy, the index and counts for the trailer."""

    def __init__(
        self, out: Output, source: SourceImage, pipeline: SendPipeline, failure: Failure, stats: Stats
    ) -> None:
        self.out, self.source, self.pipeline, self.failure, self.stats = out, source, pipeline, failure, stats
        self.index = np.zeros(source.pages, dtype=np.uint64)  # 0: not in this file (in the base)
        self.frames = self.zero_pages = self.passes = 0

    def send_pass(self, number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
        source, pipeline = self.source, self.pipeline
        batch = pipeline.batch_pages
        ranges = all_ranges(source.pages, batch) if pages is None else batch_ranges(pages, batch)
        count = source.pages if pages is None else int(pages.size)
        self.stats.begin_pass(number, count * source.page_size)
        began, start, carried, normal = time.monotonic(), self.out.offset, 0, 0
        pipeline.sent.begin_pass()
        # A paused guest cannot change: raw pages may go from the mapping. Otherwise each worker copies its pages
        # before fingerprinting them, so every frame agrees with its fingerprints while the guest writes.
        pipeline.feed(ranges, frozen=paused)
        for _ in ranges:
            batch = get(pipeline.out, self.failure)
            offset = self.out.offset
            for frame in batch.frames:
                self.index[frame.index_array()] = offset
                offset += pages_wire_size(frame)
                self.zero_pages += frame.zero_count
                normal += frame.normal_count
            carried += len(batch.frames)
            try:
                self.out.write(batch.parts)
            finally:
                if batch.release is not None:
                    batch.release()
        self.failure.raise_if_set()
        self.out.write(encode_parts(PassEnd(number, carried)))
        self.frames += carried
        self.passes = number
        return PassRecord(
            number=number, pages=count, normal_pages=normal, image_bytes=count * source.page_size,
            wire_bytes=self.out.offset - start, duration=time.monotonic() - began, dirty_pages=count,
            dirty_rate=0.0, expected_downtime=None, throttle=0, paused=paused,
        )  # fmt: skip


def run_passes(
    passes: FilePasses, guest: GuestHold, plan: LivePlan, base: np.ndarray | None, threads: int
) -> LiveResult | None:
    """Every pass of the save; returns with the guest paused when it has a pauser. ``base``: the base snapshot's
    fingerprints (incremental), which stand for what was written until a pass writes the page."""
    source, sent = passes.source, passes.pipeline.sent
    if base is not None:
        sent.replace_from(base)
    tracker = FingerprintTracker(
        source.array, source.page_size, sent.as_array(), threads, source.check_size, source.data_extents
    )
    first = tracker.scan if base is not None else (lambda: None)
    if plan.live:
        assert plan.policy is not None and guest.pauser is not None
        pipeline = passes.pipeline
        estimator = DowntimeEstimator(
            source.array.reshape(source.pages, source.page_size), pipeline.codec, pipeline.level, TokenBucket(None),
            SwitchoverCost.for_guest(plan.pauser_kind, False), None, batch_pages=pipeline.batch_pages, threads=threads,
        )  # fmt: skip
        precopy = Precopy(
            plan.policy, tracker, passes.send_pass, guest, source.page_size, passes.stats,
            abort_on_no_converge=plan.abort_on_no_converge, estimator=estimator, notice=notice, first_pass=first,
        )  # fmt: skip
        result = precopy.run()
        if differing := sent.differing(tracker.live_fingerprints()):
            raise _paused_writes(differing)
        return result
    if guest.pauser is not None:
        guest.pause()
        passes.send_pass(1, first(), True)
        if changed := int(tracker.scan().size):  # the pause held: nothing changed while the pass was written
            raise _paused_writes(changed)
        return None
    passes.send_pass(1, first(), False)
    return None


def _paused_writes(pages: int) -> PauseError:
    return PauseError(f"{pages} pages changed while the guest was paused: the pause did not stop its writes")
