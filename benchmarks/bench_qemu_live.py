#!/usr/bin/env python3
"""One running QEMU guest, live-migrated three ways on one machine: QEMU plain, QEMU multifd + zstd, vmmig QEMU mode.

What it measures
----------------
The tiny TCG guest of ``examples/qemu`` (256 MiB of RAM in a ``share=on`` file on /dev/shm; prints ``HEARTBEAT n``
every second, ``DATA OK n`` after re-checksumming 32 MiB it holds in RAM every third beat, and rewrites
``--write-mb`` MiB of RAM every second) is booted afresh for every run (source QEMU until ``HEARTBEAT 3``, then a
destination QEMU with ``-S -incoming defer`` and its own, empty RAM file), and moved over 127.0.0.1 by:

* ``qemu plain`` -- QEMU's own live migration of all the RAM (no ``x-ignore-shared``: nobody pre-copies the
  destination file). Both sides: ``migrate-set-parameters`` ``max-bandwidth`` ``--cap`` in bytes/s (without it
  1 TiB/s; QEMU's default is 32 MiB/s) and ``downtime-limit`` ``--downtime-limit`` (default 300 ms);
  ``migrate-incoming tcp:127.0.0.1:PORT`` on the destination, ``migrate`` on the source, ``query-migrate`` polled
  every 5 ms until ``completed``, then the destination's ``query-status`` until it leaves ``inmigrate`` and
  ``cont`` (it is ``paused``: ``-S``).
* ``qemu multifd-zstd`` -- the same with capability ``multifd``, ``multifd-channels`` 2 and ``multifd-compression``
  zstd on both sides.
* ``vmmig zlib``, ``vmmig zstd`` -- ``vmmig recv --listen 127.0.0.1:0 --ready-file F --in-place --qmp DEST.qmp
  --json --quiet DEST.ram`` and ``vmmig send --live SRC.ram ADDR --qmp SRC.qmp --qemu-handoff --compress CODEC
  --downtime-limit LIMIT [--max-bandwidth CAP] --json --quiet``: vmmig pre-copies the RAM live, stops the source,
  sends the last pass, verifies it, lets QEMU move only the device state (``x-ignore-shared``) and the receiver
  ``cont``s the destination.

After every run the guest must continue on the destination: the source's serial log followed by the
destination's must be one consecutive heartbeat sequence (no reboot, no gap) that goes past the source's last
beat, and a ``DATA OK n`` with n greater than that beat (and no ``DATA BAD``) must follow on the destination.

Columns
-------
* ``wall s`` -- QEMU: from the first ``migrate-set-*`` command to ``cont`` returned on the destination (the QEMUs
  are already running). vmmig: from starting the ``send`` process until send and recv have both exited (interpreter
  start-up, the QMP checks, the digest check and the handoff all count; recv was started and listening before).
* ``total-time ms`` -- the tool's own: QEMU's ``total-time`` (``query-migrate`` on the source); vmmig's
  ``total-time`` (first page to the end, handoff included).
* ``downtime ms`` -- the tool's own: QEMU's ``downtime`` (source stop until it sent the last byte: the destination's
  load and ``cont`` are not in it); vmmig's ``downtime`` (pause request until the destination QEMU runs).
* ``stop->run ms`` -- QEMU only: the source's QMP ``STOP`` event to the destination's ``RESUME`` event (both QEMU
  timestamps, one host clock), i.e. what the guest really lost, including this script's 5 ms polling and ``cont``;
  the vmmig rows repeat vmmig's ``downtime``, which measures the same span.
* ``wire MB`` -- the tool's own count, RAM + device state: QEMU's ``ram.transferred`` (caution: QEMU 7.2 counts
  multifd pages *before* compression); vmmig's ``transferred`` + ``qemu-handoff.qemu-stream-bytes``.
* ``IP MB`` -- measured alike for all: growth of ``IpExt OutOctets`` in /proc/net/netstat during the wall window
  (all IP traffic of the machine, headers included; other jobs' traffic would inflate it).
* ``passes`` -- vmmig: ``len(passes)``; QEMU: ``ram.dirty-sync-count`` in parentheses.
* ``CPU s`` -- CPU seconds during the wall window of both QEMUs (the guest's TCG vCPU included) plus vmmig's send and
  recv; ``other CPU s`` -- everything else on the machine in that window (about 0 on a quiet machine).
* ``continued`` -- the guest check above, for every repeat.

Below the table, per case: QEMU's ``ram.dirty-pages-rate`` x 4 KiB at the end (QEMU 7.2 often leaves it at 0 on
so short a migration) and vmmig's highest pass ``dirty-rate`` and ``expected-downtime`` (its estimate at the
switchover decision).

MB = 10^6 bytes. With ``--repeat N`` (default 3) the cases run in N interleaved rounds and medians are shown.
Exit status 1 only if a migration failed or the guest did not continue; 0 otherwise. ``--cap`` and ``--write-mb``
let ``bench_live.py --with-qemu`` run this guest at the same dirty rate, cap and limit as its own simulated guest.

    .venv/bin/python benchmarks/bench_qemu_live.py [--quick] [--repeat 3] [--write-mb 4] [--cap 50M]
        [--downtime-limit 300ms] [--cases ...] [--json F]

Needs qemu-system-x86_64 and the guest built by ``examples/qemu/build_guest.sh`` (``examples/qemu/build/``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    MB,
    REPO,
    BenchError,
    VmmigPair,
    add_tree_option,
    fmt,
    free_port,
    ip_out_octets,
    load_module,
    machine_busy_s,
    own_cpu_s,
    proc_cpu_s,
    run_main,
)

from migrate_cli.units import parse_duration, parse_rate

MAX_BANDWIDTH = 1 << 40  # bytes/s: "unlimited" for QEMU
DOWNTIME_LIMIT = "300ms"
PAGE = 4096  # QEMU's target page size on x86
BOOT_TIMEOUT = 180.0
READY_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 300.0
CONTINUE_TIMEOUT = 60.0
POLL = 0.005
CASES = ("qemu plain", "qemu multifd-zstd", "vmmig zlib", "vmmig zstd")


rg = load_module(REPO / "examples" / "qemu" / "run_guest.py", "run_guest")


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


@dataclass
class Window:
    """CPU and IP counters at the start of a case's wall window."""

    t0: float = field(default_factory=time.perf_counter)
    busy0: float = field(default_factory=machine_busy_s)
    own0: float = field(default_factory=own_cpu_s)
    ip0: int = field(default_factory=ip_out_octets)


