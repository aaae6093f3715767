"""The pass loop's decisions, on a fake clock with a scripted tracker: when to switch over, when to give up."""

from __future__ import annotations

import numpy as np
import pytest

from migrate_cli.errors import ControlError, NoConvergence
from migrate_cli.ratelimit import TokenBucket
from migrate_cli.sender.downtime import DowntimeEstimator, SwitchoverCost
from migrate_cli.sender.precopy import ConvergencePolicy, Decision, PassRecord, Precopy
from migrate_cli.stats import Stats
from migrate_cli.wire import codec as codecs

PS = 4096


def test_the_policy_switches_over_under_the_downtime_limit_and_gives_up_at_its_limits() -> None:
    policy = ConvergencePolicy(downtime_limit=0.3, max_passes=5, max_time=10.0)
    assert policy.decide(0.2, passes_done=1, elapsed=1) is Decision.SWITCHOVER
    assert policy.decide(0.5, passes_done=1, elapsed=1) is Decision.CONTINUE
    assert policy.decide(0.5, passes_done=5, elapsed=1) is Decision.GIVE_UP
    assert policy.decide(0.5, passes_done=2, elapsed=10) is Decision.GIVE_UP
    assert policy.decide(5.0, passes_done=9, elapsed=99, forced=True) is Decision.SWITCHOVER, "vmmig ctl switchover"


class ScriptedTracker:
    name = "scripted"

    def __init__(self, dirty_counts: list[int]) -> None:
        self.dirty_counts = dirty_counts

    def start(self) -> None:
        pass

    def scan(self) -> np.ndarray:
        return np.arange(self.dirty_counts.pop(0) if len(self.dirty_counts) > 1 else self.dirty_counts[0])

    def live_fingerprints(self) -> np.ndarray:
        return np.zeros(1, dtype=np.uint64)


class FakeWorld:
    """A link of ``rate`` bytes/s on a fake clock, and a guest whose pause is recorded."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.now = 0.0
        self.paused_at: float | None = None
        self.sent: list[int] = []

    def clock(self) -> float:
        return self.now

    def send_pass(self, number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
        count = 1000 if pages is None else int(pages.size)
        self.sent.append(count)
        duration = count * PS / self.rate
        self.now += duration
        return PassRecord(number, count, count, count * PS, count * PS, duration, count, 0.0, None, 0, paused)

    def pause(self) -> None:
        self.paused_at = self.now

    def resume(self) -> None:
        raise AssertionError("not expected")


def precopy(world: FakeWorld, tracker: ScriptedTracker, abort: bool = True, **policy: float) -> Precopy:
    world.description = "fake"  # type: ignore[attr-defined]
    # Random pages sent raw: each costs its 4096 bytes, its fingerprint and its index; the pass rate is the link's.
    pages = np.random.default_rng(1).integers(0, 256, (1000, PS), dtype=np.uint8)
    estimator = DowntimeEstimator(pages, codecs.by_name("none"), 0, TokenBucket(None), SwitchoverCost())
    return Precopy(
        ConvergencePolicy(**policy),  # type: ignore[arg-type]
        tracker,
        world.send_pass,
        world,  # type: ignore[arg-type]
        PS,
        Stats(image_bytes=1000 * PS, page_size=PS),
        abort_on_no_converge=abort,
        estimator=estimator,
        clock=world.clock,
    )


def test_passes_shrink_until_the_rest_fits_then_pause_and_send_the_rest() -> None:
    world = FakeWorld(rate=4096 * 1000)  # 1000 pages/s: 100 pages = 0.1 s
    result = precopy(world, ScriptedTracker([500, 200, 50, 10]), downtime_limit=0.1).run()
    # 50 dirty pages take 0.05 s + 0.033 s of switchover cost: that fits 0.1 s, so the guest is paused and the
    # exact post-pause scan (10 pages) is what the last pass sends.
    assert world.sent == [1000, 500, 200, 10]
    assert world.paused_at is not None and result.passes[-1].paused
    assert result.converged


def test_no_convergence_with_abort_raises_and_never_pauses() -> None:
    world = FakeWorld(rate=4096 * 1000)
    with pytest.raises(NoConvergence, match="did not converge after 3 passes"):
        precopy(world, ScriptedTracker([800]), downtime_limit=0.1, max_passes=3).run()
    assert world.paused_at is None


def test_no_convergence_with_switchover_pauses_anyway() -> None:
    world = FakeWorld(rate=4096 * 1000)
    result = precopy(world, ScriptedTracker([800]), abort=False, downtime_limit=0.1, max_passes=3).run()
    assert world.paused_at is not None and not result.converged
    assert world.sent == [1000, 800, 800, 800]


def test_a_switchover_requested_by_the_operator_pauses_at_the_next_decision_whatever_the_estimate() -> None:
    world = FakeWorld(rate=4096 * 1000)
    loop = precopy(world, ScriptedTracker([800]), downtime_limit=0.1, max_passes=30)
    sent = world.send_pass

    def send_then_request(number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
        if number == 2:
            loop.request_switchover()  # as `vmmig ctl SOCKET switchover` does while pass 2 is under way
        return sent(number, pages, paused)

    loop.send_pass = send_then_request
    result = loop.run()
    assert world.sent == [1000, 800, 800], "pass 2 ends, the next decision pauses, the paused pass sends the rest"
    assert result.passes[-1].paused and not result.converged, "forced: the estimate (0.8 s) did not fit 0.1 s"


def test_auto_converge_cannot_be_turned_on_without_a_way_to_throttle_the_guest() -> None:
    loop = precopy(FakeWorld(rate=4096 * 1000), ScriptedTracker([10]), downtime_limit=0.1)
    with pytest.raises(ControlError, match="needs --pause-pid or --qmp"):
        loop.set_auto_converge(True)


class RecordingThrottle:
    def __init__(self) -> None:
        self.percentage = 0
        self.released = 0

    def step_up(self) -> int:
        self.percentage = 20 if self.percentage == 0 else self.percentage + 10
        return self.percentage

    def release(self) -> None:
        self.released += 1
        self.percentage = 0


def test_auto_converge_turned_on_mid_run_throttles_at_the_next_fast_scan_and_off_releases_the_guest() -> None:
    world = FakeWorld(rate=4096 * 1000)
    throttle = RecordingThrottle()
    loop = precopy(world, ScriptedTracker([900, 900, 900, 10]), downtime_limit=0.1)
    loop.make_throttle = lambda: throttle  # type: ignore[assignment,return-value]
    sent = world.send_pass
    seen: list[int] = []

    def send(number: int, pages: np.ndarray | None, paused: bool) -> PassRecord:
        seen.append(throttle.percentage)
        if number == 2:
            loop.set_auto_converge(True)
        if number == 3:
            loop.set_auto_converge(False)
        return sent(number, pages, paused)

    loop.send_pass = send
    loop.run()
    # Pass 3 runs throttled (turned on during pass 2, stepped at the scan after it); off during pass 3 releases it.
    assert seen == [0, 0, 20, 0, 0]
    assert throttle.released >= 1
