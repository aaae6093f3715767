#!/usr/bin/env python3
"""Live-migration benchmark of vmmig over 127.0.0.1: QEMU's 2018 convergence scenario, scaled to this machine.

What it measures
----------------
1. **Fingerprint pass** -- ``migrate_cli.wire.digest.fingerprint_image`` over an mmap of the generated image in /dev/shm
   (the dirty tracker runs it once per pass, and once more while the guest is paused), median of 5 runs at 1 and at
   2 threads, reported in seconds per GiB. Goal: <= 0.15 s/GiB at 2 threads (the sender's default thread count on
   this 2-CPU machine).
2. **Achieved rate** -- the rate the sender can move dirty pages at. Zero pages are free, so pass 1's image rate
   overstates it; with ``--codec none`` (the default) the wire cap binds, so the achieved rate is defined as the cap
   (``--cap``, wire bytes/s). Each case also reports pass 1's measured non-zero-page rate (``normal-pages * 4096 /
   duration``), which should sit close to the cap.
3. **Write-rate sweep** -- a simulated guest (examples/guest_workload.py, uniform pattern, 2 writer threads, random
   content) rewrites the image at a fraction of the cap (0.1 to 2.0 x cap; ``--quick``: 0.25, 0.5, 1.0, and 2.0 with
   auto-converge only) while ``vmmig send --live`` migrates it, once without and once with ``--auto-converge``.
   It gives the highest write rate that converges without and with auto-converge, and checks the target: a guest
   dirtying at 2 x the achieved rate converges with ``--auto-converge``.
4. **Downtime promise** (live_promise.py) -- the issue's scenario: a guest (hotset pattern, a hot tenth of the
   image, 2 threads) writes 5,000 pages/s (20.48 MB/s, ``--promise-rate``) into a 256 MiB image
   (``--promise-size``) under a cap that binds. Cases: content {random, compressible} (guest_workload ``--content``)
   x cap {50M, 200M} x codec {none, zlib, zstd, auto}, 3 runs each (``--promise-runs``; ``--quick``: 4 cases that
   cover every content, cap and codec, 1 run each; ``--promise-cases`` picks cases by name, ``random/50M/zstd``).
   One line per run: exit code, passes, the sender's ``expected-downtime`` (its estimate at the switchover decision),
   the measured ``downtime`` (pause -> destination verified), ``err %`` = (expected - measured) / measured, and the
   switchover steps (pause, scan, send, verify ms). Per case and overall, PASS/FAIL: every converged run's downtime
   <= limit + 10%; |err| <= 15% in every converged run; no exit 10 (and no other failure).
5. **Side by side with QEMU** (``--with-qemu``; live_vs_qemu.py) -- benchmarks/bench_qemu_live.py, run as a child,
   at every cap of the promise cases with the promise's write rate in whole MiB/s (``--write-mb``) and the same
   downtime limit: QEMU's own live migration of the examples/qemu TCG guest (``max-bandwidth`` = the cap) and
   vmmig's QEMU mode on the same guest (``--qemu-cases``), their downtime and total time next to the promise's
   random-content runs at that cap. Skipped, with the reason, when QEMU or the guest build is missing.

Every migration uses ``--downtime-limit`` (default 300ms) ``--max-time 60s --on-no-converge abort`` and starts from a
fresh copy of the pristine image, a fresh guest process and a fresh destination (live_migration.py). After a
successful migration the (paused) source and the destination are compared byte for byte, chunk by chunk over two
mmaps; a mismatch is a critical failure and makes the benchmark exit 1. ``--sections`` runs a subset of
fingerprint, sweep, promise.

How to read the sweep table
---------------------------
* ``x cap`` / ``write MB/s`` -- the guest's configured write rate (MB = 10^6 bytes).
* ``AC``         -- whether ``--auto-converge`` was on.
* ``result``     -- ``converged`` (sender exit 0), ``no-conv`` (exit 10: aborted, the guest kept running),
  ``timeout`` (the case took more than 120 s and was killed), ``error`` or ``MISMATCH``.
* ``passes``     -- passes sent, the paused one included (for ``no-conv``: the count in the sender's stderr line).
* ``wall s``     -- wall clock from starting the sender until it exited.
* ``down ms`` / ``exp ms`` -- measured downtime (pause -> destination verified) and the expected downtime the sender
  predicted when it decided to switch over.
* ``wire MB``    -- bytes on the wire; ``thr %`` -- the highest CPU throttle auto-converge applied.
* ``dirty MB/s`` -- the highest dirty rate the sender measured over the passes. It can be below the write rate: a page
  rewritten twice between two scans counts once, and some writes restore content or write zeros.
  For ``no-conv`` rows (no JSON) ``exp ms`` and ``dirty MB/s`` are those of the last scan, from the stderr line,
  and the line itself is listed under "Notes" (it also gives the achieved rate the sender measured).
* ``p1 nz MB/s`` -- pass 1's non-zero-page rate (see 2.).
* ``verified``   -- ``yes`` when DEST equals the paused source byte for byte.

The summary (6.) gives the highest write rate that converged without and with auto-converge (with the dirty rate
the sender measured there), then PASS/FAIL per goal: fingerprint speed, sweep downtime <= the limit for every
converged run at write rates <= 0.5 x cap, auto-converge converging at 2 x cap, the three promise checks, and
byte-identical destinations. The exit status is 0 unless a destination differed from its source.
``--json PATH`` writes the configuration, every sweep case (with the sender's full JSON report), the promise
(every run, per-case and overall verdicts), QEMU's runs and the side-by-side rows, and the summary.

    python benchmarks/bench_live.py [--quick] [--size 1GiB] [--cap 100M] [--codec none] [--downtime-limit 300ms]
        [--sections fingerprint,sweep,promise] [--promise-runs 3] [--promise-cases ...] [--with-qemu]
        [--qemu-cases ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import live_promise
import live_vs_qemu
import numpy as np
from harness import GIB, MB, add_tree_option, fmt, load_generator, run_main
from live_migration import MAX_TIME, PAGE_SIZE, CaseResult, Setting, run_case
from live_promise import PromiseConfig, PromiseRun
from live_vs_qemu import QemuConfig

from migrate_cli.units import parse_duration
from migrate_cli.wire.digest import fingerprint_image

FULL_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
AC_GOAL_FRACTION = 2.0  # the target: auto-converge converges with the guest dirtying at 2 x the achieved rate
QUICK_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0, AC_GOAL_FRACTION)
QUICK_SIZE = "256MiB"
GUEST_THREADS = 2
GUEST_PATTERN = "uniform"
SECTIONS: tuple[str, ...] = ("fingerprint", "sweep", "promise")

DOWNTIME_LIMIT = "300ms"

FP_REPEATS = 5
FP_THREADS: tuple[int, ...] = (1, 2)
FP_GOAL_S_PER_GIB = 0.15
FP_GOAL_THREADS = 2
DOWNTIME_GOAL_MAX_FRACTION = 0.5


# ----------------------------------------------------------------------------------------------------------------
# Configuration and results


@dataclass(frozen=True)
class Config:
    size: int
    size_text: str
    cap: int
    cap_text: str
    codec: str
    quick: bool
    fractions: tuple[float, ...]
    json_path: str | None
    downtime_limit_ms: float
    sections: tuple[str, ...]
    promise: PromiseConfig
    qemu: QemuConfig | None  # --with-qemu
    tree: Path | None = None  # whose vmmig runs (--tree); this checkout's by default

    def sweep_setting(self, fraction: float, auto: bool) -> Setting:
        level = None if self.codec == "none" else 1
        return Setting(
            write_rate=round(fraction * self.cap), cap_text=self.cap_text, codec=self.codec,
            downtime_limit_ms=self.downtime_limit_ms, auto_converge=auto, pattern=GUEST_PATTERN,
            threads=GUEST_THREADS, level=level,
        )  # fmt: skip

    def sweep_cases(self) -> list[tuple[float, bool]]:
        """(fraction, auto-converge) pairs; --quick runs rates above the cap only with auto-converge (without it a
        guest dirtying faster than the link cannot converge: it would only spend --max-time)."""
        return [(f, auto) for f in self.fractions for auto in (False, True) if auto or not self.quick or f <= 1.0]


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def in_mb(value: float | None) -> float | None:
    return None if value is None else value / MB


# ----------------------------------------------------------------------------------------------------------------
# 1. Fingerprint pass


def time_fingerprint(array: np.ndarray, threads: int) -> list[float]:
    fingerprint_image(array, PAGE_SIZE, threads)  # warm-up: page tables, thread pool start-up
    times = []
    for _ in range(FP_REPEATS):
        start = time.perf_counter()
        fingerprint_image(array, PAGE_SIZE, threads)
        times.append(time.perf_counter() - start)
    return times


def bench_fingerprint(image: Path) -> dict[str, Any]:
    """Median seconds per GiB of fingerprint_image over an mmap of ``image``, per thread count."""
    results: dict[str, Any] = {}
    with open(image, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        array = np.frombuffer(mapped, dtype=np.uint8)
        try:
            for threads in FP_THREADS:
                times = time_fingerprint(array, threads)
                per_gib = statistics.median(times) * GIB / array.size
                results[str(threads)] = {"times_s": times, "median_s_per_gib": per_gib}
        finally:
            del array  # the mmap cannot close while a numpy view of it exists
    return results


def print_fingerprint(results: dict[str, Any], size: int) -> None:
    print(f"\n1. Fingerprint pass (fingerprint_image over a {size / GIB:.2f} GiB mmap, median of {FP_REPEATS})")
    for threads, entry in results.items():
        print(f"   {threads} thread(s): {entry['median_s_per_gib']:.3f} s/GiB")


# Table


COLUMNS: tuple[tuple[str, int], ...] = (
    ("x cap", 5), ("write MB/s", 10), ("AC", 3), ("result", 9), ("passes", 6), ("wall s", 6), ("down ms", 7),
    ("exp ms", 6), ("wire MB", 7), ("thr %", 5), ("dirty MB/s", 10), ("p1 nz MB/s", 10), ("verified", 8),
)  # fmt: skip


def table_header() -> str:
    names = "  ".join(name.rjust(width) for name, width in COLUMNS)
    return f"{names}\n{'-' * len(names)}"


def table_row(result: CaseResult) -> str:
    verified = {True: "yes", False: "NO", None: "-"}[result.verified]
    cells = (
        f"{result.fraction:.2f}", f"{result.write_rate / MB:.1f}", "yes" if result.auto_converge else "no",
        result.status, fmt(result.passes, "d"), fmt(result.wall_s, ".1f"), fmt(result.downtime_ms, ".0f"),
        fmt(result.expected_downtime_ms, ".0f"), fmt(in_mb(result.wire_bytes), ".0f"), fmt(result.max_throttle, "d"),
        fmt(in_mb(result.max_dirty_rate), ".1f"), fmt(in_mb(result.pass1_nonzero_rate), ".1f"), verified,
    )  # fmt: skip
    return "  ".join(cell.rjust(width) for cell, (_, width) in zip(cells, COLUMNS, strict=True))


def print_notes(results: Sequence[CaseResult]) -> None:
    noted = [r for r in results if r.note]
    if noted:
        print("\nNotes:")
    for r in noted:
        print(f"  {r.fraction:.2f} x cap, AC {'yes' if r.auto_converge else 'no'}: {r.note}")


# ----------------------------------------------------------------------------------------------------------------
# 6. Summary and goals


def highest_converged(config: Config, results: Sequence[CaseResult], auto: bool) -> str:
    converged = [r for r in results if r.converged and r.auto_converge == auto]
    if not converged:
        return "none"
    top = max(converged, key=lambda r: r.fraction)
    return (
        f"{top.fraction:.2f} x cap ({top.fraction * config.cap / MB:.1f} MB/s written, "
        f"{fmt(in_mb(top.max_dirty_rate), '.1f')} MB/s dirty measured)"
    )


def goal_fingerprint(fp: dict[str, Any]) -> tuple[str, str]:
    value = fp[str(FP_GOAL_THREADS)]["median_s_per_gib"]
    others = ", ".join(f"{t} thread(s) {e['median_s_per_gib']:.3f}" for t, e in fp.items())
    verdict = "PASS" if value <= FP_GOAL_S_PER_GIB else "FAIL"
    return verdict, f"fingerprint pass <= {FP_GOAL_S_PER_GIB} s/GiB at {FP_GOAL_THREADS} threads ({others} s/GiB)"


def goal_downtime(results: Sequence[CaseResult], limit_ms: float) -> tuple[str, str]:
    runs = [r for r in results if r.converged and r.fraction <= DOWNTIME_GOAL_MAX_FRACTION + 1e-9]
    text = f"sweep: downtime <= {limit_ms:.0f} ms for every converged run at <= {DOWNTIME_GOAL_MAX_FRACTION} x cap"
    if not runs:
        return "FAIL", f"{text} (no converged run to check)"
    over = [r for r in runs if r.downtime_ms is None or r.downtime_ms > limit_ms]
    worst = max(runs, key=lambda r: r.downtime_ms or float("inf"))
    detail = f"{len(runs) - len(over)}/{len(runs)} held; worst {fmt(worst.downtime_ms, '.0f')} ms at " + (
        f"{worst.fraction:.2f} x cap, AC {'yes' if worst.auto_converge else 'no'}"
    )
    return ("PASS" if not over else "FAIL"), f"{text} ({detail})"


def goal_auto_converge(config: Config, results: Sequence[CaseResult]) -> tuple[str, str]:
    text = f"sweep: auto-converge converges at {AC_GOAL_FRACTION} x cap (2 x the achieved rate)"
    runs = [r for r in results if r.auto_converge and abs(r.fraction - AC_GOAL_FRACTION) < 1e-9]
    if not runs:
        return "SKIP", f"{text} (rate not in this sweep)"
    run = runs[0]
    # the guest may not reach its configured rate on 2 shared cores: say what the sender saw
    dirty = "-" if run.max_dirty_rate is None else f"{run.max_dirty_rate / config.cap:.2f} x cap"
    detail = (
        f"{run.status}, {fmt(run.passes, 'd')} passes, throttle {fmt(run.max_throttle, 'd')} %, "
        f"highest dirty rate measured {dirty}"
    )
    return ("PASS" if run.converged else "FAIL"), f"{text} ({detail})"


def goals_promise(judged: dict[str, Any], config: PromiseConfig) -> list[tuple[str, str]]:
    overall = judged["overall"]
    checks, cases = overall["checks"], judged["cases"]

    def failing(check: str) -> str:
        names = [name for name, case in cases.items() if case["checks"][check] != "PASS"]
        return f"; failing: {', '.join(names)}" if names else ""

    runs = f"{overall['converged']}/{overall['runs']} runs converged"
    return [
        (checks["downtime"], f"promise: downtime <= {config.downtime_bound_ms:.0f} ms (limit + 10%) in every "
         f"converged run ({runs}; worst {fmt(overall['worst-downtime-ms'], '.0f')} ms{failing('downtime')})"),
        (checks["estimate"], f"promise: expected downtime within +-{live_promise.ERROR_BOUND_PCT:g}% of measured "
         f"(worst {fmt(overall['worst-abs-error-pct'], '.1f')}%{failing('estimate')})"),
        (checks["no-exit-10"], f"promise: no run ends in exit 10 ({overall['exit-10']} did{failing('no-exit-10')})"),
    ]  # fmt: skip


def goal_correctness(results: Sequence[CaseResult]) -> tuple[str, str]:
    checked = [r for r in results if r.verified is not None]
    bad = [r for r in checked if not r.verified]
    text = f"destination byte-identical to the paused source ({len(checked) - len(bad)}/{len(checked)} runs)"
    return ("PASS" if checked and not bad else "FAIL"), text


def achieved_rate_lines(config: Config, results: Sequence[CaseResult]) -> list[str]:
    rates = [r.pass1_nonzero_rate for r in results if r.pass1_nonzero_rate]
    lines = [f"achieved rate (the wire cap, codec {config.codec}): {config.cap / MB:.1f} MB/s"]
    if config.codec != "none":
        lines.append("  (with a compressing codec the cap does not bind the same way: treat this reference loosely)")
    if rates:
        lines.append(
            f"pass 1 non-zero-page rate: median {statistics.median(rates) / MB:.1f} MB/s "
            f"(min {min(rates) / MB:.1f}, max {max(rates) / MB:.1f}, over {len(rates)} converged runs)"
        )
    return lines


def summarize(config: Config, outcome: Outcome) -> dict[str, Any]:
    goals, info = [], []
    if outcome.fingerprint:
        goals.append(goal_fingerprint(outcome.fingerprint))
    if "sweep" in config.sections:
        sweep = outcome.sweep
        goals += [goal_downtime(sweep, config.downtime_limit_ms), goal_auto_converge(config, sweep)]
        info = [
            *achieved_rate_lines(config, sweep),
            f"highest write rate converged without auto-converge: {highest_converged(config, sweep, False)}",
            f"highest write rate converged with auto-converge:    {highest_converged(config, sweep, True)}",
        ]
    if outcome.promise_judged:
        goals += goals_promise(outcome.promise_judged, config.promise)
    goals.append(goal_correctness([*outcome.sweep, *(run.result for run in outcome.promise)]))
    print("\n6. Summary")
    for line in info:
        print(f"   {line}")
    print("\nGoals")
    for verdict, text in goals:
        print(f"   [{verdict}] {text}")
    return {"info": info, "goals": [{"verdict": v, "goal": t} for v, t in goals]}


# ----------------------------------------------------------------------------------------------------------------
# Main


@dataclass
class Outcome:
    """What the sections measured (empty for a section not run)."""

    fingerprint: dict[str, Any] = field(default_factory=dict)
    sweep: list[CaseResult] = field(default_factory=list)
    promise: list[PromiseRun] = field(default_factory=list)
    promise_judged: dict[str, Any] = field(default_factory=dict)
    qemu: dict[str, Any] = field(default_factory=dict)

    @property
    def mismatch(self) -> bool:
        return any(r.status == "MISMATCH" for r in [*self.sweep, *(run.result for run in self.promise)])


def promise_config(args: argparse.Namespace, parser: argparse.ArgumentParser, limit_ms: float) -> PromiseConfig:
    by_name = {case.name: case for case in live_promise.ALL_CASES}
    if args.promise_cases:
        names = [name.strip() for name in args.promise_cases.split(",") if name.strip()]
        if unknown := [name for name in names if name not in by_name]:
            parser.error(f"unknown --promise-cases {', '.join(unknown)} (CONTENT/CAP/CODEC, e.g. random/50M/zstd)")
        cases = tuple(by_name[name] for name in names)
    else:
        cases = live_promise.QUICK_CASES if args.quick else live_promise.ALL_CASES
    runs = args.promise_runs or (live_promise.QUICK_RUNS if args.quick else live_promise.RUNS)
    generator = load_generator()
    size = generator.parse_size(args.promise_size)
    rate = generator.parse_size(args.promise_rate.removesuffix("/s"))
    if size <= 0 or size % PAGE_SIZE or rate <= 0 or runs < 1:
        parser.error("--promise-size must be a positive multiple of 4096, --promise-rate and --promise-runs positive")
    return PromiseConfig(cases, runs, size, args.promise_size, rate, limit_ms)


def qemu_config(args: argparse.Namespace, promise: PromiseConfig, limit_ms: float) -> QemuConfig | None:
    if not args.with_qemu:
        return None
    caps = tuple(dict.fromkeys(case.cap_text for case in promise.cases)) or live_promise.CAPS
    default = live_vs_qemu.QUICK_CASES if args.quick else live_vs_qemu.CASES
    cases = tuple(c.strip() for c in args.qemu_cases.split(",") if c.strip()) if args.qemu_cases else default
    return QemuConfig(caps, promise.write_rate, limit_ms, promise.runs, cases, args.tree)


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default=None, help="sweep image size (default 1GiB; 256MiB with --quick)")
    parser.add_argument(
        "--quick", action="store_true",
        help="smoke test: sweep on 256MiB at 0.25/0.5/1.0 x cap (and 2.0 with auto-converge); promise: 4 cases x 1 run",
    )  # fmt: skip
    parser.add_argument("--cap", default="100M", help="sweep: sender --max-bandwidth in wire bytes/s (default 100M)")
    parser.add_argument(
        "--codec", default="none", choices=("none", "zlib", "zstd", "auto"), help="sweep: sender codec (default none)"
    )
    parser.add_argument(
        "--downtime-limit", default=DOWNTIME_LIMIT, help=f"sender --downtime-limit everywhere ({DOWNTIME_LIMIT})"
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)} (default all)"
    )
    parser.add_argument("--promise-runs", type=int, help="runs per promise case (default 3; 1 with --quick)")
    parser.add_argument("--promise-cases", help="only these promise cases, CONTENT/CAP/CODEC comma-separated")
    parser.add_argument(
        "--promise-size", default=live_promise.SIZE_TEXT, help=f"promise image size (default {live_promise.SIZE_TEXT})"
    )
    parser.add_argument(
        "--promise-rate", default=str(live_promise.WRITE_RATE),
        help=f"promise guest write rate, bytes/s (default {live_promise.WRITE_RATE}: 5,000 pages/s)",
    )  # fmt: skip
    parser.add_argument(
        "--with-qemu", action="store_true",
        help="also run bench_qemu_live.py at the promise's dirty rate, caps and limit; print both side by side",
    )  # fmt: skip
    parser.add_argument(
        "--qemu-cases", help=f"with --with-qemu: bench_qemu_live.py cases (default {', '.join(live_vs_qemu.CASES)})"
    )
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write every result to PATH")
    add_tree_option(parser)
    args = parser.parse_args(argv)
    generator = load_generator()
    size_text = args.size or (QUICK_SIZE if args.quick else "1GiB")
    size, cap = generator.parse_size(size_text), generator.parse_size(args.cap.removesuffix("/s"))
    if size <= 0 or size % PAGE_SIZE or cap <= 0:
        parser.error("--size must be a positive multiple of 4096 and --cap positive")
    try:
        limit_ms = parse_duration(args.downtime_limit) * 1000
    except ValueError as exc:
        parser.error(str(exc))
    sections = tuple(name.strip() for name in args.sections.split(",") if name.strip())
    if unknown := [name for name in sections if name not in SECTIONS]:
        parser.error(f"unknown --sections {', '.join(unknown)}")
    fractions = QUICK_FRACTIONS if args.quick else FULL_FRACTIONS
    promise = promise_config(args, parser, limit_ms)
    return Config(
        size, size_text, cap, args.cap, args.codec, args.quick, fractions, args.json_path, limit_ms, sections,
        promise, qemu_config(args, promise, limit_ms), args.tree,
    )  # fmt: skip


def print_intro(config: Config) -> None:
    print(f"vmmig live-migration benchmark  {datetime.now().isoformat(timespec='seconds')}  {platform.node()}")
    print(
        f"sections {', '.join(config.sections)}{' + QEMU' if config.qemu else ''}; downtime limit "
        f"{config.downtime_limit_ms:g} ms, max time {MAX_TIME}, {os.cpu_count()} CPUs"
    )
    if "sweep" in config.sections:
        print(
            f"sweep: image {config.size_text} (mixed profile) in /dev/shm, cap {config.cap / MB:.0f} MB/s, codec "
            f"{config.codec}, guest {GUEST_PATTERN} x{GUEST_THREADS} threads"
        )


def run_sweep(config: Config, workdir: Path, pristine: Path) -> list[CaseResult]:
    cases = config.sweep_cases()
    print(f"\n2./3. Write-rate sweep ({len(cases)} live migrations)")
    print(table_header(), flush=True)
    results = []
    for fraction, auto in cases:
        result = run_case(workdir, pristine, config.sweep_setting(fraction, auto), fraction)
        results.append(result)
        print(table_row(result), flush=True)
    return results


def write_json(config: Config, outcome: Outcome, summary: dict[str, Any]) -> None:
    if not config.json_path:
        return
    document = {
        "config": asdict(config),
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "fingerprint": outcome.fingerprint,
        "cases": [asdict(r) for r in outcome.sweep],
        "promise": outcome.promise_judged,
        "qemu": outcome.qemu,
        "summary": summary,
    }
    Path(config.json_path).write_text(json.dumps(document, indent=2, default=str) + "\n")
    print(f"\nresults written to {config.json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_main(functools.partial(benchmark, config), "vmmig-bench-live-", config.tree)


def make_pristine(path: Path, size: int) -> Path:
    started = time.monotonic()
    load_generator().generate(str(path), size, seed=1, profile="mixed", page_size=PAGE_SIZE)
    print(f"generated {path.name} ({size / GIB:.2f} GiB) in {time.monotonic() - started:.1f}s", flush=True)
    return path


def benchmark(config: Config, workdir: Path) -> int:
    print_intro(config)
    started = time.monotonic()
    outcome = Outcome()
    if {"fingerprint", "sweep"} & set(config.sections):
        pristine = make_pristine(workdir / "pristine.ram", config.size)
        if "fingerprint" in config.sections:
            outcome.fingerprint = bench_fingerprint(pristine)
            print_fingerprint(outcome.fingerprint, config.size)
        if "sweep" in config.sections:
            outcome.sweep = run_sweep(config, workdir, pristine)
            print_notes(outcome.sweep)
        pristine.unlink()
    if "promise" in config.sections:
        pristine = make_pristine(workdir / "promise.ram", config.promise.size)
        outcome.promise = live_promise.run_promise(config.promise, workdir, pristine)
        outcome.promise_judged = live_promise.judge_promise(outcome.promise, config.promise)
        pristine.unlink()
    if config.qemu is not None:
        outcome.qemu = live_vs_qemu.run_with_qemu(config.qemu, workdir, outcome.promise)
    summary = summarize(config, outcome)
    write_json(config, outcome, summary)
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    if outcome.mismatch:
        print("\nCRITICAL: at least one destination differed from its paused source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
