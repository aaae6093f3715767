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
3. **Write-rate sweep** -- a simulated guest (examples/guest_workload.py, uniform pattern, 2 writer threads) rewrites
   the image at a fraction of the cap (0.1 to 2.0 x cap; ``--quick``: 0.25, 0.5, 1.0) while ``vmmig send --live``
   migrates it, once without and once with ``--auto-converge``, always with ``--max-time 60s --on-no-converge abort
   --downtime-limit 300ms``. Every case starts from a fresh copy of the pristine image, a fresh guest process and a
   fresh destination. After a successful migration the (paused) source and the destination are compared byte for
   byte, chunk by chunk over two mmaps; a mismatch is a critical failure and makes the benchmark exit 1.

How to read the table
---------------------
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

The summary gives the highest write rate that converged without and with auto-converge, then PASS/FAIL per goal:
fingerprint speed, downtime <= 300 ms for every converged run at write rates <= 0.5 x cap, auto-converge converging
at 2 x cap, and byte-identical destinations. The exit status is 0 unless a destination differed from its source.
``--json PATH`` writes the configuration, every case (with the sender's full JSON report) and the summary.

    python benchmarks/bench_live.py [--size 1GiB] [--cap 100M] [--codec none] [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import mmap
import os
import platform
import re
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from harness import (
    GIB,
    MB,
    REPO,
    BenchError,
    Child,
    VmmigPair,
    add_tree_option,
    fmt,
    kill_all,
    load_generator,
    remove,
    run_main,
    wait_for_text,
)

from migrate_cli.wire.digest import fingerprint_image

WORKLOAD = REPO / "examples" / "guest_workload.py"

PAGE_SIZE = 4096
COMPARE_CHUNK = 64 << 20  # bytes compared at a time

FULL_FRACTIONS: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
QUICK_FRACTIONS: tuple[float, ...] = (0.25, 0.5, 1.0)
QUICK_SIZE = "256MiB"
GUEST_THREADS = 2
GUEST_PATTERN = "uniform"

DOWNTIME_LIMIT_MS = 300.0
MAX_TIME = "60s"
CASE_TIMEOUT = 120.0  # seconds from starting the sender until both sides must have exited
START_TIMEOUT = 20.0  # seconds for the guest to write its pid file / the receiver its ready file
RECV_GRACE = 10.0  # seconds the receiver gets after the sender exited, even past the case deadline

FP_REPEATS = 5
FP_THREADS: tuple[int, ...] = (1, 2)
FP_GOAL_S_PER_GIB = 0.15
FP_GOAL_THREADS = 2
DOWNTIME_GOAL_MAX_FRACTION = 0.5
AC_GOAL_FRACTION = 2.0

_PASSES_RE = re.compile(r"after (\d+) passes")
_DIRTY_RE = re.compile(r"\(dirty ([\d.]+) MB/s")
_EXPECTED_RE = re.compile(r"expected downtime (\d+)ms")


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
    tree: Path | None = None  # whose vmmig runs (--tree); this checkout's by default


@dataclass
class CaseResult:
    """One live migration of the sweep."""

    fraction: float
    write_rate: int
    auto_converge: bool
    status: str = "error"  # converged | no-conv | timeout | error | MISMATCH
    send_code: int | None = None
    recv_code: int | None = None
    wall_s: float | None = None
    passes: int | None = None
    downtime_ms: float | None = None
    expected_downtime_ms: float | None = None
    wire_bytes: int | None = None
    max_throttle: int | None = None
    max_dirty_rate: float | None = None
    pass1_nonzero_rate: float | None = None
    guest_paused: bool | None = None
    verified: bool | None = None
    mismatch_pages: int | None = None
    first_mismatch_page: int | None = None
    note: str = ""
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> bool:
        return self.status == "converged"


@dataclass
class CasePaths:
    """The per-case files, all inside the benchmark's own /dev/shm directory."""

    image: Path
    dest: Path
    ready: Path
    pid: Path

    @classmethod
    def inside(cls, workdir: Path) -> CasePaths:
        return cls(workdir / "guest.ram", workdir / "dest.ram", workdir / "ready", workdir / "guest.pid")

    @property
    def partial(self) -> Path:
        return self.dest.with_name(self.dest.name + ".partial")


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def in_mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def all_threads_stopped(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(states) and all(state in "Tt" for state in states)


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


# ----------------------------------------------------------------------------------------------------------------
# 3. One live migration


def start_guest(paths: CasePaths, rate: int) -> tuple[Child, int]:
    command = [
        sys.executable, str(WORKLOAD), str(paths.image), "--threads", str(GUEST_THREADS), "--rate", str(rate),
        "--pattern", GUEST_PATTERN, "--pid-file", str(paths.pid),
    ]  # fmt: skip
    guest = Child(command, paths.image.parent, "guest")
    return guest, int(wait_for_text(paths.pid, guest, START_TIMEOUT, "guest workload"))


def sender_args(config: Config, paths: CasePaths, address: str, guest_pid: int, auto: bool) -> list[str]:
    args = [
        "--live", str(paths.image), address, "--pause-pid", str(guest_pid), "--compress", config.codec,
        "--max-bandwidth", config.cap_text, "--downtime-limit", f"{DOWNTIME_LIMIT_MS:.0f}ms",
        "--max-time", MAX_TIME, "--on-no-converge", "abort",
    ]  # fmt: skip
    if config.codec != "none":
        args += ["--level", "1"]
    if auto:
        args.append("--auto-converge")
    return args


def fill_from_report(result: CaseResult, report: dict[str, Any]) -> None:
    """Take downtime, passes, wire bytes, throttle, dirty and pass-1 rates from the sender's JSON."""
    passes = report.get("passes") or []
    result.report = report
    result.passes = len(passes)
    result.downtime_ms = report.get("downtime")
    result.expected_downtime_ms = report.get("expected-downtime")
    result.wire_bytes = report.get("transferred")
    result.max_throttle = report.get("cpu-throttle-percentage")
    result.max_dirty_rate = max((p.get("dirty-rate") or 0 for p in passes), default=None)
    if passes and passes[0].get("duration"):
        first = passes[0]
        result.pass1_nonzero_rate = first["normal-pages"] * PAGE_SIZE / (first["duration"] / 1000)


def fill_from_no_convergence(result: CaseResult, stderr: str) -> None:
    """Exit 10 gives no JSON: take the pass count, dirty rate and expected downtime from the stderr line."""
    result.note = stderr
    if match := _PASSES_RE.search(stderr):
        result.passes = int(match.group(1))
    if match := _DIRTY_RE.search(stderr):
        result.max_dirty_rate = float(match.group(1)) * MB
    if match := _EXPECTED_RE.search(stderr):
        result.expected_downtime_ms = float(match.group(1))


def classify(result: CaseResult, send: Child, recv: Child, finished: bool) -> None:
    if not finished:
        result.status, result.note = "timeout", f"killed after {CASE_TIMEOUT:.0f}s"
        return
    stderr = send.stderr_tail(1)
    if result.send_code == 0 and result.recv_code == 0:
        result.status = "converged"
        fill_from_report(result, send.report("send"))
    elif result.send_code == 10:
        result.status = "no-conv"
        fill_from_no_convergence(result, stderr)
    else:
        result.status = "error"
        result.note = f"send exit {result.send_code}: {stderr} | recv exit {result.recv_code}: {recv.stderr_tail(1)}"


def migrate(config: Config, paths: CasePaths, result: CaseResult, guests: list[Child]) -> None:
    """Start guest (appended to ``guests``), receiver and sender, wait for the outcome, record it."""
    guest, guest_pid = start_guest(paths, result.write_rate)
    guests.append(guest)
    with VmmigPair(paths.image.parent, "live") as pair:
        address = pair.start_recv(str(paths.dest), timeout=START_TIMEOUT)
        pair.start_send(*sender_args(config, paths, address, guest_pid, result.auto_converge))
        send, recv = pair.children
        sent = send.wait(CASE_TIMEOUT)
        result.wall_s = (send.ended or time.perf_counter()) - pair.started
        result.send_code = send.returncode
        received = recv.wait(max(pair.started + CASE_TIMEOUT - time.perf_counter(), RECV_GRACE))
        result.recv_code = recv.returncode
        classify(result, send, recv, sent and received)
    if result.converged:
        result.guest_paused = all_threads_stopped(guest_pid)
        verify(result, paths)


def run_case(config: Config, workdir: Path, pristine: Path, fraction: float, auto: bool) -> CaseResult:
    result = CaseResult(fraction=fraction, write_rate=round(fraction * config.cap), auto_converge=auto)
    paths = CasePaths.inside(workdir)
    remove(paths.dest, paths.partial, paths.ready, paths.pid)
    shutil.copyfile(pristine, paths.image)
    guests: list[Child] = []
    try:
        migrate(config, paths, result, guests)
    except BenchError as exc:
        result.status, result.note = "error", str(exc)
    finally:
        kill_all(guests)  # SIGKILL ends a guest stopped by --pause-pid too
        remove(paths.dest, paths.partial, paths.ready, paths.pid)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Verification


def compare_images(source: Path, dest: Path) -> tuple[int, int | None]:
    """Count the pages that differ between two equally sized images; also return the first one (None if equal)."""
    mismatches, first = 0, None
    with (
        open(source, "rb") as a_file,
        open(dest, "rb") as b_file,
        mmap.mmap(a_file.fileno(), 0, access=mmap.ACCESS_READ) as a_map,
        mmap.mmap(b_file.fileno(), 0, access=mmap.ACCESS_READ) as b_map,
    ):
        for offset in range(0, len(a_map), COMPARE_CHUNK):
            a = np.frombuffer(a_map, np.uint8, min(COMPARE_CHUNK, len(a_map) - offset), offset)
            b = np.frombuffer(b_map, np.uint8, a.size, offset)
            if not np.array_equal(a, b):
                differ = np.flatnonzero((a != b).reshape(-1, PAGE_SIZE).any(axis=1))
                first = first if first is not None else offset // PAGE_SIZE + int(differ[0])
                mismatches += int(differ.size)
            del a, b  # the mmaps cannot close while numpy views of them exist
    return mismatches, first


def verify(result: CaseResult, paths: CasePaths) -> None:
    """DEST must equal the paused source byte for byte; anything else is a critical failure."""
    if not paths.dest.exists() or paths.dest.stat().st_size != paths.image.stat().st_size:
        result.status, result.verified = "MISMATCH", False
        result.note = f"destination missing or of the wrong size: {paths.dest}"
    else:
        result.mismatch_pages, result.first_mismatch_page = compare_images(paths.image, paths.dest)
        result.verified = result.mismatch_pages == 0
        if not result.verified:
            result.status = "MISMATCH"
            result.note = f"{result.mismatch_pages} pages differ, first page {result.first_mismatch_page}"
    if not result.verified:
        paused = "paused" if result.guest_paused else "NOT paused"
        print(f"\n!!!!! CRITICAL: destination differs from the {paused} source: {result.note} !!!!!\n", flush=True)


# ----------------------------------------------------------------------------------------------------------------
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
# 4. Summary and goals


def highest_converged(config: Config, results: Sequence[CaseResult], auto: bool) -> str:
    rates = [r.fraction for r in results if r.converged and r.auto_converge == auto]
    if not rates:
        return "none"
    return f"{max(rates):.2f} x cap ({max(rates) * config.cap / MB:.1f} MB/s)"


def goal_fingerprint(fp: dict[str, Any]) -> tuple[str, str]:
    value = fp[str(FP_GOAL_THREADS)]["median_s_per_gib"]
    others = ", ".join(f"{t} thread(s) {e['median_s_per_gib']:.3f}" for t, e in fp.items())
    verdict = "PASS" if value <= FP_GOAL_S_PER_GIB else "FAIL"
    return verdict, f"fingerprint pass <= {FP_GOAL_S_PER_GIB} s/GiB at {FP_GOAL_THREADS} threads ({others} s/GiB)"


def goal_downtime(results: Sequence[CaseResult]) -> tuple[str, str]:
    runs = [r for r in results if r.converged and r.fraction <= DOWNTIME_GOAL_MAX_FRACTION + 1e-9]
    text = f"downtime <= {DOWNTIME_LIMIT_MS:.0f} ms for every converged run at <= {DOWNTIME_GOAL_MAX_FRACTION} x cap"
    if not runs:
        return "FAIL", f"{text} (no converged run to check)"
    over = [r for r in runs if r.downtime_ms is None or r.downtime_ms > DOWNTIME_LIMIT_MS]
    worst = max(runs, key=lambda r: r.downtime_ms or float("inf"))
    detail = f"{len(runs) - len(over)}/{len(runs)} held; worst {fmt(worst.downtime_ms, '.0f')} ms at " + (
        f"{worst.fraction:.2f} x cap, AC {'yes' if worst.auto_converge else 'no'}"
    )
    return ("PASS" if not over else "FAIL"), f"{text} ({detail})"


def goal_auto_converge(results: Sequence[CaseResult]) -> tuple[str, str]:
    text = f"auto-converge converges at {AC_GOAL_FRACTION} x cap"
    runs = [r for r in results if r.auto_converge and abs(r.fraction - AC_GOAL_FRACTION) < 1e-9]
    if not runs:
        return "SKIP", f"{text} (rate not in this sweep)"
    run = runs[0]
    detail = f"{run.status}, {fmt(run.passes, 'd')} passes, throttle {fmt(run.max_throttle, 'd')} %"
    return ("PASS" if run.converged else "FAIL"), f"{text} ({detail})"


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


def summarize(config: Config, fp: dict[str, Any], results: Sequence[CaseResult]) -> dict[str, Any]:
    goals = [goal_fingerprint(fp), goal_downtime(results), goal_auto_converge(results), goal_correctness(results)]
    info = [
        *achieved_rate_lines(config, results),
        f"highest write rate converged without auto-converge: {highest_converged(config, results, False)}",
        f"highest write rate converged with auto-converge:    {highest_converged(config, results, True)}",
    ]
    print("\n4. Summary")
    for line in info:
        print(f"   {line}")
    print("\nGoals")
    for verdict, text in goals:
        print(f"   [{verdict}] {text}")
    return {"info": info, "goals": [{"verdict": v, "goal": t} for v, t in goals]}


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--size", default=None, help="image size (default 1GiB; 256MiB with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 256MiB image, write rates 0.25/0.5/1.0 x cap")
    parser.add_argument("--cap", default="100M", help="sender --max-bandwidth in wire bytes/s (default 100M)")
    parser.add_argument("--codec", default="none", choices=("none", "zlib", "zstd"), help="sender codec (default none)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write every result to PATH")
    add_tree_option(parser)
    args = parser.parse_args(argv)
    generator = load_generator()
    size_text = args.size or (QUICK_SIZE if args.quick else "1GiB")
    size, cap = generator.parse_size(size_text), generator.parse_size(args.cap.removesuffix("/s"))
    if size <= 0 or size % PAGE_SIZE or cap <= 0:
        parser.error("--size must be a positive multiple of 4096 and --cap positive")
    fractions = QUICK_FRACTIONS if args.quick else FULL_FRACTIONS
    return Config(size, size_text, cap, args.cap, args.codec, args.quick, fractions, args.json_path, args.tree)


def print_intro(config: Config) -> None:
    print(f"vmmig live-migration benchmark  {datetime.now().isoformat(timespec='seconds')}  {platform.node()}")
    print(
        f"image {config.size_text} (mixed profile) in /dev/shm, cap {config.cap / MB:.0f} MB/s, codec {config.codec}, "
        f"guest {GUEST_PATTERN} x{GUEST_THREADS} threads, downtime limit {DOWNTIME_LIMIT_MS:.0f} ms, "
        f"max time {MAX_TIME}, {os.cpu_count()} CPUs"
    )


def run_sweep(config: Config, workdir: Path, pristine: Path) -> list[CaseResult]:
    print(f"\n2./3. Write-rate sweep ({len(config.fractions) * 2} live migrations)")
    print(table_header(), flush=True)
    results = []
    for fraction in config.fractions:
        for auto in (False, True):
            result = run_case(config, workdir, pristine, fraction, auto)
            results.append(result)
            print(table_row(result), flush=True)
    return results


def write_json(config: Config, fp: dict[str, Any], results: Sequence[CaseResult], summary: dict[str, Any]) -> None:
    if not config.json_path:
        return
    document = {
        "config": {**asdict(config), "tree": str(config.tree) if config.tree else None},
        "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "fingerprint": fp,
        "cases": [asdict(r) for r in results],
        "summary": summary,
    }
    Path(config.json_path).write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults written to {config.json_path}")


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    return run_main(functools.partial(benchmark, config), "vmmig-bench-live-", config.tree)


def benchmark(config: Config, workdir: Path) -> int:
    print_intro(config)
    pristine = workdir / "pristine.ram"
    started = time.monotonic()
    load_generator().generate(str(pristine), config.size, seed=1, profile="mixed", page_size=PAGE_SIZE)
    print(f"generated {pristine.name} in {time.monotonic() - started:.1f}s")
    fp = bench_fingerprint(pristine)
    print_fingerprint(fp, config.size)
    results = run_sweep(config, workdir, pristine)
    print_notes(results)
    summary = summarize(config, fp, results)
    write_json(config, fp, results, summary)
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    if any(r.status == "MISMATCH" for r in results):
        print("\nCRITICAL: at least one destination differed from its paused source", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
