#!/usr/bin/env python3
"""Bandwidth-cap accuracy and live-display CPU cost of ``vmmig send``, over 127.0.0.1.

What it measures
----------------
1. **Cap accuracy** -- first one short uncapped run (``--compress none`` into ``recv --discard``) gives the highest
   wire rate this machine reaches. Then, for each cap (50M, 100M, 200M wire bytes/s, MB = 10^6 bytes), one migration
   of an incompressible (``random`` profile) image sized to last about ``--seconds`` + 3 s at the cap, with
   ``--compress none --stats FILE`` into ``recv --discard``. From the sender's per-second NDJSON ``progress`` records
   it takes every 5-second window that starts at least 1 s after the first page (sliding by one record, i.e. 1 s)
   and ends while pages are still being sent (``remaining`` > 0), and computes the window's wire rate
   (delta ``transferred`` / delta ``total-time``) as a ratio to the cap. It reports the min / median / max window
   ratio and the overall ratio (the final report's ``transferred`` / ``total-time``, start-up burst and tail
   included). PASS when every window is within 0.95-1.05; a cap above the uncapped rate is "not reachable here" and
   is not run.
2. **Display CPU share** -- the same migration (a 1 GiB ``mixed`` image, zlib level 1, ``--max-bandwidth 50M``,
   about 7 s) with the live rich display ON (the sender's stderr is a pty) and OFF (stderr to /dev/null), the runs
   interleaved on, off, on, off, ... The sender's total CPU (user + system, ``os.wait4`` rusage) gives the median
   CPU seconds on and off and their difference as a share of the off figure. The display also measures itself (its
   refresh thread's CPU as a share of the process's, ``display-cpu-share`` in the ``--json`` report); the median of
   the ON runs is the figure judged against the goal (<= 2 %), the on-vs-off difference is printed next to it (it
   is noisier: a few hundredths of a second of CPU on a run of several seconds).

Every migration runs a fresh ``vmmig recv --discard`` and must end with both sides exiting 0; ``other CPU s`` is the
CPU time everything else on the machine used during the run (from /proc/stat): if it is well above 0, another job
disturbed the measurement (a few tenths below 0 are accounting noise: /proc/stat ticks and rusage differ slightly).
Images live in a private /dev/shm directory that is removed on every exit path; children are killed by pid.

    python benchmarks/bench_cap.py [--quick] [--seconds 20] [--display-runs 5] [--json out.json]

``--quick``: 5 s per cap and 3 display runs each way. The exit status is 0 unless a migration failed.
"""

from __future__ import annotations

import argparse
import fcntl
import functools
import json
import os
import platform
import statistics
import struct
import subprocess
import sys
import termios
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from harness import (
    GIB,
    MB,
    MIB,
    BenchError,
    VmmigPair,
    add_tree_option,
    cpu_clock,
    fmt,
    load_generator,
    other_cpu,
    run_main,
)

PAGE_SIZE = 4096

CAPS: tuple[int, ...] = (50 * MB, 100 * MB, 200 * MB)
FULL_SECONDS = 20.0
QUICK_SECONDS = 5.0
EXTRA_SECONDS = 3.0  # images last this much longer than --seconds: the first second is skipped, plus slack
WINDOW_S = 5.0
SKIP_S = 1.0
TOLERANCE = 0.05
UNCAPPED_SIZE = 2 * GIB  # bytes sent by the uncapped run (a prefix of the random image)

DISPLAY_SIZE = GIB
DISPLAY_CAP = "50M"
DISPLAY_RUNS = 5
QUICK_DISPLAY_RUNS = 3
DISPLAY_GOAL = 0.02
PTY_COLUMNS, PTY_ROWS = 120, 40

START_TIMEOUT = 20.0
COPY_CHUNK = 64 * MIB


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Migration:
    """One ``vmmig send`` into ``vmmig recv --discard``."""

    label: str
    send_code: int | None = None
    recv_code: int | None = None
    wall_s: float | None = None
    send_cpu_s: float | None = None
    recv_cpu_s: float | None = None
    other_cpu_s: float | None = None
    report: dict[str, Any] = field(default_factory=dict)
    records: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.send_code == 0 and self.recv_code == 0 and not self.error


