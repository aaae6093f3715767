#!/usr/bin/env python3
"""Issue 20's target: a guest libvirt runs moves with no more downtime than the same guest with direct QMP sockets.

What it measures
----------------
The same guest in two set-ups, booted afresh for every run, moved live over 127.0.0.1 by vmmig with
``--qemu-handoff`` (vmmig pre-copies the RAM, stops the source, sends the last pass and verifies it; QEMU moves only
the device state with ``x-ignore-shared``; the destination runs):

* ``qmp`` -- plain QEMU started by ``examples/qemu/run_guest.py`` (RAM in a ``share=on`` file on /dev/shm, a QMP
  socket of its own on each end; the destination with ``-S -incoming defer``):
  ``vmmig recv --in-place --qmp DEST.qmp DEST.ram`` and ``vmmig send --live SRC.ram ADDR --qmp SRC.qmp --qemu-handoff``.
* ``libvirt`` -- two domains on one libvirtd (``examples/libvirt``: shared memfd RAM; the source defined persistent
  and started, the destination created transient and paused with ``-incoming defer``):
  ``vmmig recv libvirt:DEST`` and ``vmmig send --live libvirt:SRC ADDR --qemu-handoff`` (QMP through one ``virsh``
  session per domain; the source destroyed and the destination resumed through libvirt).

Both: the ``examples/qemu`` guest (same kernel and initrd, 256 MiB, 1 vCPU, TCG), rewriting ``--write-mb`` MiB of
RAM every second, migrated once it printed ``HEARTBEAT 3``, the same vmmig options (``--downtime-limit`` if given).
The modes alternate run by run (qmp, libvirt, qmp, ...), so both see the same machine.

Per run: the sender's ``downtime`` (pause request until the destination QEMU runs: what the guest loses) and
``expected-downtime`` (its estimate at the switchover decision), ``total-time``, the switchover steps (pause, scan,
send, verify ms), the handoff steps (sender: ``qemu-migrate`` ms, device-state bytes, ``libvirt-destroy`` ms, the
source's state; receiver: ``qemu-load`` ms and ``cont`` ms, the latter a ``virsh resume`` under libvirt) and whether
the guest continued: the source's serial log followed by the destination's is one consecutive heartbeat sequence that
goes past the source's last beat, followed by a ``DATA OK n`` (n past that beat) and no ``DATA BAD``. Under libvirt,
the source must end ``shut off`` and the destination ``running`` (``virsh domstate``). ``other CPU s``: the CPU
the rest of the machine used during the migration (both QEMUs and vmmig excluded): a busy machine spoils downtimes.

The verdict: median downtime libvirt - median downtime qmp <= 50 ms ("target met"), over the successful runs.

    .venv/bin/python benchmarks/bench_libvirt.py [--repeat 3] [--quick] [--write-mb 4] [--downtime-limit 300ms]
        [--json F]

Needs root, libvirt (``libvirt-daemon-system``, ``libvirt-clients``), ``qemu-system-x86_64`` and the guest built by
``examples/qemu/build_guest.sh``; skipped with the reason (exit 0) otherwise. When no libvirtd answers on
``qemu:///system`` it starts ``virtlogd`` and ``libvirtd`` itself and stops exactly those at the end. Exit 1 if a
run failed or the guest did not continue; the verdict itself does not change the exit status.
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from harness import (
    REPO,
    BenchError,
    VmmigPair,
    add_tree_option,
    cpu_clock,
    fmt,
    load_module,
    machine_info,
    other_cpu,
    print_table,
    proc_cpu_s,
    run_main,
)

from migrate_cli.units import parse_duration

TARGET_MS = 50.0  # issue 20: libvirt's median downtime within this of direct QMP's
MODES = ("qmp", "libvirt")
BOOT_TIMEOUT = 180.0
READY_TIMEOUT = 30.0
MIGRATE_TIMEOUT = 300.0
CONTINUE_TIMEOUT = 60.0

rg = load_module(REPO / "examples" / "qemu" / "run_guest.py", "run_guest")
host = load_module(REPO / "examples" / "libvirt" / "libvirt_host.py", "libvirt_host")


@dataclass
class Run:
    mode: str
    round: int
    error: str | None = None
    boot_s: float | None = None
    wall_s: float | None = None
    downtime_ms: float | None = None
    expected_downtime_ms: float | None = None
    total_time_ms: float | None = None
    passes: int | None = None
    other_cpu_s: float | None = None
    continued: bool | None = None
    continued_detail: str = ""
    switchover: dict[str, Any] = field(default_factory=dict)
    handoff: dict[str, Any] = field(default_factory=dict)  # the sender's qemu-handoff steps
    recv_handoff: dict[str, Any] = field(default_factory=dict)  # the receiver's
    states: dict[str, str] = field(default_factory=dict)  # source and destination after the move

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.continued)


# ----------------------------------------------------------------------------------------------------------------
# The two set-ups: each yields (source serial log, destination serial log, recv args, send args before ADDR,
# send args after ADDR, QEMU pids, is-the-destination-alive, states-after)


@dataclass
class Pair:
    source_log: Path
    dest_log: Path
    recv_args: list[str]
    send_source: str
    send_args: list[str]
    qemu_pids: Callable[[], list[int]]
    dest_alive: Callable[[], bool]
    states: Callable[[], dict[str, str]]


def qmp_status(guest: Any) -> str:
    with guest.qmp() as q:
        return str(q.execute("query-status")["status"])


@contextlib.contextmanager
def qmp_pair(casedir: Path, ramdir: Path, tag: str, write_mb: int) -> Iterator[Pair]:
    """Two plain QEMUs, RAM in /dev/shm files; killed by PID and their RAM files removed afterwards."""
    src_ram, dst_ram = ramdir / f"{tag}-src.ram", ramdir / f"{tag}-dst.ram"
    guests: list[Any] = []
    try:
        src = rg.start_guest(casedir, src_ram, "source", write_mb)
        guests.append(src)
        dst = rg.start_guest(casedir, dst_ram, "dest", write_mb)
        guests.append(dst)
        rg.wait_for_line(src.serial_log, r"^HEARTBEAT 3 ", BOOT_TIMEOUT, proc=src)
        if (status := qmp_status(dst)) != "inmigrate":
            raise BenchError(f"destination QEMU is {status!r}, expected inmigrate")
        size = rg.DEFAULT_MEM_MB << 20
        deadline = time.monotonic() + READY_TIMEOUT
        while not (dst_ram.exists() and dst_ram.stat().st_size == size):
            if time.monotonic() > deadline:
                raise BenchError(f"{dst_ram} did not reach {size} bytes")
            time.sleep(0.05)
        yield Pair(
            src.serial_log, dst.serial_log,
            ["--in-place", "--qmp", str(dst.qmp_path), str(dst_ram)],
            str(src_ram), ["--qmp", str(src.qmp_path)],
            lambda: [src.pid, dst.pid], dst.alive,
            lambda: {"source": qmp_status(src), "destination": qmp_status(dst)},
        )  # fmt: skip
    finally:
        for guest in reversed(guests):
            guest.kill()
        for path in (src_ram, dst_ram):
            path.unlink(missing_ok=True)


def domain_pid(name: str) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(Path(f"/run/libvirt/qemu/{name}.pid").read_text().strip())
    return None


@contextlib.contextmanager
def libvirt_pair(casedir: Path, tag: str, write_mb: int) -> Iterator[Pair]:
    """A running persistent source domain and a paused transient destination; both destroyed and undefined."""
    src, dst = f"vmmig-bench-src-{os.getpid()}-{tag}", f"vmmig-bench-dst-{os.getpid()}-{tag}"
    (casedir / "src.xml").write_text(host.domain_xml("source", src, casedir, write_mb=write_mb))
    (casedir / "dst.xml").write_text(host.domain_xml("destination", dst, casedir, write_mb=write_mb))
    source_log, dest_log = casedir / f"{src}.serial.log", casedir / f"{dst}.serial.log"
    try:
        host.virsh("define", str(casedir / "src.xml"))
        host.virsh("start", src)
        host.virsh("create", str(casedir / "dst.xml"), "--paused")
        rg.wait_for_line(source_log, r"^HEARTBEAT 3 ", BOOT_TIMEOUT)
        uri = ["--libvirt-uri", host.URI]
        yield Pair(
            source_log, dest_log, [*uri, f"libvirt:{dst}"], f"libvirt:{src}", uri,
            lambda: [p for p in (domain_pid(src), domain_pid(dst)) if p is not None],
            lambda: host.virsh("domstate", dst, check=False) == "running",
            lambda: {"source": host.virsh("domstate", src, check=False),
                     "destination": host.virsh("domstate", dst, check=False)},
        )  # fmt: skip
    finally:
        for name in (src, dst):
            host.virsh("destroy", name, check=False)
            host.virsh("undefine", name, check=False)


# ----------------------------------------------------------------------------------------------------------------
# One run


def migrate(run: Run, pair: Pair, casedir: Path, args: argparse.Namespace) -> None:
    limit = ["--downtime-limit", args.downtime_limit] if args.downtime_limit else []
    with VmmigPair(casedir, f"{run.mode} round {run.round}") as vp:
        address = vp.start_recv(*pair.recv_args, timeout=READY_TIMEOUT)
        qemu_pids = pair.qemu_pids()
        qemu0 = sum(proc_cpu_s(pid) or 0.0 for pid in qemu_pids)
        before = cpu_clock()
        vp.start_send("--live", pair.send_source, address, *pair.send_args, "--qemu-handoff", *limit)
        run.wall_s = vp.wait(MIGRATE_TIMEOUT)
        qemu_cpu = sum(proc_cpu_s(pid) or 0.0 for pid in qemu_pids) - qemu0  # a destroyed QEMU counts 0: rough
        run.other_cpu_s = other_cpu(before, qemu_cpu + vp.cpu_s)
        report, recv_report = vp.reports(verify=False)  # digests are checked by vmmig itself before the handoff
    if report.get("status") != "completed" or recv_report.get("status") != "completed":
        raise BenchError(f"status send={report.get('status')} recv={recv_report.get('status')}")
    run.downtime_ms = report.get("downtime")
    run.expected_downtime_ms = report.get("expected-downtime")
    run.total_time_ms = report.get("total-time")
    run.passes = len(report.get("passes") or [])
    run.switchover = report.get("switchover") or {}
    run.handoff = report.get("qemu-handoff") or {}
    run.recv_handoff = recv_report.get("qemu-handoff") or {}
    run.states = pair.states()
    expected = {"source": "shut off", "destination": "running"} if run.mode == "libvirt" else {"destination": "running"}
    wrong = {k: run.states.get(k) for k, v in expected.items() if run.states.get(k) != v}
    if wrong:
        raise BenchError(f"after the move: {wrong}, expected {expected}")


def check_continued(run: Run, pair: Pair, casedir: Path) -> None:
    """The guest continues on the destination (run_guest.continued)."""

    def gone() -> str | None:
        return None if pair.dest_alive() else "the destination stopped running"

    run.continued, run.continued_detail = rg.continued(
        pair.source_log, pair.dest_log, casedir / "combined.serial.log", gone, CONTINUE_TIMEOUT
    )


def run_once(mode: str, rnd: int, args: argparse.Namespace, workdir: Path, ramdir: Path) -> Run:
    run = Run(mode, rnd)
    tag = f"r{rnd}-{mode}"
    casedir = workdir / tag
    casedir.mkdir(mode=0o755)
    started = time.monotonic()
    try:
        setup = (
            libvirt_pair(casedir, tag, args.write_mb) if mode == "libvirt"
            else qmp_pair(casedir, ramdir, tag, args.write_mb)
        )  # fmt: skip
        with setup as pair:
            run.boot_s = time.monotonic() - started
            migrate(run, pair, casedir, args)
            check_continued(run, pair, casedir)
    except (BenchError, TimeoutError, RuntimeError, OSError, rg.QmpError, KeyError, ValueError) as exc:
        run.error = f"{type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(casedir, ignore_errors=True)
    return run


# ----------------------------------------------------------------------------------------------------------------
# Output


def median(runs: Sequence[Run], get: Callable[[Run], Any]) -> float | None:
    values = [float(v) for r in runs if r.error is None and isinstance(v := get(r), int | float)]
    return statistics.median(values) if values else None


def run_line(r: Run) -> str:
    if r.error is not None:
        return f"  round {r.round} {r.mode}: FAILED ({r.error})"
    sw = ", ".join(f"{k} {fmt(r.switchover.get(k), '.0f')}" for k in ("pause", "scan", "send", "verify"))
    steps = {**r.handoff, **{f"recv {k}": v for k, v in r.recv_handoff.items()}}
    return (
        f"  round {r.round} {r.mode}: downtime {fmt(r.downtime_ms, '.0f')}ms (expected "
        f"{fmt(r.expected_downtime_ms, '.0f')}ms), total-time {fmt(r.total_time_ms, '.0f')}ms, passes {r.passes}, "
        f"switchover ms: {sw}; handoff {json.dumps(steps)}; states {r.states}; other CPU {fmt(r.other_cpu_s)}s; "
        f"continued: {'yes' if r.continued else 'no'} ({r.continued_detail})"
    )


COLUMNS = [("mode", 7), ("runs ok", 7), ("downtime ms", 11), ("expected ms", 11), ("total-time ms", 13),
           ("qemu-migrate ms", 15), ("qemu-load ms", 12), ("cont ms", 7), ("destroy ms", 10), ("other CPU s", 11),
           ("continued", 9)]  # fmt: skip


def summary(runs: Sequence[Run]) -> dict[str, Any]:
    """Medians per mode, the difference libvirt - qmp and the verdict."""
    out: dict[str, Any] = {}
    for mode in MODES:
        rs = [r for r in runs if r.mode == mode]
        out[mode] = {
            "runs": len(rs),
            "ok": sum(r.ok for r in rs),
            "downtime": median(rs, lambda r: r.downtime_ms),
            "expected-downtime": median(rs, lambda r: r.expected_downtime_ms),
            "total-time": median(rs, lambda r: r.total_time_ms),
            "qemu-migrate": median(rs, lambda r: r.handoff.get("qemu-migrate")),
            "qemu-load": median(rs, lambda r: r.recv_handoff.get("qemu-load")),
            "cont": median(rs, lambda r: r.recv_handoff.get("cont")),
            "libvirt-destroy": median(rs, lambda r: r.handoff.get("libvirt-destroy")),
            "other-cpu-s": median(rs, lambda r: r.other_cpu_s),
        }
    a, b = out["libvirt"]["downtime"], out["qmp"]["downtime"]
    out["difference-ms"] = None if a is None or b is None else a - b
    out["target-ms"] = TARGET_MS
    out["target-met"] = None if out["difference-ms"] is None else out["difference-ms"] <= TARGET_MS
    return out


def print_summary(s: dict[str, Any]) -> None:
    rows = []
    for mode in MODES:
        m = s[mode]
        rows.append([mode, f"{m['ok']}/{m['runs']}", fmt(m["downtime"], ".0f"), fmt(m["expected-downtime"], ".0f"),
                     fmt(m["total-time"], ".0f"), fmt(m["qemu-migrate"], ".0f"), fmt(m["qemu-load"], ".0f"),
                     fmt(m["cont"], ".0f"), fmt(m["libvirt-destroy"], ".0f"), fmt(m["other-cpu-s"]),
                     "yes" if m["ok"] == m["runs"] else "no"])  # fmt: skip
    print_table(COLUMNS, rows)
    diff = s["difference-ms"]
    if diff is None:
        print(
            f"\nlibvirt - qmp median downtime: unknown (a mode had no successful run): target (<= {TARGET_MS:.0f} ms) "
            "not measured"
        )
        return
    verdict = "target met" if s["target-met"] else "target MISSED"
    print(f"\nlibvirt - qmp median downtime: {diff:+.0f} ms ({verdict}: <= {TARGET_MS:.0f} ms)")


def benchmark(args: argparse.Namespace, ramdir: Path) -> int:
    info = machine_info()
    version = subprocess.run([rg.QEMU, "--version"], capture_output=True, text=True, timeout=30).stdout
    libvirt = subprocess.run(["virsh", "--version"], capture_output=True, text=True, timeout=30).stdout.strip()
    print(f"QEMU: {version.splitlines()[0] if version else 'unknown'} (TCG); libvirt {libvirt or 'unknown'}")
    print(f"guest: {rg.DEFAULT_MEM_MB} MiB, 1 vCPU, write_mb {args.write_mb}; kernel {rg.kernel_paths()[0]}")
    print(
        f"{info['vmmig']} (commit {info['commit']}); downtime-limit {args.downtime_limit or 'default'}; "
        f"{args.repeat} round(s); {info['nproc']} CPUs; load average {' '.join(info['load-average'])}",
        flush=True,
    )
    started = host.start_daemons()
    print(f"libvirtd: {'started here, pids ' + str([p.pid for p in started]) if started else 'already running'}")
    runs: list[Run] = []
    workdir = Path(tempfile.mkdtemp(prefix="vmmig-bench-libvirt-"))
    try:
        workdir.chmod(0o755)  # QEMU runs as libvirt's user: it must reach the kernel and the serial logs
        for rnd in range(1, args.repeat + 1):
            for mode in MODES:
                run = run_once(mode, rnd, args, workdir, ramdir)
                runs.append(run)
                print(run_line(run), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        host.stop_daemons(started)
    print(f"load average at end: {Path('/proc/loadavg').read_text().split()[:3]}\n")
    result = summary(runs)
    print_summary(result)
    print(
        "\ndowntime: the sender's (pause request -> destination runs); expected: its estimate at the switchover.\n"
        "qemu-migrate: source device state sent; qemu-load, cont: the receiver's load wait and cont (libvirt: "
        "virsh resume);\ndestroy: virsh destroy of the source, after the destination runs (not in the downtime)."
    )
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "summary": result, "runs": [asdict(r) for r in runs]},
                                        indent=2) + "\n")  # fmt: skip
    failed = [r for r in runs if not r.ok]
    if failed:
        print(f"\nFAILED: {', '.join(f'round {r.round} {r.mode}' for r in failed)} (exit status 1)")
        return 1
    return 0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating; medians (default 3)")
    ap.add_argument("--quick", action="store_true", help="one run of each mode (--repeat 1)")
    ap.add_argument("--write-mb", type=int, default=4, help="MiB of RAM the guest rewrites every second (default 4)")
    ap.add_argument("--downtime-limit", help="passed to both modes' vmmig send (default: vmmig's)")
    ap.add_argument("--json", type=Path, help="also write the summary and every run as JSON here")
    add_tree_option(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.repeat = 1
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.downtime_limit:
        try:
            parse_duration(args.downtime_limit)
        except ValueError as exc:
            ap.error(str(exc))
    return args


def missing() -> str | None:
    """Why this benchmark cannot run here (libvirt, root, QEMU, the built guest), or None."""
    if reason := host.missing():
        return str(reason)
    try:
        rg.kernel_paths()
    except FileNotFoundError as exc:
        return str(exc)
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := missing():
        print(f"bench: skipped: {reason}", file=sys.stderr)
        return 0
    return run_main(lambda ramdir: benchmark(args, ramdir), "vmmig-bench-libvirt-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
