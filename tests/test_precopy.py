"""The pass loop's decisions, on a fake clock with a scripted tracker: when to switch over, when to give up."""

from __future__ import annotations

import numpy as np
import pytest

from migrate_cli.errors import NoConvergence
from migrate_cli.sender.precopy import SWITCHOVER_OVERHEAD, ConvergencePolicy, Decision, PassRecord, Precopy
from migrate_cli.stats import Stats

PS = 4096


def test_expected_downtime_is_switchover_cost_plus_dirty_bytes_over_rate() -> None:
    expected = ConvergencePolicy.expected_downtime(dirty_bytes=10_000_000, achieved_rate=100_000_000, scan_time=0.05)
    assert expected == pytest.approx(0.05 + SWITCHOVER_OVERHEAD + 0.1)


def test_the_policy_switches_over_under_the_downtime_limit_and_gives_up_at_its_limits() -> None:
    policy = ConvergencePolicy(downtime_limit=0.3, max_passes=5, max_time=10.0)
    assert policy.decide(0.2, passes_done=1, elapsed=1) is Decision.SWITCHOVER
    assert policy.decide(0.5, passes_done=1, elapsed=1) is Decision.CONTINUE
    assert policy.decide(0.5, passes_done=5, elapsed=1) is Decision.GIVE_UP
    assert policy.decide(0.5, passes_done=2, elapsed=10) is Decision.GIVE_UP


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
    return Precopy(
        ConvergencePolicy(**policy),  # type: ignore[arg-type]
        tracker,
        world.send_pass,
        world,  # type: ignore[arg-type]
        PS,
        Stats(image_bytes=1000 * PS, page_size=PS),
        abort_on_no_converge=abort,
        clock=world.clock,
    )


def test_passes_shrink_until_the_rest_fits_then_pause_and_send_the_rest() -> None:
    world = FakeWorld(rate=4096 * 1000)  # 1000 pages/s: 100 pages = 0.1 s
    result = precopy(world, ScriptedTracker([500, 200, 50, 10]), downtime_limit=0.1).run()
    # 50 dirty pages take 0.05 s + 0.02 s of switchover cost: that fits 0.1 s, so the guest is paused and the
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