@dataclass
class CapResult:
    cap: int
    reachable: bool
    image_bytes: int = 0
    windows: list[dict[str, float]] = field(default_factory=list)
    overall_ratio: float | None = None
    verdict: str = "not run"
    run: Migration | None = None

    def ratios(self) -> list[float]:
        return [w["ratio"] for w in self.windows]


# ----------------------------------------------------------------------------------------------------------------
# Helpers


def pct(value: float | None, spec: str = ".2f") -> str:
    """A ratio as a percentage, "-" when unknown."""
    return fmt(None if value is None else 100 * value, spec)


def pages_floor(size: float) -> int:
    return int(size) // PAGE_SIZE * PAGE_SIZE


def copy_prefix(source: Path, dest: Path, size: int) -> None:
    buffer = bytearray(COPY_CHUNK)
    view = memoryview(buffer)
    with open(source, "rb") as src, open(dest, "wb") as dst:
        left = size
        while left:
            count = src.readinto(view[: min(left, COPY_CHUNK)])
            if not count:
                raise BenchError(f"{source} is shorter than {size} bytes")
            dst.write(view[:count])
            left -= count


class Reader(threading.Thread):
    """Collects everything from a pipe or pty master fd until EOF (EIO on a pty whose slave side closed)."""

    def __init__(self, fd: int, keep: bool = True) -> None:
        super().__init__(daemon=True)
        self.fd, self.keep = fd, keep
        self.chunks: list[bytes] = []

    def run(self) -> None:
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError:
                return
            if not data:
                return
            if self.keep:
                self.chunks.append(data)

    def data(self) -> bytes:
        return b"".join(self.chunks)


# ----------------------------------------------------------------------------------------------------------------
# One migration


def open_pty() -> tuple[int, int]:
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", PTY_ROWS, PTY_COLUMNS, 0, 0))
    return master, slave


def migrate(
    label: str, workdir: Path, image: Path, send_args: Sequence[str], display: bool, timeout: float
) -> Migration:
    """Run one receiver + sender pair; the sender's stderr is a pty when ``display``, else /dev/null."""
    result = Migration(label)
    stats_path = workdir / "send.ndjson"
    stats_path.unlink(missing_ok=True)
    master: int | None = None
    drain: Reader | None = None
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": str(PTY_COLUMNS), "LINES": str(PTY_ROWS)}
    try:
        with VmmigPair(workdir, label) as pair:
            try:
                address = pair.start_recv("--discard", timeout=START_TIMEOUT)
                slave: int | None = None
                if display:
                    master, slave = open_pty()
                    drain = Reader(master, keep=False)  # a pty nobody reads would block the display
                before = cpu_clock()
                try:
                    send_args = [str(image), address, "--stats", str(stats_path), *send_args]
                    pair.start_send(
                        *send_args, quiet=False, stderr=subprocess.DEVNULL if slave is None else slave, env=env
                    )
                finally:
                    if slave is not None:
                        os.close(slave)
                if drain is not None:
                    drain.start()
                try:
                    pair.wait(timeout)
                finally:
                    send, recv = pair.children
                    result.send_code, result.recv_code = send.returncode, recv.returncode
                    result.send_cpu_s, result.recv_cpu_s = send.cpu_s, recv.cpu_s
                    if send.ended is not None:
                        result.wall_s = send.ended - pair.started
                    if send.done.is_set() and recv.done.is_set():
                        result.other_cpu_s = other_cpu(before, pair.cpu_s)
                result.report = send.report(label)
                if stats_path.exists():
                    lines = stats_path.read_text().splitlines()
                    result.records = [json.loads(line) for line in lines if line.strip()]
            except BenchError as exc:
                result.error = str(exc)
    finally:
        if master is not None:
            if drain is not None:
                drain.join(2.0)
            os.close(master)
        stats_path.unlink(missing_ok=True)
    return result


