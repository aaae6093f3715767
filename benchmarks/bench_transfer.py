#!/usr/bin/env python3
"""Throughput and memory benchmark of vmmig over 127.0.0.1, against `socat` and `zstd | socat` baselines.

What it measures
----------------
One deterministic 'mixed' guest image (examples/make_guest_image.py: 40% zero, 25% text, 20% code, 15% random
pages, in runs) is generated in /dev/shm. Every case is a fresh `vmmig recv` + `vmmig send` pair of processes on
that image over 127.0.0.1: codecs none, zlib level 1, zstd level 1 and auto, each at 1 and 2 threads (the same
count for --compress-threads and --decompress-threads) and over 1 and 2 channels (--channels). Two baselines
move the same image in the same run:

* ``socat``       -- plain copy: ``socat -u FILE:IMAGE TCP:...`` into ``socat -u TCP-LISTEN:... CREATE:DEST``;
* ``zstd|socat``  -- ``zstd -1 -T2 -c IMAGE | socat`` into ``socat | zstd -d -c > DEST``.

How to read the table
---------------------
* ``MB/s wall``  -- image bytes (10^6 B = 1 MB) divided by the wall-clock time from starting the sender process
  until both processes have exited: interpreter start-up, connecting, the receiver's preallocation and the final
  verification all count. This is what a user waits for, and what the throughput target is checked against.
* ``MB/s tool``  -- vmmig's own ``image-mbytes-per-second`` (transfer phase only, set-up excluded).
* ``wire MB``    -- bytes on the wire (vmmig's ``transferred``; for zstd|socat the size of the zstd stream).
* ``x socat``, ``x zstd|socat`` -- this case's wall MB/s divided by the baseline's wall MB/s, both from this run.
* ``CPU s``      -- user + system CPU seconds of each side, from ``os.wait4`` rusage of the child (for the
  baselines: of the ``bash -c`` pipeline, which includes the children it waited for).
* ``RssAnon MiB`` -- peak anonymous resident memory of each side, sampled from /proc/PID/status every 50 ms.
  The mapped source and destination images are shmem (counted in RssShmem / VmHWM) and are excluded on purpose.
* ``other CPU s`` -- CPU seconds used by the rest of the machine during the run (/proc/stat busy time minus both
  sides and this script). It should be ~0; when it is not, the table warns that the numbers are unreliable.

Before the cases, as a warm-up, as much /dev/shm as the destination needs is allocated, touched and freed once: on a
VM whose RAM the hypervisor backs lazily, first-touch memory is several times slower and would penalise case one.

With ``--repeat N`` every case runs N times: rates and CPU times are medians, RSS peaks the maximum.
A last row measures the zlib-1 / 2-thread case once more on a larger image (``--rss-size``) for its memory peak.
The "targets" section prints PASS/FAIL; the exit code is 0 whatever the targets say (non-zero only when a run
itself failed). ``--json PATH`` writes everything, including the RSS sample series, for later analysis.

    python benchmarks/bench_transfer.py [--size 1GiB] [--rss-size 4GiB] [--repeat 1] [--quick] [--json out.json]

Before and after: ``--compare DIR`` runs the chosen vmmig cases (``--codecs``, ``--threads``, ``--channels``) with the
vmmig of the checkout DIR ('before') and with this one or ``--tree`` ('after'), in ``--repeat`` interleaved rounds,
and prints their medians side by side (no baselines, no RSS-only run).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import harness
from harness import (
    MB,
    MIB,
    Aggregate,
    BenchError,
    Child,
    Measured,
    VmmigPair,
    add_tree_option,
    busy_warning,
    check_exits,
    check_space,
    command_output,
    compile_package,
    cpu_clock,
    fmt,
    fmt_size,
    free_port,
    kill_all,
    load_generator,
    log,
    make_image,
    median_property,
    other_cpu,
    prefault,
    remove,
    run_main,
    use_tree,
    wait_all,
)

CASE_TIMEOUT = 300.0  # seconds for one case (both processes)
READY_TIMEOUT = 30.0  # seconds for a receiver to start listening

TARGET_MBPS = 250.0  # zlib level 1, 2 threads, image MB/s by wall clock at --size
TARGET_RSS_MIB = 150.0  # peak RssAnon per side, zlib level 1, 2 threads, at --size and --rss-size
TARGET_CASE = "zlib-1 x2"

CODECS: tuple[tuple[str, int | None], ...] = (("none", None), ("zlib", 1), ("zstd", 1), ("auto", 1))
CHANNELS: tuple[int, ...] = (1, 2)
THREADS: tuple[int, ...] = (1, 2)
SOCAT = "socat"
ZSTD_PIPE = "zstd|socat"


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Run(Measured):
    """One execution of a case or a baseline."""

    tool_mbps: float | None = None
    send_cpu_s: float | None = None
    recv_cpu_s: float | None = None
    send_rss_kib: int | None = None
    recv_rss_kib: int | None = None
    other_cpu_s: float | None = None  # CPU seconds used during the run by processes other than the two sides
    send_rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since send start, KiB)
    recv_rss_samples: list[tuple[float, int]] = field(default_factory=list)
    send_report: dict[str, Any] = field(default_factory=dict)
    recv_report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Result(Aggregate):
    """A case (or baseline) aggregated over its repeats."""

    kind: str = "vmmig"  # "vmmig", "baseline" or "rss"

    tool_mbps = median_property("tool_mbps")
    send_cpu_s = median_property("send_cpu_s")
    recv_cpu_s = median_property("recv_cpu_s")
    other_cpu_s = median_property("other_cpu_s")

    @property
    def send_rss_mib(self) -> float | None:
        return self._peak(lambda r: r.send_rss_kib)

    @property
    def recv_rss_mib(self) -> float | None:
        return self._peak(lambda r: r.recv_rss_kib)

    def _peak(self, get: Callable[[Run], int | None]) -> float | None:
        values = [v for r in self.runs if (v := get(r)) is not None]
        return max(values) / 1024 if values else None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "image-bytes": self.image_bytes,
            "wall-mbytes-per-second": self.wall_mbps,
            "tool-mbytes-per-second": self.tool_mbps,
            "wire-mbytes": self.wire_mb,
            "send-cpu-seconds": self.send_cpu_s,
            "recv-cpu-seconds": self.recv_cpu_s,
            "send-rss-anon-mib": self.send_rss_mib,
            "recv-rss-anon-mib": self.recv_rss_mib,
            "other-cpu-seconds": self.other_cpu_s,
            "runs": [asdict(r) for r in self.runs],
        }


# ----------------------------------------------------------------------------------------------------------------
# Files


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# vmmig cases


def case_name(codec: str, level: int | None, threads: int, channels: int = 1) -> str:
    return f"{codec}{'' if level is None else f'-{level}'} x{threads}" + (f" c{channels}" if channels > 1 else "")


def run_case(
    image: Path, size: int, workdir: Path, codec: str, level: int | None, threads: int, channels: int = 1
) -> Run:
    """One fresh recv + send pair; verified by exit codes, matching digests and the destination's size."""
    what = case_name(codec, level, threads, channels)
    dest = workdir / "dest.img"
    remove(dest, Path(f"{dest}.partial"))
    level_args = [] if level is None else ["--level", str(level)]
    try:
        with VmmigPair(workdir, what, sample=True) as pair:
            before = cpu_clock()
            address = pair.start_recv("--decompress-threads", str(threads), str(dest), timeout=READY_TIMEOUT)
            pair.start_send(str(image), address, "--compress", codec, *level_args, "--compress-threads", str(threads),
                            "--channels", str(channels))  # fmt: skip
            wall = pair.wait(CASE_TIMEOUT)
            others = other_cpu(before, pair.cpu_s)
            sent, received = pair.reports()
            check_size(what, dest, size)
            send, recv = pair.children
            return Run(
                wall_s=wall,
                image_bytes=size,
                wire_bytes=int(sent["transferred"]),
                tool_mbps=float(sent["image-mbytes-per-second"]),
                send_cpu_s=send.cpu_s,
                recv_cpu_s=recv.cpu_s,
                send_rss_kib=send.rss_peak_kib,
                recv_rss_kib=recv.rss_peak_kib,
                send_rss_samples=relative(send.rss_samples, pair.started),
                recv_rss_samples=relative(recv.rss_samples, pair.started),
                other_cpu_s=others,
                send_report=sent,
                recv_report=received,
            )
    finally:
        remove(dest, Path(f"{dest}.partial"))


