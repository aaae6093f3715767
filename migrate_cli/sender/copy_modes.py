"""The copy, by mode; each returns the digest END commits to.

- plain (no --live, no pause option): one pass, then a re-scan; if any page changed meanwhile the run fails (the
  image was not quiescent) and DEST is not published;
- stop-and-copy (a pause option without --live): pause, one pass, then a re-scan: a page that changed while paused
  fails the run (exit 14) and DEST is not published;
- live (--live): iterative pre-copy (precopy.py), then pause and a last pass; the post-pause scan must match what
  was sent page for page.
A resumed session's first pass sends only what the receiver lacks or holds differently (the dirty scan against the
fingerprints RESUME_STATE reported).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..errors import ExitCode, MigrateError, PauseError, PeerError, SourceError
from ..failure import Failure
from ..guest.pause import GuestThrottle
from ..net.transport import Channel
from ..ratelimit import TokenBucket
from ..stats import Stats
from ..wire.digest import fingerprint_pages
from .adaptive import AutoPolicy
from .dirty import DirtyTracker, FingerprintTracker, SoftDirtyTracker, soft_dirty_supported
from .downtime import DowntimeEstimator, SwitchoverCost
from .guest_hold import GuestHold
from .options import SendOptions
from .pipeline import SendPipeline
from .precopy import ConvergencePolicy, LiveResult, PassRecord, Precopy
from .receiver_copy import ReceiverCopy
from .reporting import SenderReport, notice
from .source import SourceImage
from .transmit import PassSender


@dataclass(eq=False)
class Copy:
    """One session's passes over its channels, by the mode the options choose."""

    opts: SendOptions
    source: SourceImage
    pipeline: SendPipeline
    channels: list[Channel]
    bucket: TokenBucket
    stats: Stats
    failure: Failure
    auto: AutoPolicy | None
    guest: GuestHold
    reporter: SenderReport
    threads: int
    await_landed: Callable[[int], float] = lambda _number: 0.0  # verdict.py: the receiver has pass N in DEST

    def __post_init__(self) -> None:
        self.sent: ReceiverCopy = self.pipeline.sent
        self.batches_sent = 0  # frames of every pass: END tells the receiver how many to expect
        self.live: LiveResult | None = None
        self.precopy: Precopy | None = None  # live: steered by `vmmig ctl` (switchover, auto-converge)
        self._frozen_pass: bool | None = None  # the pass under way reads a source that must not change (paused: True)
        self._paused_pass = False

    def run(self, policy: ConvergencePolicy, resuming: bool) -> bytes:
        tracker = self._make_tracker(resuming)
        # A resumed session starts from what the receiver holds (RESUME_STATE replaced what was sent): its first
        # pass sends only the pages that are missing there or differ, found by the dirty scan.
        first: Callable[[], np.ndarray | None] = tracker.scan if resuming else lambda: None
        if self.opts.live:
            return self._live(policy, tracker, first)
        if self.guest.pauser is not None:
            return self._stop_and_copy(tracker, first)
        return self._plain(tracker, first)

    def _send_pass(self, number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
        passes = PassSender(self.channels, self.pipeline, self.source, self.bucket, self.stats, self.failure, self.auto)
        throttle = self.guest.throttle
        # Plain mode promises a source that does not change, a paused guest cannot: raw pages go from the mapping.
        self._frozen_pass, self._paused_pass = paused or not self.opts.live, paused
        record = passes.send(number, pages, paused, throttle.percentage if throttle else 0, self._frozen_pass)
        self._frozen_pass = None
        self.batches_sent += passes.batches
        if self.opts.live and not paused:
            # Before the next scan, the receiver catches up: what a switchover then waits for at the receiver is
            # the last pass alone, never a backlog of this one (a guest's downtime, docs/LIVE.md). A receiver that
            # is the bottleneck loses nothing by it; the guest keeps running meanwhile.
            record.landing_wait = self.await_landed(number)
        return record

    def blame_source(self, error: MigrateError | None) -> MigrateError | None:
        """The receiver found a page that does not match its fingerprint while a frozen pass was under way: in that
        pass pages go from the mapping, so a source that changed between fingerprint and send fails the check
        exactly as damage in transit would. Tell them apart by the source itself: a page sent in this pass that now
        differs from its fingerprint means the source changed (exit 3; 14 when paused), not a link fault that a
        resume would repeat. None: it was the link."""
        if not (self._frozen_pass and isinstance(error, PeerError) and error.peer_code == ExitCode.INTEGRITY):
            return None
        changed = changed_pages(self.source, self.sent)
        if not changed:
            return None
        if self._paused_pass:
            return self._paused_writes(changed)
        return self._changed_while_sent(changed)

    def _live(self, policy: ConvergencePolicy, tracker: DirtyTracker, first: Callable[[], np.ndarray | None]) -> bytes:
        opts = self.opts
        throttle = None
        if opts.auto_converge:
            throttle = self.guest.start_throttle()
        precopy = Precopy(
            policy, tracker, self._send_pass, self.guest, self.source.page_size, self.stats,
            abort_on_no_converge=opts.on_no_converge == "abort", estimator=self._estimator(), throttle=throttle,
            make_throttle=self._throttle_maker(), notice=notice, on_pass=self.reporter.on_pass, first_pass=first,
        )  # fmt: skip
        self.live = precopy.result
        self.precopy = precopy
        precopy.run()
        # The post-pause scan saw the image as it is while paused; the last pass sent exactly the pages that
        # differed, so what was sent must now equal it page for page. The digest comes from that one scan.
        live = tracker.live_fingerprints()
        if differing := self.sent.differing(live):
            self._wrote_while_paused(differing)
        return self.sent.digest()  # equal to the live fingerprints' now

    def _estimator(self) -> DowntimeEstimator:
        opts, source = self.opts, self.source
        kind = self.guest.pauser.kind if self.guest.pauser is not None else "pid"
        return DowntimeEstimator(
            source.array.reshape(source.pages, source.page_size), self.pipeline.codec, self.pipeline.level,
            self.bucket, SwitchoverCost.for_guest(kind, opts.qemu_handoff), self.auto,
            batch_pages=self.pipeline.batch_pages, threads=self.threads,
        )  # fmt: skip

    def _throttle_maker(self) -> Callable[[], GuestThrottle] | None:
        """How `vmmig ctl set auto-converge on` starts a throttle mid-run (None: no pause option that can)."""
        return (
            None
            if self.opts.pause_pid is None and self.opts.qmp is None and self.opts.libvirt_domain is None
            else self.guest.start_throttle
        )

    def _stop_and_copy(self, tracker: DirtyTracker, first: Callable[[], np.ndarray | None]) -> bytes:
        self.guest.pause()  # every copy is taken while the guest is paused
        self.reporter.on_pass(self._send_pass(1, first(), True))
        # Verify the pause held: a pause that did not stop the writer (the wrong pid, a hook that did nothing)
        # would otherwise publish an image that matches no moment of the source.
        changed = tracker.scan()
        if changed.size:
            self._wrote_while_paused(int(changed.size))
        return self.sent.digest()

    def _plain(self, tracker: DirtyTracker, first: Callable[[], np.ndarray | None]) -> bytes:
        self.reporter.on_pass(self._send_pass(1, first(), False))
        changed = tracker.scan()  # a plain copy: the image must not have changed while it was sent
        if changed.size:
            raise self._changed_while_sent(int(changed.size))
        return self.sent.digest()

    def _changed_while_sent(self, pages: int) -> SourceError:
        return SourceError(
            f"source {self.opts.source} changed while it was sent ({pages} pages differ): "
            "use --live or a pause option (--pause-pid, --qmp, --pause-cmd) for a running guest"
        )

    def _paused_writes(self, pages: int) -> PauseError:
        hint = " (QEMU: use --qmp, a SIGSTOP does not stop in-kernel devices)" if self.opts.pause_pid else ""
        return PauseError(f"{pages} pages changed while the guest was paused: the pause did not stop its writes{hint}")

    def _wrote_while_paused(self, pages: int) -> None:
        raise self._paused_writes(pages)

    def _make_tracker(self, resuming: bool) -> DirtyTracker:
        opts, source, sent = self.opts, self.source, self.sent.as_array()
        if opts.dirty_tracking == "soft-dirty" and resuming:
            notice("a resumed session compares fingerprints with the receiver's: using fingerprint tracking")
        elif opts.dirty_tracking == "soft-dirty":
            assert opts.pause_pid is not None
            if soft_dirty_supported():
                try:
                    return SoftDirtyTracker(opts.pause_pid, opts.source, source.array, source.page_size, sent)
                except (LookupError, ValueError, OSError) as exc:
                    notice(f"soft-dirty tracking unavailable ({exc}): using fingerprint tracking")
            else:
                notice("this kernel does not track soft-dirty pages: using fingerprint tracking")
        return FingerprintTracker(
            source.array, source.page_size, sent, self.threads, source.check_size, source.data_extents
        )


def changed_pages(source: SourceImage, sent: ReceiverCopy, chunk: int = 16384) -> int:
    """How many pages recorded in the pass under way differ now from the fingerprint recorded (an error path:
    gathered copies in chunks are fine)."""
    ids, recorded = sent.recorded_this_pass(), sent.as_array()
    pages2d = source.array.reshape(source.pages, source.page_size)
    changed = 0
    for lo in range(0, ids.size, chunk):
        part = ids[lo : lo + chunk]
        now = np.empty(part.size, dtype=np.uint64)
        fingerprint_pages(pages2d[part], source.page_size, now)
        changed += int(np.count_nonzero(now != recorded[part]))
    return changed