# ----------------------------------------------------------------------------------------------------------------
# 1. Cap accuracy


def cap_windows(records: Sequence[dict[str, Any]], cap: int) -> list[dict[str, float]]:
    """Every WINDOW_S window of the progress records from SKIP_S after the first page, sliding by one record."""
    points = [
        (r["total-time"] / 1000, r["transferred"])
        for r in records
        if r.get("event") == "progress" and r.get("status") == "active" and (r.get("remaining") or 0) > 0
    ]
    windows = []
    for i, (t0, b0) in enumerate(points):
        if t0 < SKIP_S:
            continue
        ends = [(t1, b1) for t1, b1 in points[i + 1 :] if abs(t1 - t0 - WINDOW_S) <= 0.5]
        if not ends:
            continue
        t1, b1 = min(ends, key=lambda p: abs(p[0] - t0 - WINDOW_S))
        rate = (b1 - b0) / (t1 - t0)
        windows.append({"start_s": t0, "end_s": t1, "rate": rate, "ratio": rate / cap})
    return windows


def measure_uncapped(workdir: Path, random_image: Path) -> Migration:
    image = workdir / "uncapped.ram"
    copy_prefix(random_image, image, min(UNCAPPED_SIZE, random_image.stat().st_size))
    try:
        return migrate("uncapped", workdir, image, ["--compress", "none", "--quiet"], display=False, timeout=300)
    finally:
        image.unlink(missing_ok=True)


def rate_of(report: dict[str, Any]) -> float | None:
    ms = report.get("total-time")
    return report["transferred"] / (ms / 1000) if ms else None


def run_cap(workdir: Path, random_image: Path, cap: int, seconds: float, uncapped: float | None) -> CapResult:
    result = CapResult(cap, reachable=uncapped is None or uncapped >= cap)
    if not result.reachable:
        result.verdict = "not reachable here"
        return result
    size = min(pages_floor(cap * (seconds + EXTRA_SECONDS)), random_image.stat().st_size)
    result.image_bytes = size
    image = random_image
    if size < random_image.stat().st_size:
        image = workdir / "cap.ram"
        copy_prefix(random_image, image, size)
    try:
        args = ["--compress", "none", "--max-bandwidth", str(cap), "--quiet"]
        run = migrate(f"cap {cap // MB}M", workdir, image, args, display=False, timeout=3 * size / cap + 60)
    finally:
        if image != random_image:
            image.unlink(missing_ok=True)
    result.run = run
    if not run.ok:
        result.verdict = "ERROR"
        return result
    result.windows = cap_windows(run.records, cap)
    overall = rate_of(run.report)
    result.overall_ratio = None if overall is None else overall / cap
    ratios = result.ratios()
    if not ratios:
        result.verdict = "FAIL (no 5 s window)"
    else:
        inside = all(1 - TOLERANCE <= r <= 1 + TOLERANCE for r in ratios)
        result.verdict = "PASS" if inside else "FAIL"
    return result


def print_cap_header(uncapped: Migration) -> None:
    rate = rate_of(uncapped.report) if uncapped.ok else None
    print(
        f"   uncapped (--compress none into --discard, {fmt(uncapped.report.get('transferred', 0) / MB, '.0f')} MB): "
        f"{fmt(None if rate is None else rate / MB, '.0f')} MB/s wire"
        + ("" if uncapped.ok else f"  ERROR: {uncapped.error}")
    )
    print(
        f"   {'cap MB/s':>8}  {'image MB':>8}  {'wall s':>6}  {'windows':>7}  {'min':>6}  {'median':>6}  {'max':>6}  "
        f"{'overall':>7}  {'other CPU s':>11}  verdict"
    )