def event_time(event: dict[str, Any]) -> float:
    ts = event.get("timestamp", {})
    return float(ts.get("seconds", 0)) + float(ts.get("microseconds", 0)) / 1e6


def loadavg() -> str:
    with open("/proc/loadavg", encoding="ascii") as fh:
        return " ".join(fh.read().split()[:3])


# ----------------------------------------------------------------------------------------------------------------
# vmmig child processes: own session, reaped by a thread with os.wait4 (exit time and rusage)


# ----------------------------------------------------------------------------------------------------------------
# One run


@dataclass
class Run:
    case: str
    round: int
    error: str | None = None
    boot_s: float | None = None
    wall_s: float | None = None
    total_time_ms: float | None = None
    downtime_ms: float | None = None
    stop_to_run_ms: float | None = None
    wire_bytes: int | None = None
    ip_bytes: int | None = None
    passes: int | None = None
    dirty_syncs: int | None = None
    cpu_s: float | None = None
    other_cpu_s: float | None = None
    continued: bool | None = None
    continued_detail: str = ""
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.continued)


def qmp_status(qmp: Any) -> str:
    return str(qmp.execute("query-status")["status"])


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = POLL) -> Any:
    deadline = time.perf_counter() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def start_dest(workdir: Path, ram: Path, write_mb: int) -> Any:
    """A destination QEMU (-S -incoming defer) whose QMP answers 'inmigrate' and whose RAM file exists."""
    dest = rg.start_guest(workdir, ram, "dest", write_mb)
    with dest.qmp(timeout=READY_TIMEOUT) as qmp:
        status = qmp_status(qmp)
    if status != "inmigrate":
        raise BenchError(f"destination QEMU is {status!r}, expected inmigrate")
    size = rg.DEFAULT_MEM_MB * 1024 * 1024
    wait_until(lambda: ram.exists() and ram.stat().st_size == size, READY_TIMEOUT, f"{ram} ({size} bytes)")
    return dest


