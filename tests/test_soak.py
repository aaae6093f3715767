"""The fault-injection soak (tests/soak.py): a short round of every fault kind here; the full soak is `make soak`
(also in `make test-full`), which runs `python tests/soak.py --runs 200` with a random seed it prints first.

The short round is one run of each fault kind of a fixed seed: for each kind, the next run of the seed whose drawn
image, offset and moment make the fault land mid-transfer, and whose stranger comes with the next probe: before the
sender connects (so that it finds the door open), or, for a kill of the sender and a cut, just after the fault (while
the receiver waits for the sender to come back). Every parameter still comes from (seed, run), so any of them
replays with `python tests/soak.py --seed S --run I --only KIND`.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from .conftest import make_image
from .soak import KINDS, PROBES, RESUMING_KINDS, Guest, RunSpec, Summary, plan, soak, wait_until

MiB = 1 << 20
SHORT_SEED = 20240611
PARKING_KINDS = ("kill-send", "cut")  # their stranger comes while the receiver is parked for a resume


def lands_mid_transfer(spec: RunSpec) -> bool:
    """An image with plenty on the wire, small enough to be quick, a fault offset or moment well inside it. A cancel
    and a signal come early in a larger image: `ctl` takes a moment to start, and a stop-and-copy transfer is over
    sooner than the pre-copy of a live one."""
    if spec.kind in ("cancel", "signal-twice"):
        return spec.profile == "random" and 3 * MiB <= spec.size <= 4 * MiB and 0.05 < spec.moment < 0.3
    wire = spec.profile == "random" and 2 * MiB <= spec.size <= 4 * MiB
    return wire and spec.at < spec.size // 2 and 0.5 < spec.moment < 0.8


def stranger_as_wanted(spec: RunSpec, probe: str) -> bool:
    if spec.probe != probe:
        return False
    if spec.kind in PARKING_KINDS:
        return spec.stranger_anchor == "fault"
    return spec.stranger_anchor == "ready" and spec.stranger_moment < 0.3  # within 0.12 s: the sender is not up yet


def short_round(seed: int) -> list[tuple[int, str]]:
    """(index, kind) for each kind: the next run of ``seed`` whose fault lands mid-transfer, with the next probe."""
    picks: list[tuple[int, str]] = []
    index = early = 0
    for number, kind in enumerate(KINDS):
        probe = PROBES[number % len(PROBES)] if kind in PARKING_KINDS else PROBES[early % len(PROBES)]
        early += kind not in PARKING_KINDS  # the strangers before the sender cover every probe
        while not (
            (kind == "none" or lands_mid_transfer(plan(seed, index, kind)))
            and stranger_as_wanted(plan(seed, index, kind), probe)
        ):
            index += 1
        picks.append((index, kind))
        index += 1
    return picks


def assert_invariants(summary: Summary) -> None:
    failures = "\n".join(f"{r.line()}\n  {r.stderr}" for r in summary.failures)
    assert summary.corrupt == 0, f"corrupt images published (seed {summary.seed}):\n{failures}"
    assert summary.left_behind == 0, f"processes left behind (seed {summary.seed}):\n{failures}"
    assert summary.guests_left_stopped == 0, f"guests left stopped (seed {summary.seed}):\n{failures}"
    assert summary.receivers_ended_by_stranger == 0, f"receivers ended by the stranger ({summary.seed}):\n{failures}"
    assert summary.unexpected == 0, f"unexpected outcomes (seed {summary.seed}):\n{failures}"
    assert summary.verified == summary.expected_verified, summary.text()
    assert summary.resumes >= summary.resumes_needed, summary.text()


def test_a_run_is_derived_from_the_seed_and_its_index_alone() -> None:
    assert plan(5, 17) == plan(5, 17)
    assert plan(5, 17) != plan(5, 18) and plan(5, 17) != plan(6, 17)
    forced = plan(5, 17, "cancel")
    assert forced.kind == "cancel" and forced.size == plan(5, 17).size and forced.at == plan(5, 17).at
    assert forced.probe == plan(5, 17).probe and forced.signals == plan(5, 17).signals
    assert {plan(1, index).kind for index in range(200)} == set(KINDS), "a full soak draws every fault kind"
    assert {plan(1, index).probe for index in range(200)} == set(PROBES), "and every probe of the stranger"
    assert forced.replay() == "python tests/soak.py --seed 5 --run 17 --only cancel"


def test_a_seed_of_an_older_soak_replays_its_parameters() -> None:
    """The stranger's and the signals' draws come after the older ones: run 17 of seed 5 is what it always was."""
    spec = plan(5, 17)
    older = (spec.kind, spec.size, spec.profile, spec.image_seed, spec.codec, spec.at, spec.batch_size)
    assert older == ("cancel", 7573504, "random", 2032835812, "zlib", 701488, 1 << 20)


def test_the_signals_of_a_run_are_a_first_one_and_one_or_two_more_10_to_300_ms_apart() -> None:
    for index in range(300):
        signals = plan(3, index).signals
        assert 2 <= len(signals) <= 3 and signals[0][1] == 0.0
        assert all(name in ("SIGTERM", "SIGINT") for name, _ in signals)
        assert all(0.01 <= gap <= 0.3 for _, gap in signals[1:])


def test_the_soak_sees_a_guest_stopped_and_running_again(tmp_path: Path) -> None:
    """What 'guests left stopped' counts: a guest with a stopped thread, as a pause without a resume leaves it."""
    guest = Guest(make_image(tmp_path / "vm.img", 1 << 20), tmp_path, "256K", 1)
    try:
        assert not guest.stopped()
        os.kill(guest.pid, signal.SIGSTOP)
        assert wait_until(guest.stopped, 10)
        os.kill(guest.pid, signal.SIGCONT)
        assert wait_until(lambda: not guest.stopped(), 10)
    finally:
        guest.kill()
    assert not guest.stopped(), "a guest that is gone is not stopped"


def test_one_run_of_every_fault_kind_keeps_the_invariants_with_a_stranger_in_each(tmp_path: Path) -> None:
    summary = soak(len(KINDS), SHORT_SEED, tmp_path, picks=short_round(SHORT_SEED))
    print(summary.text())
    assert summary.runs == len(KINDS) and summary.faults == dict.fromkeys(KINDS, 1)
    assert_invariants(summary)
    # The faults landed mid-transfer: the round exercises the healing paths, not only clean migrations.
    assert summary.fired == {**dict.fromkeys(KINDS, 1), "none": 0}, summary.text()
    assert summary.cancelled == 1 and summary.interrupted == 1 and summary.verified == len(KINDS) - 2
    assert summary.resumes_needed >= len(RESUMING_KINDS) - 1, "a kill may land before the session existed"
    # A stranger that came before the sender found the door open, and the receiver turned it away in its log.
    early = [r for r in summary.results if r.kind not in PARKING_KINDS]
    assert all(r.stranger["outcome"] == "connected" for r in early), [r.stranger for r in early]
    assert {r.stranger["probe"] for r in summary.results} == set(PROBES)
    # Turned away at once, and logged: not a silent hang-up (logged with --verbose only), not half a HELLO (logged
    # when the stranger hangs up, which may come after the receiver is done).
    noisy = [r for r in early if r.stranger["probe"] not in ("nothing", "half-hello")]
    assert all(r.refused_lines >= 1 for r in noisy), [(r.stranger, r.refused_lines) for r in noisy]
    assert not list(tmp_path.iterdir()), "a run that kept its invariants leaves nothing behind"