def print_cap_row(r: CapResult) -> None:
    ratios = r.ratios()
    low, mid, high = (min(ratios), statistics.median(ratios), max(ratios)) if ratios else (None, None, None)
    run = r.run
    print(
        f"   {r.cap / MB:>8.0f}  {fmt(r.image_bytes / MB if r.image_bytes else None, '.0f'):>8}  "
        f"{fmt(run.wall_s if run else None, '.1f'):>6}  {len(ratios):>7}  "
        f"{fmt(low, '.4f'):>6}  {fmt(mid, '.4f'):>6}  {fmt(high, '.4f'):>6}  {fmt(r.overall_ratio, '.4f'):>7}  "
        f"{fmt(run.other_cpu_s if run else None, '.2f'):>11}  {r.verdict}"
        + (f"  ({run.error})" if run and run.error else ""),
        flush=True,
    )


# ----------------------------------------------------------------------------------------------------------------
# 2. Display CPU share


def run_display(workdir: Path, image: Path, runs: int) -> list[Migration]:
    print(
        f"   {'run':>3}  {'display':>7}  {'wall s':>6}  {'send CPU s':>10}  {'display share':>13}  {'other CPU s':>11}"
    )
    results = []
    args = ["--max-bandwidth", DISPLAY_CAP]
    for index in range(runs):
        for display in (True, False):
            label = f"display {'on' if display else 'off'} #{index + 1}"
            run = migrate(label, workdir, image, args, display=display, timeout=300)
            results.append(run)
            share = run.report.get("display-cpu-share")
            print(
                f"   {index + 1:>3}  {'on' if display else 'off':>7}  {fmt(run.wall_s, '.2f'):>6}  "
                f"{fmt(run.send_cpu_s, '.3f'):>10}  {pct(share) + (' %' if share is not None else ''):>13}  "
                f"{fmt(run.other_cpu_s, '.2f'):>11}" + (f"  ERROR: {run.error}" if not run.ok else ""),
                flush=True,
            )
    return results


def display_summary(runs: Sequence[Migration]) -> dict[str, Any]:
    on = [r for r in runs if r.ok and r.label.startswith("display on")]
    off = [r for r in runs if r.ok and r.label.startswith("display off")]
    cpu_on = statistics.median([r.send_cpu_s for r in on if r.send_cpu_s is not None]) if on else None
    cpu_off = statistics.median([r.send_cpu_s for r in off if r.send_cpu_s is not None]) if off else None
    shares = [r.report["display-cpu-share"] for r in on if "display-cpu-share" in r.report]
    share = statistics.median(shares) if shares else None
    diff = None if cpu_on is None or not cpu_off else (cpu_on - cpu_off) / cpu_off
    return {
        "runs_on": len(on),
        "runs_off": len(off),
        "median_cpu_on_s": cpu_on,
        "median_cpu_off_s": cpu_off,
        "on_minus_off_share": diff,
        "self_measured_shares": shares,
        "median_self_measured_share": share,
        "verdict": "FAIL (no measurement)" if share is None else ("PASS" if share <= DISPLAY_GOAL else "FAIL"),
    }