def relative(samples: list[tuple[float, int]], origin: float) -> list[tuple[float, int]]:
    """Sample times as seconds since ``origin`` (the sender's start; the receiver's idle samples come out negative)."""
    return [(round(t - origin, 3), kib) for t, kib in samples]


def check_size(what: str, dest: Path, size: int) -> None:
    if not dest.exists() or dest.stat().st_size != size:
        actual = dest.stat().st_size if dest.exists() else "missing"
        raise BenchError(f"{what}: destination size {actual}, expected {size}")


# ----------------------------------------------------------------------------------------------------------------
# Baselines: socat and zstd | socat, as bash pipelines


def ensure_tools(tools: Sequence[str] = ("socat", "zstd")) -> set[str]:
    """The baseline tools available, after trying `apt-get install` for missing ones when running as root."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        log(f"installing {' '.join(missing)} with apt-get")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *missing]):
            try:
                subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300, check=True)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                log(f"{' '.join(cmd)} failed: {exc}")
                break
    available = {t for t in tools if shutil.which(t) is not None}
    for tool in sorted(set(tools) - available):
        print(f"NOTICE: {tool} is not installed and could not be installed: baselines using it are skipped")
    return available


def is_listening(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port (from /proc/net/tcp; a probe connection would be accepted)."""
    wanted = f"0100007F:{port:04X}"
    with open("/proc/net/tcp", encoding="ascii") as fh:
        next(fh)
        return any(f[1] == wanted and f[3] == "0A" for f in (line.split() for line in fh))