def finish_window(run: Run, win: Window, t1: float, case_cpu: float) -> None:
    run.wall_s = t1 - win.t0
    run.ip_bytes = ip_out_octets() - win.ip0
    run.cpu_s = case_cpu
    run.other_cpu_s = max(0.0, machine_busy_s() - win.busy0 - (own_cpu_s() - win.own0) - case_cpu)


def migrate_qemu(run: Run, src: Any, dst: Any, multifd: bool, args: argparse.Namespace) -> None:
    uri = f"tcp:127.0.0.1:{free_port()}"
    caps = [{"capability": "multifd", "state": True}] if multifd else []
    params: dict[str, Any] = {"max-bandwidth": args.cap_bytes or MAX_BANDWIDTH, "downtime-limit": args.limit_ms}
    if multifd:
        params.update({"multifd-channels": 2, "multifd-compression": "zstd"})
    with src.qmp() as sq, dst.qmp() as dq:
        if qmp_status(dq) != "inmigrate":
            raise BenchError("destination QEMU is not inmigrate")
        qemu_cpu0 = qemu_cpu_s(src, dst)
        win = Window()
        for q in (dq, sq):
            if caps:
                q.execute("migrate-set-capabilities", capabilities=caps)
            q.execute("migrate-set-parameters", **params)
        dq.execute("migrate-incoming", uri=uri)
        sq.execute("migrate", uri=uri)

        def finished() -> dict[str, Any] | None:
            info: dict[str, Any] = sq.execute("query-migrate")
            return info if info.get("status") in ("completed", "failed", "cancelled") else None

        info = wait_until(finished, MIGRATE_TIMEOUT, "the source's query-migrate to finish")
        if info["status"] != "completed":
            raise BenchError(f"QEMU migration {info['status']}: {info.get('error-desc', 'no reason given')}")
        dest_state = wait_until(lambda: (s := qmp_status(dq)) != "inmigrate" and s, 60.0, "destination to load")
        if dest_state == "paused":
            dq.execute("cont")
        t1 = time.perf_counter()
        case_cpu = qemu_cpu_s(src, dst) - qemu_cpu0
        finish_window(run, win, t1, case_cpu)
        run.detail["dest-status-after-load"] = dest_state
        run.detail["dest-status"] = qmp_status(dq)
        run.detail["source-status"] = qmp_status(sq)
        ram = info.get("ram", {})
        run.total_time_ms = info.get("total-time")
        run.downtime_ms = info.get("downtime")
        run.wire_bytes = ram.get("transferred")
        run.dirty_syncs = ram.get("dirty-sync-count")
        run.detail.update(
            {
                "setup-time": info.get("setup-time"),
                "ram-total": ram.get("total"),
                "ram-normal-pages": ram.get("normal"),
                "ram-duplicate-pages": ram.get("duplicate"),
                "ram-mbps": ram.get("mbps"),
                "multifd-bytes": ram.get("multifd-bytes"),
                "dirty-rate": None if ram.get("dirty-pages-rate") is None else ram["dirty-pages-rate"] * PAGE,
            }
        )
        stops = [e for e in sq.events if e.get("event") == "STOP"]
        resumes = [e for e in dq.events if e.get("event") == "RESUME"]
        if stops and resumes:
            run.stop_to_run_ms = (event_time(resumes[-1]) - event_time(stops[-1])) * 1000
        if run.detail["dest-status"] != "running":
            raise BenchError(f"destination QEMU is {run.detail['dest-status']!r} after cont")


def qemu_cpu_s(*guests: Any) -> float:
    """CPU seconds so far of the QEMU processes (0 for one that is gone)."""
    return sum(proc_cpu_s(guest.pid) or 0.0 for guest in guests)