# ----------------------------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="5 s per cap, 3 display runs each way")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per cap (default 20; 5 with --quick)")
    parser.add_argument("--display-runs", type=int, default=None, help="display runs each way (default 5; 3 quick)")
    parser.add_argument("--json", dest="json_path", metavar="PATH", help="write every result to PATH")
    add_tree_option(parser)
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (QUICK_SECONDS if args.quick else FULL_SECONDS)
    args.display_runs = args.display_runs or (QUICK_DISPLAY_RUNS if args.quick else DISPLAY_RUNS)
    if args.seconds < WINDOW_S or args.display_runs < 1:
        parser.error(f"--seconds must be at least {WINDOW_S:.0f} and --display-runs at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(functools.partial(benchmark, args), "vmmig-bench-cap-", args.tree)


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    load = os.getloadavg()
    print(f"vmmig cap/display benchmark  {datetime.now().isoformat(timespec='seconds')}  {platform.node()}")
    print(
        f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; caps "
        f"{', '.join(f'{c // MB}M' for c in CAPS)} for {args.seconds:.0f} s each; display runs {args.display_runs} "
        "on + off"
    )
    generator = load_generator()
    started = time.monotonic()
    random_image = workdir / "random.ram"
    random_size = max(pages_floor(max(CAPS) * (args.seconds + EXTRA_SECONDS)), UNCAPPED_SIZE)
    t0 = time.monotonic()
    generator.generate(str(random_image), random_size, seed=1, profile="random", page_size=PAGE_SIZE)
    print(f"generated a {random_size / MB:.0f} MB random image in {time.monotonic() - t0:.1f}s")

    print(
        f"\n1. Cap accuracy ({WINDOW_S:.0f} s windows from {SKIP_S:.0f} s after the first page, slid by 1 s; "
        f"ratio = window wire rate / cap; PASS if all within {1 - TOLERANCE:.2f}-{1 + TOLERANCE:.2f})"
    )
    uncapped = measure_uncapped(workdir, random_image)
    uncapped_rate = rate_of(uncapped.report) if uncapped.ok else None
    print_cap_header(uncapped)
    caps = []
    for cap in CAPS:
        result = run_cap(workdir, random_image, cap, args.seconds, uncapped_rate)
        caps.append(result)
        print_cap_row(result)
    random_image.unlink()

    display_image = workdir / "mixed.ram"
    generator.generate(str(display_image), DISPLAY_SIZE, seed=1, profile="mixed", page_size=PAGE_SIZE)
    print(
        f"\n2. Display CPU share ({DISPLAY_SIZE // MIB} MiB mixed image, zlib level 1, --max-bandwidth "
        f"{DISPLAY_CAP}; display on = stderr is a {PTY_COLUMNS}x{PTY_ROWS} pty, off = stderr to /dev/null)"
    )
    display_runs = run_display(workdir, display_image, args.display_runs)

    display = display_summary(display_runs)
    share, diff = display["median_self_measured_share"], display["on_minus_off_share"]
    print(
        f"   median sender CPU: on {fmt(display['median_cpu_on_s'], '.3f')} s, "
        f"off {fmt(display['median_cpu_off_s'], '.3f')} s -> on - off = {pct(diff, '+.2f')} % of off; "
        f"self-measured display-cpu-share (median of the on runs) {pct(share)} %"
    )

    print("\nGoals")
    for r in caps:
        ratios = r.ratios()
        detail = (
            f"windows {min(ratios):.4f}-{max(ratios):.4f}, median {statistics.median(ratios):.4f}, "
            f"overall {fmt(r.overall_ratio, '.4f')}"
            if ratios
            else r.verdict.removeprefix("FAIL (").removesuffix(")")
        )
        verdict = "N/A" if r.verdict == "not reachable here" else r.verdict.split(" (")[0]
        print(f"   [{verdict}] cap {r.cap // MB}M held within +-{100 * TOLERANCE:.0f} % in every 5 s window ({detail})")
    print(
        f"   [{display['verdict'].split(' (')[0]}] live display <= {100 * DISPLAY_GOAL:.0f} % of the sender's CPU "
        f"(self-measured {pct(share)} %; on-vs-off rusage difference {pct(diff, '+.2f')} %)"
    )

    failed = [m for m in [uncapped, *(c.run for c in caps if c.run), *display_runs] if not m.ok]
    if args.json_path:
        document = {
            "config": {
                "quick": args.quick,
                "seconds": args.seconds,
                "caps": list(CAPS),
                "window_s": WINDOW_S,
                "skip_s": SKIP_S,
                "tolerance": TOLERANCE,
                "display_runs": args.display_runs,
                "display_size": DISPLAY_SIZE,
                "display_cap": DISPLAY_CAP,
                "display_goal": DISPLAY_GOAL,
            },
            "host": {"node": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
            "load_average_at_start": load,
            "uncapped": {"rate": uncapped_rate, "run": asdict(uncapped)},
            "caps": [asdict(c) for c in caps],
            "display": {"summary": display, "runs": [asdict(m) for m in display_runs]},
            "failed": [m.label for m in failed],
        }
        Path(args.json_path).write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nresults written to {args.json_path}")
    print(f"\ntotal time {time.monotonic() - started:.0f}s")
    if failed:
        print(f"\nmigration(s) failed: {', '.join(m.label for m in failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
