"""The fault-injection soak (tests/soak.py): a short round of every fault kind here; the full soak is `make soak`
(also in `make test-full`), which runs `python tests/soak.py --runs 200` with a random seed it prints first.

The short round is one run of each fault kind of a fixed seed: for each kind, the next run of the seed whose drawn
image, offset and moment make the fault land mid-transfer. Every parameter still comes from (seed, run), so any of
them replays with `python tests/soak.py --seed S --run I --only KIND`.
"""

from __future__ import annotations

from pathlib import Path

from .soak import KINDS, RESUMING_KINDS, RunSpec, Summary, plan, soak

MiB = 1 << 20
SHORT_SEED = 20240611


def lands_mid_transfer(spec: RunSpec) -> bool:
    """An image with plenty on the wire, small enough to be quick, a fault offset or moment well inside it."""
    wire = spec.profile == "random" and 2 * MiB <= spec.size <= 4 * MiB
    return wire and spec.at < spec.size // 2 and 0.5 < spec.moment < 0.8


def short_round(seed: int) -> list[tuple[int, str]]:
    """(index, kind) for each kind: the next run of ``seed`` whose fault lands mid-transfer."""
    picks: list[tuple[int, str]] = []
    index = 0
    for kind in KINDS:
        while kind != "none" and not lands_mid_transfer(plan(seed, index, kind)):
            index += 1
        picks.append((index, kind))
        index += 1
    return picks


def assert_invariants(summary: Summary) -> None:
    failures = "\n".join(f"{r.line()}\n  {r.stderr}" for r in summary.failures)
    assert summary.corrupt == 0, f"corrupt images published (seed {summary.seed}):\n{failures}"
    assert summary.left_behind == 0, f"processes left behind (seed {summary.seed}):\n{failures}"
    assert summary.unexpected == 0, f"unexpected outcomes (seed {summary.seed}):\n{failures}"
    assert summary.verified == summary.expected_verified, summary.text()
    assert summary.resumes >= summary.resumes_needed, summary.text()


def test_a_run_is_derived_from_the_seed_and_its_index_alone() -> None:
    assert plan(5, 17) == plan(5, 17)
    assert plan(5, 17) != plan(5, 18) and plan(5, 17) != plan(6, 17)
    forced = plan(5, 17, "cancel")
    assert forced.kind == "cancel" and forced.size == plan(5, 17).size and forced.at == plan(5, 17).at
    assert {plan(1, index).kind for index in range(200)} == set(KINDS), "a full soak draws every fault kind"
    assert forced.replay() == "python tests/soak.py --seed 5 --run 17 --only cancel"


def test_one_run_of_every_fault_kind_keeps_the_invariants(tmp_path: Path) -> None:
    summary = soak(len(KINDS), SHORT_SEED, tmp_path, picks=short_round(SHORT_SEED))
    print(summary.text())
    assert summary.runs == len(KINDS) and summary.faults == dict.fromkeys(KINDS, 1)
    assert_invariants(summary)
    # The faults landed mid-transfer: the round exercises the healing paths, not only clean migrations.
    assert summary.fired == {**dict.fromkeys(KINDS, 1), "none": 0}, summary.text()
    assert summary.cancelled == 1 and summary.verified == len(KINDS) - 1
    assert summary.resumes_needed >= len(RESUMING_KINDS) - 1, "a kill may land before the session existed"
    assert not list(tmp_path.iterdir()), "a run that kept its invariants leaves nothing behind"