def wait_listening(port: int, recv: Child) -> None:
    deadline = time.perf_counter() + READY_TIMEOUT
    while not is_listening(port):
        if recv.done.is_set():
            raise BenchError(f"baseline receiver exited {recv.returncode} before listening: {recv.stderr_tail()}")
        if time.perf_counter() > deadline:
            raise BenchError(f"baseline receiver not listening on port {port} after {READY_TIMEOUT:.0f}s")
        time.sleep(0.01)


def baseline_commands(name: str, image: Path, dest: Path, port: int) -> tuple[str, str]:
    """(sender, receiver) shell pipelines of a baseline."""
    listen = f"TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr"
    connect = f"TCP:127.0.0.1:{port}"
    img, out = _q(image), _q(dest)
    if name == SOCAT:
        return f"socat -u FILE:{img} {connect}", f"socat -u {listen} CREATE:{out}"
    if name == ZSTD_PIPE:
        return (
            f"zstd -1 -T2 -q -c {img} | socat -u STDIN {connect}",
            f"socat -u {listen} STDOUT | zstd -d -q -c > {out}",
        )
    raise ValueError(name)


def _q(path: Path) -> str:
    """A path for a socat address inside a shell command (socat treats ':' and ',' specially; ours have neither)."""
    text = str(path)
    if any(c in text for c in ":,!' \"\\$`"):
        raise BenchError(f"path {text!r} cannot be used in a socat address")
    return text


