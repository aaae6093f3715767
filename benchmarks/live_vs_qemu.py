"""bench_live.py ``--with-qemu``: QEMU's own live migration of the examples/qemu guest at the downtime promise's dirty
rate, caps and limit, side by side with vmmig's.

For each cap of the promise section, benchmarks/bench_qemu_live.py runs as a child process (its own session; killed
by process group if this benchmark is interrupted) with ``--cap CAP --write-mb N --downtime-limit LIMIT``, where N is
the promise's write rate in whole MiB/s: its TCG guest rewrites N MiB of its 256 MiB of RAM from /dev/urandom, then
sleeps a second, so it dirties at most about that (random pages, like the promise's ``random`` content). Its output
streams through, prefixed by ``|``; its JSON gives the rows of the side-by-side table, next to the promise's random
runs at the same cap (medians over the runs).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import MB, MIB, REPO, fmt, load_module, median_of, print_table
from live_promise import PromiseRun

BENCH_QEMU_LIVE = Path(__file__).with_name("bench_qemu_live.py")
CASES: tuple[str, ...] = ("qemu plain", "qemu multifd-zstd", "vmmig zstd")
QUICK_CASES: tuple[str, ...] = ("qemu plain", "vmmig zstd")
KILL_GRACE = 30.0  # seconds bench_qemu_live.py gets to clean up after SIGTERM


@dataclass(frozen=True)
class QemuConfig:
    caps: tuple[str, ...]
    write_rate: int  # the promise's, bytes/s
    downtime_limit_ms: float
    repeat: int
    cases: tuple[str, ...]
    tree: Path | None = None

    @property
    def write_mb(self) -> int:
        """bench_qemu_live.py's --write-mb: whole MiB rewritten per second."""
        return max(1, round(self.write_rate / MIB))


def unavailable() -> str | None:
    """Why QEMU's side cannot run here (no QEMU, no guest built), or None."""
    rg = load_module(REPO / "examples" / "qemu" / "run_guest.py", "run_guest")
    if shutil.which(rg.QEMU) is None:
        return f"{rg.QEMU} not found (apt-get install -y qemu-system-x86)"
    try:
        rg.kernel_paths()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def run_cap(config: QemuConfig, cap: str, workdir: Path) -> tuple[list[dict[str, Any]], str | None]:
    """bench_qemu_live.py at one cap: its runs (each with ``cap`` added) and why it failed, if it did."""
    json_path = workdir / f"qemu-live-{cap}.json"
    argv = [
        sys.executable, str(BENCH_QEMU_LIVE), "--cap", cap, "--write-mb", str(config.write_mb),
        "--downtime-limit", f"{config.downtime_limit_ms:g}ms", "--repeat", str(config.repeat),
        "--cases", ",".join(config.cases), "--json", str(json_path),
    ]  # fmt: skip
    if config.tree is not None:
        argv += ["--tree", str(config.tree)]
    print(f"\n   $ bench_qemu_live.py {' '.join(argv[2:])}", flush=True)
    child = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        assert child.stdout is not None
        for line in child.stdout:
            print(f"   | {line.rstrip()}", flush=True)
        child.wait()
    finally:
        if child.poll() is None:  # interrupted: let it kill its QEMUs and remove its /dev/shm files
            os.killpg(child.pid, signal.SIGTERM)
            try:
                child.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
    runs = json.loads(json_path.read_text()) if json_path.exists() else []
    json_path.unlink(missing_ok=True)
    for run in runs:
        run["cap"] = cap
    return runs, None if child.returncode == 0 else f"bench_qemu_live.py --cap {cap} exited {child.returncode}"


# ----------------------------------------------------------------------------------------------------------------
# Side by side


COLUMNS: tuple[tuple[str, int], ...] = (
    ("cap", 4), ("tool", 22), ("guest", 28), ("ok", 5), ("down ms", 7), ("stop->run ms", 12), ("exp ms", 6),
    ("total-time ms", 13), ("dirty MB/s", 10),
)  # fmt: skip