def migrate_vmmig(run: Run, src: Any, dst: Any, codec: str, workdir: Path, args: argparse.Namespace) -> None:
    with VmmigPair(workdir, f"vmmig {codec}") as pair:
        addr = pair.start_recv("--in-place", "--qmp", str(dst.qmp_path), str(dst.ram_path), timeout=READY_TIMEOUT)
        assert pair.recv is not None
        qemu_cpu0 = qemu_cpu_s(src, dst)
        recv_cpu0 = pair.recv.live_cpu_s() or 0.0
        win = Window()
        cap = ["--max-bandwidth", args.cap] if args.cap else []
        pair.start_send(
            "--live", str(src.ram_path), addr, "--qmp", str(src.qmp_path), "--qemu-handoff", "--compress", codec,
            "--downtime-limit", f"{args.limit_ms}ms", *cap,
        )  # fmt: skip
        try:
            pair.wait(MIGRATE_TIMEOUT)
        finally:
            if all(c.done.is_set() for c in pair.children):
                case_cpu = qemu_cpu_s(src, dst) - qemu_cpu0 + pair.cpu_s - recv_cpu0
                finish_window(run, win, pair.ended, case_cpu)
        send, recv = pair.children
        report, recv_report = pair.reports(verify=False)  # a live hand-off: no digest to compare
        handoff = report.get("qemu-handoff") or {}
        run.total_time_ms = report.get("total-time")
        run.downtime_ms = report.get("downtime")
        run.stop_to_run_ms = run.downtime_ms
        run.wire_bytes = int(report.get("transferred") or 0) + int(handoff.get("qemu-stream-bytes") or 0)
        run.passes = len(report.get("passes") or [])
        run.detail.update(
            {
                "setup-time": report.get("setup-time"),
                "ram-transferred": report.get("transferred"),
                "qemu-stream-bytes": handoff.get("qemu-stream-bytes"),
                "qemu-migrate": handoff.get("qemu-migrate"),
                "switchover": report.get("switchover"),
                "recv-qemu-handoff": recv_report.get("qemu-handoff"),
                "converged": report.get("converged"),
                "compression-ratio": report.get("compression-ratio"),
                "pass-pages": [p.get("pages") for p in report.get("passes") or []],
                "dirty-rate": max((p.get("dirty-rate") or 0 for p in report.get("passes") or []), default=None),
                "expected-downtime": report.get("expected-downtime"),
                "send-cpu-s": send.cpu_s,
                "recv-cpu-s": recv.cpu_s,
            }
        )
        with src.qmp() as sq:
            run.detail["source-status"] = qmp_status(sq)
        with dst.qmp() as dq:
            run.detail["dest-status"] = qmp_status(dq)
        if run.detail["dest-status"] != "running":
            raise BenchError(f"destination QEMU is {run.detail['dest-status']!r} after vmmig")


def check_continued(run: Run, src: Any, dst: Any) -> None:
    """The guest continues on the destination (run_guest.continued)."""

    def gone() -> str | None:
        return None if dst.alive() else f"destination QEMU exited {dst.popen.returncode}"

    run.continued, run.continued_detail = rg.continued(
        src.serial_log, dst.serial_log, src.serial_log.with_name("combined.serial.log"), gone, CONTINUE_TIMEOUT
    )