def zstd_stream_bytes(image: Path) -> int:
    """Size of `zstd -1 -T2 -c IMAGE`: the zstd|socat baseline's wire bytes (counted once, outside the timing)."""
    proc = subprocess.Popen(["zstd", "-1", "-T2", "-q", "-c", str(image)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    total = 0
    try:
        while chunk := proc.stdout.read(4 * MIB):
            total += len(chunk)
    finally:
        proc.stdout.close()
        if proc.wait(timeout=CASE_TIMEOUT) != 0:
            raise BenchError(f"zstd exited {proc.returncode} while sizing the compressed stream")
    return total


def run_baseline(name: str, image: Path, size: int, workdir: Path, image_sha: str, wire_bytes: int) -> Run:
    """One baseline transfer; verified by exit codes, the destination's size and its SHA-256."""
    dest = workdir / "dest.img"
    remove(dest)
    port = free_port()
    send_cmd, recv_cmd = baseline_commands(name, image, dest, port)
    recv: Child | None = None
    send: Child | None = None
    try:
        before = cpu_clock()
        recv = Child(["bash", "-c", f"set -o pipefail; {recv_cmd}"], workdir, "base-recv")
        wait_listening(port, recv)
        started = time.perf_counter()
        send = Child(["bash", "-c", f"set -o pipefail; {send_cmd}"], workdir, "base-send")
        wait_all([send, recv], started + CASE_TIMEOUT, name)
        others = other_cpu(before, (send.cpu_s or 0.0) + (recv.cpu_s or 0.0))
        assert send.ended is not None and recv.ended is not None
        wall = max(send.ended, recv.ended) - started
        check_exits([send, recv], name)
        actual = dest.stat().st_size if dest.exists() else -1
        if actual != size:
            raise BenchError(f"{name}: destination size {actual}, expected {size}")
        if sha256_file(dest) != image_sha:
            raise BenchError(f"{name}: destination SHA-256 differs from the image's")
        cpu = {"send_cpu_s": send.cpu_s, "recv_cpu_s": recv.cpu_s, "other_cpu_s": others}
        return Run(wall_s=wall, image_bytes=size, wire_bytes=wire_bytes, **cpu)
    finally:
        kill_all([send, recv])
        remove(dest)


# ----------------------------------------------------------------------------------------------------------------
# Output


def ratio(value: float, base: Result | None) -> float | None:
    if base is None or not base.runs or base.image_bytes == 0:
        return None
    return value / base.wall_mbps


def machine_info() -> dict[str, Any]:
    return {
        **harness.machine_info(),
        "socat": command_output(["socat", "-V"], "socat version").split(" on ")[0],
        "zstd": command_output(["zstd", "--version"]).strip("* ").split(",")[0],
    }


def print_header(info: dict[str, Any], size: int, rss_size: int, repeat: int) -> None:
    print("vmmig transfer benchmark over 127.0.0.1")
    print(f"  date     {info['date']}   (load average at start: {' '.join(info['load-average'])})")
    print(
        f"  machine  nproc {info['nproc']} (usable {info['usable-cpus']}), {info['cpu-model']}, "
        f"{info['memory-gib']} GiB RAM, Linux {info['kernel']}"
    )
    print(
        f"  software {info['vmmig']} (commit {info['commit']}), Python {info['python']}, {info['socat']}, "
        f"{info['zstd']}"
    )
    rss = fmt_size(rss_size) if rss_size else "skipped"
    print(f"  image    {fmt_size(size)} 'mixed' (seed 1) in /dev/shm; RSS-only run at {rss}; repeat {repeat}")
    print(flush=True)


COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 20),
    ("MB/s wall", 9),
    ("MB/s tool", 9),
    ("wire MB", 8),
    ("x socat", 7),
    ("x zstd|socat", 12),
    ("send CPU s", 10),
    ("recv CPU s", 10),
    ("send RssAnon MiB", 16),
    ("recv RssAnon MiB", 16),
    ("other CPU s", 11),
)