def vmmig_rows(cap: str, runs: Sequence[PromiseRun], write_rate: int) -> list[list[str]]:
    """The promise's random-content runs at ``cap``, one row per codec."""
    rows = []
    at_cap = [run for run in runs if run.case.cap_text == cap and run.case.content == "random"]
    for codec in dict.fromkeys(run.case.codec for run in at_cap):
        results = [run.result for run in at_cap if run.case.codec == codec]
        ok = [r for r in results if r.converged]
        down = median_of(ok, lambda r: r.downtime_ms)
        rows.append([
            cap, f"vmmig {codec}", f"simulated, random, {write_rate / MB:.1f} MB/s", f"{len(ok)}/{len(results)}",
            fmt(down, ".0f"), fmt(down, ".0f"), fmt(median_of(ok, lambda r: r.expected_downtime_ms), ".0f"),
            fmt(median_of(ok, lambda r: r.total_time_ms), ".0f"),
            fmt(median_of(ok, lambda r: None if r.max_dirty_rate is None else r.max_dirty_rate / MB), ".1f"),
        ])  # fmt: skip
    return rows


def _field(run: dict[str, Any], key: str) -> float | None:
    return run.get(key)


def _detail(run: dict[str, Any], key: str) -> float | None:
    return (run.get("detail") or {}).get(key)


def qemu_rows(cap: str, runs: Sequence[dict[str, Any]], config: QemuConfig) -> list[list[str]]:
    """bench_qemu_live.py's runs at ``cap``, one row per case (QEMU's own and vmmig's QEMU mode)."""
    rows = []
    for case in config.cases:
        all_runs = [r for r in runs if r["cap"] == cap and r["case"] == case]
        ok = [r for r in all_runs if r.get("error") is None and r.get("continued")]
        if not all_runs:
            continue

        def med(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            return median_of(ok, functools.partial(_field, key=key))

        def med_detail(key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            return median_of(ok, functools.partial(_detail, key=key))

        # QEMU's own dirty-pages-rate often stays 0 on so short a migration: only vmmig's measurement is shown
        dirty = None if case.startswith("qemu ") else med_detail("dirty-rate")
        tool = case if case.startswith("qemu ") else f"{case} (QEMU mode)"
        rows.append([
            cap, tool, f"QEMU TCG, {config.write_mb} MiB/s urandom", f"{len(ok)}/{len(all_runs)}",
            fmt(med("downtime_ms"), ".0f"), fmt(med("stop_to_run_ms"), ".0f"),
            fmt(med_detail("expected-downtime"), ".0f"), fmt(med("total_time_ms"), ".0f"),
            fmt(None if dirty is None else dirty / MB, ".1f"),
        ])  # fmt: skip
    return rows


def run_with_qemu(config: QemuConfig, workdir: Path, promise: Sequence[PromiseRun]) -> dict[str, Any]:
    """Run bench_qemu_live.py at every cap, print the side-by-side table, return both for --json."""
    print(
        f"\n5. Side by side with QEMU (examples/qemu guest rewriting {config.write_mb} MiB/s; caps "
        f"{', '.join(config.caps)}; downtime-limit {config.downtime_limit_ms:g} ms; {config.repeat} round(s))"
    )
    if reason := unavailable():
        print(f"   skipped: {reason}")
        return {"skipped": reason}
    runs: list[dict[str, Any]] = []
    failures = []
    for cap in config.caps:
        cap_runs, failure = run_cap(config, cap, workdir)
        runs += cap_runs
        if failure:
            failures.append(failure)
    print()
    rows = []
    for cap in config.caps:
        rows += vmmig_rows(cap, promise, config.write_rate) + qemu_rows(cap, runs, config)
    print_table(COLUMNS, rows, left=(0, 1, 2))
    print(
        "ok: converged (vmmig, simulated guest) or migrated and continued (QEMU guest) / runs. down ms: each tool's "
        "own downtime\n(QEMU: source stop -> last byte sent; vmmig: pause -> destination verified, or running in QEMU "
        "mode); stop->run:\nQEMU's STOP -> RESUME events (vmmig rows repeat its downtime). exp ms: vmmig's estimate at "
        "the switchover.\ntotal-time: each tool's own. dirty MB/s: vmmig's highest pass dirty-rate (for the QEMU "
        "guest in\nits QEMU-mode row). Medians."
    )
    for failure in failures:
        print(f"NOTE: {failure} (a QEMU-side migration failed or the guest did not continue; see its lines above)")
    names = [name for name, _ in COLUMNS]
    return {"runs": runs, "failures": failures, "table": [dict(zip(names, row, strict=True)) for row in rows]}
