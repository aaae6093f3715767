"""Iterative pre-copy: the pass loop of a live migration and its convergence decision.

Pass 1 sends every page. Each later pass starts with a scan (dirty.py) for pages whose live content differs from
what was sent, and sends only those. After each scan the expected downtime (downtime.py: switchover cost + the
wire bytes of the dirty pages / the rate the wire achieves) is compared with ``--downtime-limit``: when it fits,
the guest is paused and the last pass goes out. When it does not fit after ``--max-passes`` passes or
``--max-time``, ``--on-no-converge`` decides: switch over anyway (a long downtime, reported), or abort with the
guest still running. `vmmig ctl SOCKET switchover` forces the switchover at the next decision (after the pass
under way).

Auto-converge: while a scan finds the dirty rate at or above half the rate at which dirty pages can be sent
(QEMU's throttle-trigger-threshold of 50%), the guest is throttled: 20% the first time, then +10% per second
elapsed since the last step (QEMU steps once per dirty sync, about every second; our passes can last longer), at
most 99%. `vmmig ctl SOCKET set auto-converge on|off` turns it on or off while the migration runs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np

from ..errors import ControlError, MigrateError, NoConvergence
from ..guest.pause import GuestThrottle, Pauser
from ..stats import Stats
from ..units import format_bytes, format_rate
from .dirty import DirtyTracker
from .downtime import DowntimeEstimator, Estimate, PassCost


@dataclass
class PassRecord:
    number: int
    pages: int  # pages sent in this pass
    normal_pages: int  # of which non-zero (zero pages cost almost nothing to send)
    image_bytes: int
    wire_bytes: int
    duration: float  # seconds spent sending this pass
    dirty_pages: int  # pages the scan before this pass found changed (pass 1: every page)
    dirty_rate: float  # image bytes dirtied per second, measured by that scan
    expected_downtime: float | None  # seconds, estimated after that scan
    throttle: int  # auto-converge percentage in force during the pass
    paused: bool = False  # the final pass, sent with the guest paused
    expected_parts: dict[str, float] | None = None  # ms per term of expected_downtime (downtime.py)
    landing_wait: float = 0.0  # seconds from the pass's end until the receiver reported it in DEST (live)

    def as_json(self) -> dict[str, Any]:
        return {
            "pass": self.number,
            "pages": self.pages,
            "normal-pages": self.normal_pages,
            "image-bytes": self.image_bytes,
            "wire-bytes": self.wire_bytes,
            "duration": round(self.duration * 1000, 3),
            "dirty-pages": self.dirty_pages,
            "dirty-rate": round(self.dirty_rate),
            "expected-downtime": None if self.expected_downtime is None else round(self.expected_downtime * 1000, 3),
            "cpu-throttle-percentage": self.throttle,
            "paused": self.paused,
            "expected-downtime-parts": self.expected_parts,
            "landing-wait": round(self.landing_wait * 1000, 3),
        }


class Decision(Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    GIVE_UP = "give-up"


@dataclass
class ConvergencePolicy:
    downtime_limit: float = 0.3
    max_passes: int = 30
    max_time: float | None = None

    def decide(self, expected: float, passes_done: int, elapsed: float, forced: bool = False) -> Decision:
        if forced or expected <= self.downtime_limit:
            return Decision.SWITCHOVER
        if passes_done >= self.max_passes or (self.max_time is not None and elapsed >= self.max_time):
            return Decision.GIVE_UP
        return Decision.CONTINUE


SendPass = Callable[[int, np.ndarray | None, bool], PassRecord]
"""send_pass(number, pages or None for all, paused) -> record with pages/bytes/duration filled in."""


@dataclass
class LiveResult:
    passes: list[PassRecord] = field(default_factory=list)
    paused_at: float = 0.0
    dirty_syncs: int = 0
    converged: bool = True
    switchover: dict[str, float] = field(default_factory=dict)  # ms per step while the guest is paused


@dataclass(eq=False)
class Precopy:
    policy: ConvergencePolicy
    tracker: DirtyTracker
    send_pass: SendPass
    pauser: Pauser
    page_size: int
    stats: Stats
    abort_on_no_converge: bool
    estimator: DowntimeEstimator
    throttle: GuestThrottle | None = None  # started with --auto-converge
    make_throttle: Callable[[], GuestThrottle] | None = None  # `ctl set auto-converge on`; None: nothing can throttle
    notice: Callable[[str], None] = lambda _msg: None
    on_pass: Callable[[PassRecord], None] = lambda _record: None
    clock: Callable[[], float] = time.monotonic
    first_pass: Callable[[], np.ndarray | None] = lambda: None

    def __post_init__(self) -> None:
        self.result = LiveResult()
        self.auto_converge = self.throttle is not None
        self._last_step: float | None = None
        self._switchover_requested = False
        self._switching = False
        self._throttle_lock = threading.Lock()  # the control thread turns auto-converge on and off

    # --- steering (`vmmig ctl`, from the control thread) -------------------------------------------------------------
    def request_switchover(self) -> None:
        """Pause and finish at the next decision, whatever the estimate says."""
        self._switchover_requested = True

    def set_auto_converge(self, on: bool) -> None:
        with self._throttle_lock:
            if self._switching:
                raise ControlError("too late for auto-converge: the switchover has begun")
            if on and self.throttle is None:
                if self.make_throttle is None:
                    raise ControlError("auto-converge needs --pause-pid or --qmp: nothing here can throttle the guest")
                try:
                    self.throttle = self.make_throttle()
                except MigrateError as exc:  # no rights to the cgroup, a guest gone: this request's error only
                    raise ControlError(str(exc)) from None
            elif not on and self.throttle is not None:
                self.throttle.release()
                self.stats.throttle = 0
                self._last_step = None
            self.auto_converge = on

    def run(self) -> LiveResult:
        """Send passes until switchover; returns with the guest paused and the last pass sent."""
        started = self.clock()
        self.tracker.start()
        self._record(self.send_pass(1, self.first_pass(), False), None)
        previous_scan = started
        while True:
            scan_start = self.clock()
            dirty = self.tracker.scan()
            scan_time = self.clock() - scan_start
            self.result.dirty_syncs += 1
            self.stats.dirty_syncs = self.result.dirty_syncs
            dirty_bytes = int(dirty.size) * self.page_size
            dirty_rate = dirty_bytes / max(scan_start - previous_scan, 1e-6)
            previous_scan = scan_start
            # Pages keep being dirtied until the pause takes hold, about one scan time after this scan.
            estimate = self.estimator.estimate(dirty, dirty_rate * scan_time / self.page_size, scan_time)
            expected, achieved = estimate.seconds, estimate.image_rate
            self.stats.dirty_rate, self.stats.expected_downtime = dirty_rate, expected
            self.stats.achieved_rate = achieved
            forced = self._switchover_requested
            decision = self.policy.decide(expected, len(self.result.passes), self.clock() - started, forced)
            if forced:
                self.result.converged = expected <= self.policy.downtime_limit  # the report says it was forced
                self.notice(f"switching over on request (vmmig ctl switchover): expected downtime {expected:.3f}s")
            if decision is Decision.GIVE_UP:
                self.result.converged = False
                detail = (
                    f"{len(self.result.passes)} passes, {format_bytes(dirty_bytes)} still dirty, expected downtime "
                    f"{expected * 1000:.0f}ms > limit {self.policy.downtime_limit * 1000:.0f}ms "
                    f"(dirty {format_rate(dirty_rate)}, achieved {format_rate(achieved)})"
                )
                if self.abort_on_no_converge:
                    raise NoConvergence(
                        f"did not converge after {detail}; the guest keeps running "
                        "(try a higher --max-bandwidth, --auto-converge, or --on-no-converge switchover)"
                    )
                self.notice(f"did not converge after {detail}: switching over anyway (--on-no-converge switchover)")
                decision = Decision.SWITCHOVER
            if decision is Decision.SWITCHOVER:
                return self._switchover(dirty_rate, estimate)
            self._throttle_step(dirty_rate, achieved, scan_start)
            record = self.send_pass(len(self.result.passes) + 1, dirty, False)
            record.dirty_pages, record.dirty_rate, record.expected_downtime = int(dirty.size), dirty_rate, expected
            record.throttle = self.throttle.percentage if self.throttle else 0
            record.expected_parts = estimate.parts_ms()
            self._record(record, estimate)

    def _throttle_step(self, dirty_rate: float, achieved: float, now: float) -> None:
        with self._throttle_lock:
            if not self.auto_converge or self.throttle is None or dirty_rate < 0.5 * achieved:
                return
            steps = 1 if self._last_step is None else max(1, int(now - self._last_step))
            for _ in range(steps):
                self.stats.throttle = self.throttle.step_up()
            self._last_step = now

    def _switchover(self, dirty_rate: float, estimate: Estimate) -> LiveResult:
        with self._throttle_lock:
            self._switching = True  # a late `ctl set auto-converge on` must not throttle a paused guest
            self.auto_converge = False
            if self.throttle is not None:
                self.throttle.release()
                self.stats.throttle = 0
        self.result.paused_at = started = self.clock()  # downtime counts from the pause request
        self.pauser.pause()  # the sender's GuestHold: it knows from here on that the guest is paused
        paused = self.clock()
        dirty = self.tracker.scan()  # the guest is still: this scan is exact
        scanned = self.clock()
        self.result.dirty_syncs += 1
        self.stats.dirty_syncs = self.result.dirty_syncs
        record = self.send_pass(len(self.result.passes) + 1, dirty, True)
        self.result.switchover = {
            "pause": round((paused - started) * 1000, 3),
            "scan": round((scanned - paused) * 1000, 3),
            "send": round((self.clock() - scanned) * 1000, 3),
        }
        record.dirty_pages, record.dirty_rate = int(dirty.size), dirty_rate
        record.expected_downtime, record.expected_parts = estimate.seconds, estimate.parts_ms()
        record.paused = True
        self._record(record, None)
        return self.result

    def _record(self, record: PassRecord, estimate: Estimate | None) -> None:
        """Keep the pass, and teach the estimator what it cost: its wire rate, and (for a pass whose dirty set was
        sampled) actual against predicted wire bytes."""
        predicted = self.estimator.predicted_per_page if estimate is not None else None
        self.estimator.note_pass(PassCost(record.pages, record.wire_bytes, record.duration), predicted)
        self.result.passes.append(record)
        self.on_pass(record)
