"""One live migration of a simulated guest by vmmig, verified byte for byte: what bench_live.py's sections share.

A fresh copy of the pristine image, a fresh guest (examples/guest_workload.py) rewriting it, a fresh ``vmmig recv``
and ``vmmig send --live IMAGE ADDR --pause-pid GUEST ... --max-time 60s --on-no-converge abort``. After a converged
run the (paused) source and DEST are compared page by page over two mmaps; a mismatch is a critical failure.
"""

from __future__ import annotations

import mmap
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from harness import MB, REPO, BenchError, Child, VmmigPair, kill_all, remove, wait_for_text

WORKLOAD = REPO / "examples" / "guest_workload.py"

PAGE_SIZE = 4096
COMPARE_CHUNK = 64 << 20  # bytes compared at a time

MAX_TIME = "60s"
CASE_TIMEOUT = 120.0  # seconds from starting the sender until both sides must have exited
START_TIMEOUT = 20.0  # seconds for the guest to write its pid file / the receiver its ready file
RECV_GRACE = 10.0  # seconds the receiver gets after the sender exited, even past the case deadline

_PASSES_RE = re.compile(r"after (\d+) passes")
_DIRTY_RE = re.compile(r"\(dirty ([\d.]+) MB/s")
_EXPECTED_RE = re.compile(r"expected downtime (\d+)ms")


@dataclass(frozen=True)
class Setting:
    """What one live migration runs: the guest's writes and the sender's options."""

    write_rate: int  # bytes/s the guest writes (all threads)
    cap_text: str  # sender --max-bandwidth
    codec: str  # sender --compress
    downtime_limit_ms: float
    auto_converge: bool = False
    pattern: str = "uniform"
    hot_fraction: float | None = None  # hotset only
    content: str = "random"  # guest_workload --content
    threads: int = 2
    level: int | None = None  # sender --level (the CLI default when None)


@dataclass
class CaseResult:
    """One live migration."""

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
    total_time_ms: float | None = None
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

    @property
    def switchover(self) -> dict[str, float]:
        """ms per switchover step (pause, scan, send, verify) from the sender's report; empty without one."""
        return dict(self.report.get("switchover") or {})

    @property
    def error_pct(self) -> float | None:
        """(expected - measured) / measured downtime, in percent; None unless both are known."""
        if self.expected_downtime_ms is None or not self.downtime_ms:
            return None
        return (self.expected_downtime_ms - self.downtime_ms) / self.downtime_ms * 100


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


def all_threads_stopped(pid: int) -> bool:
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return bool(states) and all(state in "Tt" for state in states)


# ----------------------------------------------------------------------------------------------------------------
# One live migration


def start_guest(paths: CasePaths, setting: Setting) -> tuple[Child, int]:
    command = [
        sys.executable, str(WORKLOAD), str(paths.image), "--threads", str(setting.threads),
        "--rate", str(setting.write_rate), "--pattern", setting.pattern, "--content", setting.content,
        "--pid-file", str(paths.pid),
    ]  # fmt: skip
    if setting.hot_fraction is not None:
        command += ["--hot-fraction", str(setting.hot_fraction)]
    guest = Child(command, paths.image.parent, "guest")
    return guest, int(wait_for_text(paths.pid, guest, START_TIMEOUT, "guest workload"))


def sender_args(setting: Setting, paths: CasePaths, address: str, guest_pid: int) -> list[str]:
    args = [
        "--live", str(paths.image), address, "--pause-pid", str(guest_pid), "--compress", setting.codec,
        "--max-bandwidth", setting.cap_text, "--downtime-limit", f"{setting.downtime_limit_ms:g}ms",
        "--max-time", MAX_TIME, "--on-no-converge", "abort",
    ]  # fmt: skip
    if setting.level is not None:
        args += ["--level", str(setting.level)]
    if setting.auto_converge:
        args.append("--auto-converge")
    return args


def fill_from_report(result: CaseResult, report: dict[str, Any]) -> None:
    """Take downtime, passes, wire bytes, throttle, dirty and pass-1 rates from the sender's JSON."""
    passes = report.get("passes") or []
    result.report = report
    result.passes = len(passes)
    result.downtime_ms = report.get("downtime")
    result.expected_downtime_ms = report.get("expected-downtime")
    result.total_time_ms = report.get("total-time")
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


def migrate(setting: Setting, paths: CasePaths, result: CaseResult, guests: list[Child]) -> None:
    """Start guest (appended to ``guests``), receiver and sender, wait for the outcome, record it."""
    guest, guest_pid = start_guest(paths, setting)
    guests.append(guest)
    with VmmigPair(paths.image.parent, "live") as pair:
        address = pair.start_recv(str(paths.dest), timeout=START_TIMEOUT)
        pair.start_send(*sender_args(setting, paths, address, guest_pid))
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


def run_case(workdir: Path, pristine: Path, setting: Setting, fraction: float) -> CaseResult:
    """One live migration of a fresh copy of ``pristine`` (``fraction``: the write rate over the cap, for tables)."""
    result = CaseResult(fraction=fraction, write_rate=setting.write_rate, auto_converge=setting.auto_converge)
    paths = CasePaths.inside(workdir)
    remove(paths.dest, paths.partial, paths.ready, paths.pid)
    shutil.copyfile(pristine, paths.image)
    guests: list[Child] = []
    try:
        migrate(setting, paths, result, guests)
    except BenchError as exc:
        result.status, result.note = "error", str(exc)
    finally:
        kill_all(guests)  # SIGKILL ends a guest stopped by --pause-pid too
        remove(paths.dest, paths.partial, paths.ready, paths.pid, paths.image)
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