def table_row(result: Result, baselines: dict[str, Result]) -> list[str]:
    if result.error is not None or not result.runs:
        return [result.name, "FAILED", *(["-"] * (len(COLUMNS) - 2))]
    wall = result.wall_mbps
    same_size = result.kind != "rss"
    return [
        result.name,
        fmt(wall),
        fmt(result.tool_mbps),
        fmt(result.wire_mb),
        fmt(ratio(wall, baselines.get(SOCAT)) if same_size and result.name != SOCAT else None, ".2f"),
        fmt(ratio(wall, baselines.get(ZSTD_PIPE)) if same_size and result.name != ZSTD_PIPE else None, ".2f"),
        fmt(result.send_cpu_s, ".2f"),
        fmt(result.recv_cpu_s, ".2f"),
        fmt(result.send_rss_mib),
        fmt(result.recv_rss_mib),
        fmt(result.other_cpu_s, ".2f"),
    ]


def print_table(results: Sequence[Result], baselines: dict[str, Result]) -> None:
    harness.print_table(COLUMNS, [table_row(r, baselines) for r in results])
    for result in results:
        if result.error is not None:
            print(f"  {result.name}: FAILED: {result.error}")
    print("  MB = 10^6 bytes of image; 'x socat' / 'x zstd|socat' = MB/s wall over that baseline's MB/s wall;")
    print("  RssAnon = peak anonymous RSS (mapped images excluded); baselines' RSS is not sampled.")
    print("  other CPU s = CPU time used by everything else on the machine during the run (should be ~0).")
    if warning := busy_warning([(r.name, r.other_cpu_s, r.runs[0].wall_s) for r in results if r.runs]):
        print(f"  {warning}")
    print()


def target_lines(size: int, rss_size: int, main_case: Result | None, rss_case: Result | None) -> list[tuple[str, str]]:
    """(PASS/FAIL/SKIP, description) for each target."""
    lines: list[tuple[str, str]] = []

    def check(ok: bool | None, text: str) -> None:
        lines.append(("SKIP" if ok is None else "PASS" if ok else "FAIL", text))

    usable = main_case is not None and main_case.error is None and bool(main_case.runs)
    wall = main_case.wall_mbps if usable and main_case else None
    check(
        wall is not None and wall >= TARGET_MBPS,
        f"{TARGET_CASE} image MB/s (wall) at {fmt_size(size)}: {fmt(wall)} >= {TARGET_MBPS:.0f}",
    )
    for label, case, case_size in (("--size", main_case, size), ("--rss-size", rss_case, rss_size)):
        for side in ("send", "recv"):
            if label == "--rss-size" and not rss_size:
                check(None, f"{TARGET_CASE} peak RssAnon {side} at --rss-size: skipped (--rss-size 0)")
                continue
            ok = case is not None and case.error is None and bool(case.runs)
            peak = (case.send_rss_mib if side == "send" else case.recv_rss_mib) if ok and case else None
            check(
                peak is not None and peak <= TARGET_RSS_MIB,
                f"{TARGET_CASE} peak RssAnon {side} at {fmt_size(case_size)}: {fmt(peak)} MiB <= {TARGET_RSS_MIB:.0f}",
            )
    return lines


def print_targets(lines: Sequence[tuple[str, str]], results: Sequence[Result], size: int) -> None:
    print("targets")
    for verdict, text in lines:
        print(f"  {verdict}  {text}")
    over = [
        f"{r.name} {side} {peak:.1f} MiB"
        for r in results
        if r.kind == "vmmig" and r.error is None
        for side, peak in (("send", r.send_rss_mib), ("recv", r.recv_rss_mib))
        if peak is not None and peak > TARGET_RSS_MIB
    ]
    if over:
        print(f"  note: other cases over {TARGET_RSS_MIB:.0f} MiB RssAnon at {fmt_size(size)}: {', '.join(over)}")
    print()