def run_case(case: str, rnd: int, args: argparse.Namespace, workdir: Path, ramdir: Path) -> Run:
    run = Run(case, rnd)
    tag = f"r{rnd}-{case.replace(' ', '-')}"
    casedir = workdir / tag
    casedir.mkdir()
    src_ram, dst_ram = ramdir / f"{tag}-src.ram", ramdir / f"{tag}-dst.ram"
    src = dst = None
    try:
        src = rg.start_guest(casedir, src_ram, "source", args.write_mb)
        rg.wait_for_line(src.serial_log, r"^HEARTBEAT 3 ", BOOT_TIMEOUT, proc=src)
        run.boot_s = time.monotonic() - src.started
        dst = start_dest(casedir, dst_ram, args.write_mb)
        if case.startswith("qemu "):
            migrate_qemu(run, src, dst, case == "qemu multifd-zstd", args)
        else:
            migrate_vmmig(run, src, dst, case.split()[1], casedir, args)
        check_continued(run, src, dst)
    except (BenchError, TimeoutError, RuntimeError, OSError, rg.QmpError, KeyError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
        for g in (src, dst):
            if g is not None and not g.alive() and (err := g.stderr_text().strip()):
                run.error += f"; {g.role} QEMU exited {g.popen.returncode}: {err[-300:]}"
    finally:
        for g in (dst, src):
            if g is not None:
                g.kill()
        for p in (src_ram, dst_ram):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return run


# ----------------------------------------------------------------------------------------------------------------
# Output


def median(runs: Sequence[Run], get: Callable[[Run], float | None]) -> float | None:
    values = [v for r in runs if r.error is None and (v := get(r)) is not None]
    return statistics.median(values) if values else None


def mb(value: float | None) -> float | None:
    return None if value is None else value / MB


def run_line(r: Run) -> str:
    if r.error is not None:
        return f"  round {r.round} {r.case}: FAILED ({r.error})"
    passes = f"passes {r.passes}" if r.passes is not None else f"dirty-sync-count {r.dirty_syncs}"
    return (
        f"  round {r.round} {r.case}: boot {fmt(r.boot_s)}s, wall {fmt(r.wall_s, '.2f')}s, "
        f"total-time {fmt(r.total_time_ms, '.0f')}ms, downtime {fmt(r.downtime_ms, '.0f')}ms, "
        f"stop->run {fmt(r.stop_to_run_ms, '.0f')}ms, wire {fmt(mb(r.wire_bytes))}MB, IP {fmt(mb(r.ip_bytes))}MB, "
        f"{passes}, CPU {fmt(r.cpu_s)}s, other CPU {fmt(r.other_cpu_s)}s; "
        f"continued: {'yes' if r.continued else 'no'} ({r.continued_detail})"
    )


def print_table(cases: Sequence[str], runs: Sequence[Run]) -> None:
    head = [
        "case",
        "wall s",
        "total-time ms",
        "downtime ms",
        "stop->run ms",
        "wire MB",
        "IP MB",
        "passes",
        "CPU s",
        "other CPU s",
        "continued",
    ]  # fmt: skip
    rows = []
    for case in cases:
        rs = [r for r in runs if r.case == case]
        good = [r for r in rs if r.error is None]
        n_cont = sum(1 for r in rs if r.continued)
        if not good:
            rows.append([case, *["-"] * 9, f"no (0/{len(rs)})"])
            continue
        qemu = case.startswith("qemu ")
        passes = median(rs, lambda r: r.dirty_syncs) if qemu else median(rs, lambda r: r.passes)
        rows.append(
            [
                case,
                fmt(median(rs, lambda r: r.wall_s), ".2f"),
                fmt(median(rs, lambda r: r.total_time_ms), ".0f"),
                fmt(median(rs, lambda r: r.downtime_ms), ".0f"),
                fmt(median(rs, lambda r: r.stop_to_run_ms), ".0f"),
                fmt(mb(median(rs, lambda r: r.wire_bytes))),
                fmt(mb(median(rs, lambda r: r.ip_bytes))),
                f"({fmt(passes, 'g')})" if qemu else fmt(passes, "g"),
                fmt(median(rs, lambda r: r.cpu_s)),
                fmt(median(rs, lambda r: r.other_cpu_s)),
                ("yes" if n_cont == len(rs) else "no") + f" ({n_cont}/{len(rs)})",
            ]
        )
    widths = [max(len(str(row[i])) for row in [head, *rows]) for i in range(len(head))]

    def join(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    print(join(head))
    print(join(["-" * w for w in widths]))
    for row in rows:
        print(join(row))


def detail_value(run: Run, key: str, sub: str | None = None) -> float | None:
    v = run.detail.get(key)
    if sub is not None:
        v = v.get(sub) if isinstance(v, dict) else None
    return float(v) if isinstance(v, int | float) else None


def print_details(cases: Sequence[str], runs: Sequence[Run]) -> None:
    print("\ndetails (medians):")
    for case in cases:
        rs = [each for each in runs if each.case == case and each.error is None]
        if not rs:
            continue

        def med(key: str, sub: str | None = None, rs: list[Run] = rs) -> float | None:
            return median(rs, lambda run: detail_value(run, key, sub))

        if case.startswith("qemu "):
            print(
                f"  {case}: setup-time {fmt(med('setup-time'), '.0f')}ms, ram.total {fmt(mb(med('ram-total')))}MB, "
                f"normal pages {fmt(med('ram-normal-pages'), '.0f')}, "
                f"zero pages {fmt(med('ram-duplicate-pages'), '.0f')}, "
                f"multifd-bytes {fmt(mb(med('multifd-bytes')))}MB, ram.mbps {fmt(med('ram-mbps'), '.0f')}, "
                f"ram.dirty-pages-rate x 4 KiB {fmt(mb(med('dirty-rate')))}MB/s"
            )
        else:
            sw = {k: fmt(med("switchover", k), ".0f") for k in ("pause", "scan", "send", "verify")}
            print(
                f"  {case}: setup-time {fmt(med('setup-time'), '.0f')}ms, RAM wire {fmt(mb(med('ram-transferred')))}MB"
                f", device state {fmt(med('qemu-stream-bytes'), '.0f')} B, qemu-migrate "
                f"{fmt(med('qemu-migrate'), '.0f')}ms, switchover ms {sw} (verify = the rest of the downtime: "
                f"digest check, device state, cont), compression-ratio {fmt(med('compression-ratio'), '.2f')}, "
                f"send CPU {fmt(med('send-cpu-s'))}s, recv CPU {fmt(med('recv-cpu-s'))}s, "
                f"dirty {fmt(mb(med('dirty-rate')))}MB/s, expected-downtime {fmt(med('expected-downtime'), '.0f')}ms"
            )


# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported (default 3)")
    ap.add_argument("--quick", action="store_true", help="one round (--repeat 1)")
    ap.add_argument("--write-mb", type=int, default=4, help="MiB of RAM the guest rewrites every second (default 4)")
    ap.add_argument("--cap", help="max-bandwidth of both tools, bytes/s (e.g. 50M; default: QEMU 1 TiB/s, vmmig none)")
    ap.add_argument("--downtime-limit", default=DOWNTIME_LIMIT, help=f"of both tools (default {DOWNTIME_LIMIT})")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of: {', '.join(CASES)}")
    ap.add_argument("--json", type=Path, help="also write every run as JSON here")
    add_tree_option(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    try:
        args.cap_bytes = parse_rate(args.cap) if args.cap else None
        args.limit_ms = round(parse_duration(args.downtime_limit) * 1000)
    except ValueError as exc:
        ap.error(str(exc))
    if args.cap and not args.cap_bytes:
        ap.error("--cap must be a positive rate")
    args.case_list = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in args.case_list if c not in CASES]
    if unknown:
        ap.error(f"unknown cases: {', '.join(unknown)}")
    return args


def benchmark(args: argparse.Namespace, workdir: Path, ramdir: Path) -> int:
    version = subprocess.run([rg.QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    print(f"QEMU: {version.splitlines()[0] if version else 'unknown'} (TCG)")
    print(f"guest: {rg.DEFAULT_MEM_MB} MiB RAM on /dev/shm, write_mb {args.write_mb}; kernel {rg.kernel_paths()[0]}")
    cap = f"{args.cap} ({args.cap_bytes} bytes/s)" if args.cap else "none (QEMU 1 TiB/s)"
    print(f"max-bandwidth: {cap}; downtime-limit {args.limit_ms} ms (both tools)")
    print(f"cases: {', '.join(args.case_list)}; {args.repeat} interleaved round(s); {os.cpu_count()} CPUs")
    print(f"load average at start: {loadavg()}", flush=True)
    runs: list[Run] = []
    for rnd in range(1, args.repeat + 1):
        for case in args.case_list:
            run = run_case(case, rnd, args, workdir, ramdir)
            runs.append(run)
            print(run_line(run), flush=True)
    print(f"load average at end: {loadavg()}\n")
    print_table(args.case_list, runs)
    print_details(args.case_list, runs)
    print(
        "\nwall: QEMU = first migrate-set-* -> cont returned; vmmig = send started -> send and recv exited.\n"
        "downtime: each tool's own (QEMU: source stop -> last byte sent; vmmig: pause -> destination running).\n"
        "stop->run: QEMU STOP event (source) -> RESUME event (destination); vmmig rows repeat vmmig's downtime.\n"
        "wire MB: QEMU ram.transferred (7.2 counts multifd pages before compression); vmmig RAM + device state.\n"
        "IP MB: IpExt OutOctets growth during the wall window. passes: vmmig passes; (QEMU dirty-sync-count)."
    )
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in runs], indent=2) + "\n")
    failed = [r for r in runs if not r.ok]
    if failed:
        print(f"\nFAILED: {', '.join(f'round {r.round} {r.case}' for r in failed)} (exit status 1)")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        rg.kernel_paths()
    except FileNotFoundError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    if shutil.which(rg.QEMU) is None:
        print(f"bench: {rg.QEMU} not found (apt-get install qemu-system-x86)", file=sys.stderr)
        return 1

    def in_dirs(ramdir: Path) -> int:  # the guests' RAM in /dev/shm, their sockets and logs in /tmp
        with tempfile.TemporaryDirectory(prefix="vmmig-bench-qemu-live-") as workdir:
            return benchmark(args, Path(workdir), ramdir)

    return run_main(in_dirs, "vmmig-bench-qemu-live-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
