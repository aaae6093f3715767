"""bench_live.py's "downtime promise" section: does the measured downtime keep ``--downtime-limit``, and does the
sender's estimate (``expected-downtime``, taken at the switchover decision) predict it?

The issue's scenario: a guest (examples/guest_workload.py, 2 threads, hotset pattern, a hot tenth of the image)
writes 5,000 pages/s (20.48 MB/s) into a 256 MiB mixed image while ``vmmig send --live --pause-pid`` migrates it
under a cap that binds. Cases: content {random, compressible} x cap {50M, 200M} x codec {none, zlib, zstd, auto},
each run ``runs`` times (the rounds interleave the cases, so machine noise spreads over all of them).

Per case, and over all cases, three checks (PASS/FAIL):
* every converged run's measured downtime <= limit x 1.1;
* every converged run's estimate within +-15% of the measured downtime: |expected - measured| / measured <= 0.15;
* no run ends in exit 10 (did not converge within --max-time 60s / 30 passes).
A run that fails otherwise (timeout, another exit code, a destination that differs) fails its case too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from harness import MB, fmt
from live_migration import CaseResult, Setting, run_case

from migrate_cli.units import parse_size

CONTENTS: tuple[str, ...] = ("random", "compressible")
CAPS: tuple[str, ...] = ("50M", "200M")
CODECS: tuple[str, ...] = ("none", "zlib", "zstd", "auto")
RUNS = 3
QUICK_RUNS = 1
SIZE_TEXT = "256MiB"
WRITE_RATE = 20_480_000  # 5,000 pages of 4 KiB a second
PATTERN = "hotset"
HOT_FRACTION = 0.1
THREADS = 2
DOWNTIME_SLACK = 0.10  # measured downtime may exceed the limit by this share
ERROR_BOUND_PCT = 15.0  # |expected - measured| / measured, in percent


@dataclass(frozen=True)
class PromiseCase:
    content: str
    cap_text: str
    codec: str

    @property
    def name(self) -> str:
        return f"{self.content}/{self.cap_text}/{self.codec}"


ALL_CASES: tuple[PromiseCase, ...] = tuple(
    PromiseCase(content, cap, codec) for content in CONTENTS for cap in CAPS for codec in CODECS
)
# --quick: every content, cap and codec at least once
QUICK_CASES: tuple[PromiseCase, ...] = (
    PromiseCase("random", "50M", "none"),
    PromiseCase("random", "200M", "zstd"),
    PromiseCase("compressible", "50M", "zlib"),
    PromiseCase("compressible", "200M", "auto"),
)


@dataclass(frozen=True)
class PromiseConfig:
    cases: tuple[PromiseCase, ...]
    runs: int
    size: int
    size_text: str
    write_rate: int
    downtime_limit_ms: float

    @property
    def downtime_bound_ms(self) -> float:
        return self.downtime_limit_ms * (1 + DOWNTIME_SLACK)

    def setting(self, case: PromiseCase) -> Setting:
        return Setting(
            write_rate=self.write_rate, cap_text=case.cap_text, codec=case.codec,
            downtime_limit_ms=self.downtime_limit_ms, pattern=PATTERN, hot_fraction=HOT_FRACTION,
            content=case.content, threads=THREADS,
        )  # fmt: skip


@dataclass
class PromiseRun:
    case: PromiseCase
    run: int
    result: CaseResult

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "case": self.case.name, **asdict(self.case), "run": self.run, "exit": r.send_code, "status": r.status,
            "passes": r.passes, "expected-downtime": r.expected_downtime_ms, "downtime": r.downtime_ms,
            "error-pct": r.error_pct, "switchover": r.switchover, "total-time": r.total_time_ms,
            "verified": r.verified, "note": r.note, "result": asdict(r),
        }  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Running


STEPS: tuple[str, ...] = ("pause", "scan", "send", "verify")
COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 22), ("run", 3), ("exit", 4), ("result", 9), ("passes", 6), ("exp ms", 6), ("down ms", 7),
    ("err %", 6), *((f"{step} ms", 7) for step in STEPS), ("total s", 7), ("verified", 8),
)  # fmt: skip


def table_header() -> str:
    names = "  ".join(name.ljust(width) if i == 0 else name.rjust(width) for i, (name, width) in enumerate(COLUMNS))
    return f"{names}\n{'-' * len(names)}"


def table_row(run: PromiseRun) -> str:
    r = run.result
    steps = r.switchover
    total_s = None if r.total_time_ms is None else r.total_time_ms / 1000
    cells = (
        run.case.name, str(run.run), fmt(r.send_code, "d"), r.status, fmt(r.passes, "d"),
        fmt(r.expected_downtime_ms, ".0f"), fmt(r.downtime_ms, ".0f"), fmt(r.error_pct, "+.1f"),
        *(fmt(steps.get(step), ".1f") for step in STEPS), fmt(total_s, ".1f"),
        {True: "yes", False: "NO", None: "-"}[r.verified],
    )  # fmt: skip
    pairs = enumerate(zip(cells, COLUMNS, strict=True))
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, (_, w)) in pairs)


def run_promise(config: PromiseConfig, workdir: Path, pristine: Path) -> list[PromiseRun]:
    """Every case ``config.runs`` times, in interleaved rounds; one table line per run as it ends."""
    total = len(config.cases) * config.runs
    print(
        f"\n4. Downtime promise ({total} live migrations: {len(config.cases)} cases x {config.runs} runs; "
        f"{config.size_text} image, guest {PATTERN} {HOT_FRACTION:g} x{THREADS} threads writing "
        f"{config.write_rate / MB:.2f} MB/s, limit {config.downtime_limit_ms:g} ms)"
    )
    print(table_header(), flush=True)
    runs = []
    for number in range(1, config.runs + 1):
        for case in config.cases:
            setting = config.setting(case)
            cap = _cap_bytes(case.cap_text)
            result = run_case(workdir, pristine, setting, config.write_rate / cap)
            runs.append(PromiseRun(case, number, result))
            print(table_row(runs[-1]), flush=True)
    noted = [run for run in runs if run.result.note]
    if noted:
        print("\nNotes:")
    for run in noted:
        print(f"  {run.case.name} run {run.run}: {run.result.note}")
    return runs


def _cap_bytes(cap_text: str) -> int:
    return parse_size(cap_text.removesuffix("/s"))


# ----------------------------------------------------------------------------------------------------------------
# Judging


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def judge_runs(runs: Sequence[PromiseRun], config: PromiseConfig) -> dict[str, Any]:
    """The three checks over ``runs`` (one case, or all), with the figures behind them."""
    results = [run.result for run in runs]
    converged = [r for r in results if r.converged]
    no_conv = [r for r in results if r.send_code == 10]
    failed = [r for r in results if not r.converged and r.send_code != 10]  # error, timeout, MISMATCH
    downs = [r.downtime_ms for r in converged]
    errors = [r.error_pct for r in converged]
    worst_down = max((d for d in downs if d is not None), default=None)
    worst_error = max((abs(e) for e in errors if e is not None), default=None)
    downtime_ok = bool(converged) and all(d is not None and d <= config.downtime_bound_ms for d in downs)
    error_ok = bool(converged) and all(e is not None and abs(e) <= ERROR_BOUND_PCT for e in errors)
    checks = {
        "downtime": verdict(downtime_ok),
        "estimate": verdict(error_ok),
        "no-exit-10": verdict(not no_conv),
        "no-failure": verdict(not failed),
    }
    return {
        "runs": len(results), "converged": len(converged), "exit-10": len(no_conv), "failed": len(failed),
        "worst-downtime-ms": worst_down, "worst-abs-error-pct": worst_error, "checks": checks,
        "verdict": verdict(all(v == "PASS" for v in checks.values())),
    }  # fmt: skip


def judgement_line(name: str, judged: dict[str, Any], config: PromiseConfig) -> str:
    checks = judged["checks"]
    return (
        f"[{judged['verdict']}] {name.ljust(22)}  {judged['converged']}/{judged['runs']} converged; "
        f"downtime worst {fmt(judged['worst-downtime-ms'], '.0f')} <= {config.downtime_bound_ms:.0f} ms "
        f"{checks['downtime']}; |error| worst {fmt(judged['worst-abs-error-pct'], '.1f')} <= "
        f"{ERROR_BOUND_PCT:g}% {checks['estimate']}; exit 10: {judged['exit-10']} {checks['no-exit-10']}"
        + (f"; failed: {judged['failed']} FAIL" if judged["failed"] else "")
    )


def judge_promise(runs: Sequence[PromiseRun], config: PromiseConfig) -> dict[str, Any]:
    """Print and return PASS/FAIL per case and overall."""
    print(
        f"\nDowntime promise: converged runs' downtime <= {config.downtime_limit_ms:g} ms + {DOWNTIME_SLACK:.0%}, "
        f"expected within +-{ERROR_BOUND_PCT:g}% of measured, no exit 10"
    )
    per_case = {}
    for case in config.cases:
        judged = judge_runs([run for run in runs if run.case == case], config)
        per_case[case.name] = judged
        print(f"   {judgement_line(case.name, judged, config)}")
    overall = judge_runs(runs, config)
    print(f"   {judgement_line('overall', overall, config)}")
    return {
        "config": {**asdict(config), "cases": [c.name for c in config.cases]},
        "downtime-bound-ms": config.downtime_bound_ms,
        "error-bound-pct": ERROR_BOUND_PCT,
        "runs": [run.as_json() for run in runs],
        "cases": per_case,
        "overall": overall,
    }