def rss_profile(samples: Sequence[tuple[float, int]], points: int = 12) -> str:
    """A few (seconds since send start: MiB) points of a sample series, always including the peak."""
    if not samples:
        return "(no samples)"
    peak_index = max(range(len(samples)), key=lambda i: samples[i][1])
    step = max(1, len(samples) // points)
    picked = sorted({*range(0, len(samples), step), peak_index, len(samples) - 1})
    marks = ["*" if i == peak_index else "" for i in picked]
    return " ".join(f"{samples[i][0]:+.1f}s:{samples[i][1] / 1024:.0f}{m}" for i, m in zip(picked, marks, strict=True))


def print_rss_detail(results: Sequence[Result]) -> None:
    """RssAnon over time for the target case(s) and any case over the target: where does the peak come from?"""
    shown = [
        r
        for r in results
        if r.error is None
        and r.runs
        and r.kind in ("vmmig", "rss")
        and (r.name.startswith(TARGET_CASE) or max(r.send_rss_mib or 0, r.recv_rss_mib or 0) > TARGET_RSS_MIB)
    ]
    if not shown:
        return
    print("RssAnon over time (seconds since the sender started: MiB; * = peak; negative = receiver before send)")
    for result in shown:
        run = max(result.runs, key=lambda r: max(r.send_rss_kib or 0, r.recv_rss_kib or 0))
        transfer = run.send_report.get("total-time", 0) / 1000
        print(f"  {result.name}: wall {run.wall_s:.2f}s, transfer phase (tool) {transfer:.2f}s")
        print(f"    send  {rss_profile(run.send_rss_samples)}")
        print(f"    recv  {rss_profile(run.recv_rss_samples)}")
    print()


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1GiB", help="image size for all cases and baselines (default 1GiB)")
    parser.add_argument(
        "--rss-size", default="4GiB", help="second image size, zlib-1 x2 only, for its RSS peak; 0 skips (default 4GiB)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per case; the median is reported (default 1)")
    parser.add_argument("--quick", action="store_true", help="smoke test: --size 256MiB --rss-size 0")
    parser.add_argument("--json", metavar="PATH", help="also write all results (and RSS samples) as JSON to PATH")
    add_tree_option(parser)
    parser.add_argument(
        "--compare",
        metavar="DIR",
        type=Path,
        help="before/after: run the chosen vmmig cases with the vmmig of the checkout DIR ('before') and with this "
        "one or --tree ('after') in --repeat interleaved rounds; no baselines, no RSS-only run",
    )
    parser.add_argument("--codecs", default="none,zlib,zstd,auto", help="vmmig cases: these codecs (comma-separated)")
    parser.add_argument("--threads", default="1,2", help="vmmig cases: these thread counts (comma-separated)")
    parser.add_argument("--channels", default="1,2", help="vmmig cases: these channel counts (comma-separated)")
    args = parser.parse_args(argv)
    args.codecs = args.codecs.split(",")
    try:
        args.threads = [int(v) for v in args.threads.split(",")]
        args.channels = [int(v) for v in args.channels.split(",")]
    except ValueError:
        parser.error("--threads and --channels take comma-separated whole numbers")
    if args.quick:
        args.size, args.rss_size = "256MiB", "0"
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    return args


def repeat_runs(name: str, kind: str, size: int, repeat: int, once: Callable[[], Run]) -> Result:
    """Run ``once`` ``repeat`` times; a failure is kept in the result (reported as FAILED) instead of raised."""
    result = Result(name=name, image_bytes=size, runs=[], kind=kind)
    for i in range(repeat):
        try:
            run = once()
        except BenchError as exc:
            result.error = str(exc)
            log(f"{name}: FAILED: {exc}")
            return result
        result.runs.append(run)
        rss = f", RssAnon send {fmt_kib(run.send_rss_kib)} / recv {fmt_kib(run.recv_rss_kib)} MiB"
        if kind == "baseline":
            rss = f", CPU send {fmt(run.send_cpu_s, '.2f')} / recv {fmt(run.recv_cpu_s, '.2f')} s"
        rss += f", other CPU {fmt(run.other_cpu_s, '.2f')} s"
        log(
            f"{name} run {i + 1}/{repeat}: {run.wall_mbps:.1f} MB/s wall, {run.wall_s:.2f}s, "
            f"wire {run.wire_bytes / MB:.1f} MB{rss}"
        )
    return result


def fmt_kib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def run_vmmig_cases(image: Path, size: int, workdir: Path, args: argparse.Namespace) -> list[Result]:
    results = []
    for codec, level, threads, channels in chosen_cases(args):
        name = case_name(codec, level, threads, channels)
        once = functools.partial(run_case, image, size, workdir, codec, level, threads, channels)
        results.append(repeat_runs(name, "vmmig", size, args.repeat, once))
    return results


def run_baselines(image: Path, size: int, workdir: Path, repeat: int, tools: set[str]) -> list[Result]:
    wanted = [(SOCAT, {"socat"}), (ZSTD_PIPE, {"socat", "zstd"})]
    runnable = [name for name, needs in wanted if needs <= tools]
    for name, needs in wanted:
        if name not in runnable:
            print(f"NOTICE: baseline {name} skipped ({', '.join(sorted(needs - tools))} missing)")
    if not runnable:
        return []
    log("hashing the image (SHA-256) to verify the baselines' copies")
    image_sha = sha256_file(image)
    results = []
    for name in runnable:
        wire = size if name == SOCAT else zstd_stream_bytes(image)
        once = functools.partial(run_baseline, name, image, size, workdir, image_sha, wire)
        results.append(repeat_runs(name, "baseline", size, repeat, once))
    return results


def run_rss_case(generator: ModuleType, workdir: Path, rss_size: int) -> Result:
    name = f"{TARGET_CASE} @{fmt_size(rss_size).replace(' ', '')}"
    image = workdir / "image-rss.img"
    try:
        check_space(rss_size, 1.7, "the source image (sparse: ~60%) and one destination")
        make_image(generator, image, rss_size)
        prefault(workdir, rss_size)
        return repeat_runs(name, "rss", rss_size, 1, lambda: run_case(image, rss_size, workdir, "zlib", 1, 2))
    except BenchError as exc:
        return Result(name=name, image_bytes=rss_size, runs=[], kind="rss", error=str(exc))
    finally:
        remove(image)


def run_compare(image: Path, size: int, workdir: Path, args: argparse.Namespace) -> list[Result]:
    """--compare DIR: every chosen case with DIR's vmmig ('before') and this tree's ('after'), in --repeat rounds
    that interleave them (the order flips each round), so that both see the same machine."""
    trees = {"before": args.compare.resolve(), "after": harness.tree()}
    results: dict[tuple[str, str], Result] = {}
    for round_no in range(args.repeat):
        for codec, level, threads, channels in chosen_cases(args):
            name = case_name(codec, level, threads, channels)
            for label in sorted(trees, reverse=round_no % 2 == 1):
                result = results.setdefault((name, label), Result(name=f"{name} {label}", image_bytes=size, runs=[]))
                if result.error is not None:
                    continue
                use_tree(trees[label])
                once = functools.partial(run_case, image, size, workdir, codec, level, threads, channels)
                run = repeat_runs(result.name, "vmmig", size, 1, once)
                result.runs += run.runs
                result.error = run.error
    use_tree(trees["after"])
    return list(results.values())


def chosen_cases(args: argparse.Namespace) -> list[tuple[str, int | None, int, int]]:
    """(codec, level, threads, channels) of every vmmig case, narrowed by --codecs, --threads and --channels."""
    return [
        (codec, level, threads, channels)
        for codec, level in CODECS
        if codec in args.codecs
        for threads in THREADS
        if threads in args.threads
        for channels in CHANNELS
        if channels in args.channels
    ]


COMPARE_COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 16),
    ("MB/s before", 11),
    ("MB/s after", 10),
    ("after/before", 12),
    ("send CPU s b/a", 14),
    ("recv CPU s b/a", 14),
    ("wire MB b/a", 15),
    ("other CPU s b/a", 15),
)


def print_compare(results: Sequence[Result], args: argparse.Namespace) -> None:
    """One row per case: its medians with the 'before' tree and with the 'after' tree, side by side."""
    by_name = {r.name: r for r in results}
    rows = []
    for codec, level, threads, channels in chosen_cases(args):
        name = case_name(codec, level, threads, channels)
        before, after = by_name.get(f"{name} before"), by_name.get(f"{name} after")
        if before is None or after is None or not before.runs or not after.runs:
            rows.append([name, "FAILED", *(["-"] * (len(COMPARE_COLUMNS) - 2))])
            continue

        def both(get: Callable[[Result], float | None], spec: str, b: Result = before, a: Result = after) -> str:
            return f"{fmt(get(b), spec)} / {fmt(get(a), spec)}"

        rows.append(
            [
                name,
                fmt(before.wall_mbps),
                fmt(after.wall_mbps),
                fmt(after.wall_mbps / before.wall_mbps, ".3f"),
                both(lambda r: r.send_cpu_s, ".2f"),
                both(lambda r: r.recv_cpu_s, ".2f"),
                both(lambda r: r.wire_mb, ".1f"),
                both(lambda r: r.other_cpu_s, ".2f"),
            ]
        )
    print(f"before = {args.compare.resolve()}, after = {harness.tree()}; medians of {args.repeat} interleaved rounds")
    harness.print_table(COMPARE_COLUMNS, rows)
    print()


def write_json(
    path: str,
    info: dict[str, Any],
    args: argparse.Namespace,
    results: Sequence[Result],
    targets: Sequence[tuple[str, str]],
) -> None:
    options = {"size": args.size, "rss-size": args.rss_size, "repeat": args.repeat, "quick": args.quick}
    harness.write_json(
        path,
        {
            "machine": info,
            "options": {**options, "compare": str(args.compare) if args.compare else None},
            "results": [r.summary() for r in results],
            "targets": [{"verdict": v, "target": t} for v, t in targets],
        },
    )


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    generator = load_generator()
    size, rss_size = generator.parse_size(args.size), generator.parse_size(args.rss_size)
    tools = ensure_tools() if not args.compare else set()
    info = machine_info()
    print_header(info, size, rss_size, args.repeat)
    image = workdir / "image.img"
    check_space(size, 1.7, "the source image (sparse: ~60%) and one destination")
    make_image(generator, image, size)  # the image stays in /dev/shm (RAM) for every case: no cache effects
    prefault(workdir, size)
    if args.compare:
        results = run_compare(image, size, workdir, args)
        remove(image)
        print_table(results, {})
        print_compare(results, args)
        if args.json:
            write_json(args.json, info, args, results, [])
        return harness.exit_status(results)
    results = run_vmmig_cases(image, size, workdir, args)
    results += run_baselines(image, size, workdir, args.repeat, tools)
    remove(image)
    rss_case = run_rss_case(generator, workdir, rss_size) if rss_size else None
    if rss_case is not None:
        results.append(rss_case)
    baselines = {r.name: r for r in results if r.kind == "baseline" and r.error is None and r.runs}
    print_table(results, baselines)
    main_case = next((r for r in results if r.kind == "vmmig" and r.name == TARGET_CASE), None)
    targets = target_lines(size, rss_size, main_case, rss_case)
    print_targets(targets, results, size)
    print_rss_detail(results)
    if args.json:
        write_json(args.json, info, args, results, targets)
    return harness.exit_status(results)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.compare:
        use_tree(args.compare)  # fails early when DIR is no checkout; compiles it below too
        compile_package(args.compare)
    return run_main(functools.partial(benchmark, args), "vmmig-bench-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
