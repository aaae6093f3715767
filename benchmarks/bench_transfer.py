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
"""

from __future__ import annotations

import argparse
import compileall
import functools
import hashlib
import importlib.util
import json
import mmap
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GENERATOR = REPO / "examples" / "make_guest_image.py"
SHM = Path("/dev/shm")

MB = 1_000_000
MIB = 1 << 20
CASE_TIMEOUT = 300.0  # seconds for one case (both processes)
READY_TIMEOUT = 30.0  # seconds for a receiver to start listening
RSS_INTERVAL = 0.05  # seconds between /proc/PID/status samples
KILL_GRACE = 5.0  # seconds to wait for a killed child to be reaped
OTHER_CPU_WARN = 0.5  # warn when other processes used more CPU seconds than this (and 10% of the run's capacity)
CPUS = len(os.sched_getaffinity(0))
CLK_TCK = os.sysconf("SC_CLK_TCK")
FAIL_GRACE = 3.0  # seconds the other side gets to exit (and explain) once one side of a run has failed

TARGET_MBPS = 250.0  # zlib level 1, 2 threads, image MB/s by wall clock at --size
TARGET_RSS_MIB = 150.0  # peak RssAnon per side, zlib level 1, 2 threads, at --size and --rss-size
TARGET_CASE = "zlib-1 x2"

CODECS: tuple[tuple[str, int | None], ...] = (("none", None), ("zlib", 1), ("zstd", 1), ("auto", 1))
CHANNELS: tuple[int, ...] = (1, 2)
THREADS: tuple[int, ...] = (1, 2)
SOCAT = "socat"
ZSTD_PIPE = "zstd|socat"


class BenchError(Exception):
    """A run failed (non-zero exit, digest or size mismatch, timeout): the benchmark cannot report it."""


# ----------------------------------------------------------------------------------------------------------------
# Results


@dataclass
class Run:
    """One execution of a case or a baseline."""

    wall_s: float
    image_bytes: int
    wire_bytes: int
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

    @property
    def wall_mbps(self) -> float:
        return self.image_bytes / MB / self.wall_s


@dataclass
class Result:
    """A case (or baseline) aggregated over its repeats."""

    name: str
    image_bytes: int
    runs: list[Run]
    kind: str = "vmmig"  # "vmmig", "baseline" or "rss"
    error: str | None = None  # why the case failed (then ``runs`` holds the runs before the failure)

    def _median(self, get: Callable[[Run], float | None]) -> float | None:
        values = [v for r in self.runs if (v := get(r)) is not None]
        return statistics.median(values) if values else None

    def _peak(self, get: Callable[[Run], int | None]) -> float | None:
        values = [v for r in self.runs if (v := get(r)) is not None]
        return max(values) / 1024 if values else None

    @property
    def wall_mbps(self) -> float:
        return statistics.median(r.wall_mbps for r in self.runs)

    @property
    def tool_mbps(self) -> float | None:
        return self._median(lambda r: r.tool_mbps)

    @property
    def wire_mb(self) -> float:
        return statistics.median(r.wire_bytes for r in self.runs) / MB

    @property
    def send_cpu_s(self) -> float | None:
        return self._median(lambda r: r.send_cpu_s)

    @property
    def recv_cpu_s(self) -> float | None:
        return self._median(lambda r: r.recv_cpu_s)

    @property
    def send_rss_mib(self) -> float | None:
        return self._peak(lambda r: r.send_rss_kib)

    @property
    def other_cpu_s(self) -> float | None:
        return self._median(lambda r: r.other_cpu_s)

    @property
    def recv_rss_mib(self) -> float | None:
        return self._peak(lambda r: r.recv_rss_kib)

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
# Child processes: reaped with os.wait4 (exit time and rusage), RssAnon sampled while they run


def read_rss_anon_kib(pid: int) -> int | None:
    """RssAnon of a live process in KiB; None once it has exited (a zombie has no Rss lines)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None
    return None


def sample_rss(pid: int, stop: threading.Event, samples: list[tuple[float, int]]) -> None:
    """Append (perf_counter, RssAnon KiB) every RSS_INTERVAL until ``stop`` is set or the process has exited."""
    while not stop.is_set():
        kib = read_rss_anon_kib(pid)
        if kib is None:
            return
        samples.append((time.perf_counter(), kib))
        stop.wait(RSS_INTERVAL)


class Child:
    """A child in its own session (so its whole pipeline can be killed), reaped by a thread calling os.wait4."""

    def __init__(self, argv: Sequence[str], workdir: Path, tag: str, sample: bool = True) -> None:
        self.tag = tag
        self.stdout_path = workdir / f"{tag}.out"
        self.stderr_path = workdir / f"{tag}.err"
        self.done = threading.Event()
        self.ended: float | None = None
        self.returncode: int | None = None
        self.rusage: Any = None
        self.rss_samples: list[tuple[float, int]] = []
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                list(argv), cwd=REPO, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
            )
        self.pid = self.proc.pid
        self._reaper = threading.Thread(target=self._reap, name=f"reap-{tag}", daemon=True)
        self._reaper.start()
        self._sampler: threading.Thread | None = None
        if sample:
            self._sampler = threading.Thread(
                target=sample_rss, args=(self.pid, self.done, self.rss_samples), name=f"rss-{tag}", daemon=True
            )
            self._sampler.start()

    def _reap(self) -> None:
        _, status, rusage = os.wait4(self.pid, 0)
        self.ended = time.perf_counter()
        self.rusage = rusage
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # Popen must not wait for it again
        self.done.set()

    @property
    def cpu_s(self) -> float | None:
        return None if self.rusage is None else self.rusage.ru_utime + self.rusage.ru_stime

    @property
    def rss_peak_kib(self) -> int | None:
        return max((kib for _, kib in self.rss_samples), default=None)

    def wait(self, deadline: float) -> bool:
        """Wait until the child has been reaped or ``deadline`` (perf_counter) passes; True if it was reaped."""
        if self.done.wait(max(0.0, deadline - time.perf_counter())):
            if self._sampler is not None:
                self._sampler.join()
            return True
        return False

    def kill(self) -> None:
        """SIGKILL the child's process group (its own session, pgid == pid) unless it has been reaped already."""
        if not self.done.is_set():
            try:
                os.killpg(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.done.wait(KILL_GRACE)

    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    def stderr_tail(self, lines: int = 5) -> str:
        text = self.stderr_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(no stderr)"


def cpu_clock() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine since boot, CPU seconds of this process): for ``other_cpu``."""
    with open("/proc/stat", encoding="ascii") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    own = resource.getrusage(resource.RUSAGE_SELF)
    return (user + nice + system + irq + softirq) / CLK_TCK, own.ru_utime + own.ru_stime


def other_cpu(before: tuple[float, float], children: Sequence[Child]) -> float:
    """CPU seconds the rest of the machine used since ``before``: all busy time minus ours and our children's."""
    busy, own = cpu_clock()
    return max(0.0, busy - before[0] - (own - before[1]) - sum(c.cpu_s or 0.0 for c in children))


def wait_all(children: Sequence[Child], deadline: float, what: str) -> None:
    """Wait for every child until ``deadline``; once one has failed, give the others FAIL_GRACE, then report it.

    Exit times come from the reaper threads, so the polling interval here does not affect any measurement.
    """
    while pending := [c for c in children if not c.done.is_set()]:
        failed = [c for c in children if c.done.is_set() and c.returncode != 0]
        if failed:
            deadline = min(deadline, time.perf_counter() + FAIL_GRACE)
            for child in pending:
                child.wait(deadline)
            check_exits(failed, what)
        if time.perf_counter() > deadline:
            raise BenchError(f"{what}: timed out ({', '.join(c.tag for c in pending)} still running)")
        time.sleep(0.02)
    for child in children:
        child.wait(deadline)  # joins the RSS sampler


def check_exits(children: Sequence[Child], what: str) -> None:
    for child in children:
        if child.returncode != 0:
            raise BenchError(f"{what}: {child.tag} exited {child.returncode}: {child.stderr_tail()}")


def kill_all(children: Sequence[Child | None]) -> None:
    for child in children:
        if child is not None:
            child.kill()


# ----------------------------------------------------------------------------------------------------------------
# Files


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(8 * MIB):
            digest.update(chunk)
    return digest.hexdigest()


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_guest_image", GENERATOR)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import {GENERATOR}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_image(generator: ModuleType, path: Path, size: int) -> None:
    started = time.perf_counter()
    counts = generator.generate(str(path), size, seed=1, profile="mixed")
    log(f"generated {fmt_size(size)} mixed image {path} in {time.perf_counter() - started:.1f}s: {counts}")


def check_space(size: int) -> None:
    """The source image (sparse: ~60% of its size) plus one full destination must fit in /dev/shm."""
    free = shutil.disk_usage(SHM).free
    need = size * 1.7
    if free < need:
        raise BenchError(
            f"/dev/shm has {free / 2**30:.1f} GiB free, need about {need / 2**30:.1f} GiB for {fmt_size(size)}"
        )


def prefault(workdir: Path, size: int) -> None:
    """Warm-up: allocate, touch and free ``size`` bytes of /dev/shm, as the receiver's preallocation will.

    On a VM whose RAM the hypervisor backs lazily, the first touch of never-used guest memory can be several times
    slower than later touches (seen here: 11.6 s vs 1.4 s for 4 GiB); without this the first case pays for it.
    """
    path = workdir / "prefault"
    started = time.perf_counter()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        mmap.mmap(fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE).close()
    finally:
        os.close(fd)
        remove(path)
    log(f"warm-up: allocated and touched {fmt_size(size)} of /dev/shm in {time.perf_counter() - started:.1f}s")


# ----------------------------------------------------------------------------------------------------------------
# vmmig cases


def vmmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def wait_ready(ready: Path, recv: Child) -> str:
    deadline = time.perf_counter() + READY_TIMEOUT
    while True:
        if ready.exists() and (text := ready.read_text().strip()):
            return text
        if recv.done.is_set():
            raise BenchError(f"vmmig recv exited {recv.returncode} before listening: {recv.stderr_tail()}")
        if time.perf_counter() > deadline:
            raise BenchError(f"vmmig recv not listening after {READY_TIMEOUT:.0f}s")
        time.sleep(0.01)


def case_name(codec: str, level: int | None, threads: int, channels: int = 1) -> str:
    return f"{codec}{'' if level is None else f'-{level}'} x{threads}" + (f" c{channels}" if channels > 1 else "")


def run_case(
    image: Path, size: int, workdir: Path, codec: str, level: int | None, threads: int, channels: int = 1
) -> Run:
    """One fresh recv + send pair; verified by exit codes, matching digests and the destination's size."""
    what = case_name(codec, level, threads, channels)
    dest, ready = workdir / "dest.img", workdir / "ready"
    remove(dest, Path(f"{dest}.partial"), ready)
    level_args = [] if level is None else ["--level", str(level)]
    recv: Child | None = None
    send: Child | None = None
    try:
        recv_argv = ["recv", "--listen", "127.0.0.1:0", "--ready-file", str(ready)]
        recv_argv += ["--decompress-threads", str(threads), "--json", "--quiet", str(dest)]
        before = cpu_clock()
        recv = Child(vmmig(*recv_argv), workdir, "recv")
        address = wait_ready(ready, recv)
        started = time.perf_counter()
        send_argv = ["send", str(image), address, "--compress", codec, *level_args]
        send_argv += ["--compress-threads", str(threads), "--channels", str(channels), "--json", "--quiet"]
        send = Child(vmmig(*send_argv), workdir, "send")
        wait_all([send, recv], started + CASE_TIMEOUT, what)
        others = other_cpu(before, [send, recv])
        assert send.ended is not None and recv.ended is not None
        wall = max(send.ended, recv.ended) - started
        check_exits([send, recv], what)
        sent, received = parse_report(send, what), parse_report(recv, what)
        verify_case(what, sent, received, dest, size)
        return Run(
            wall_s=wall,
            image_bytes=size,
            wire_bytes=int(sent["transferred"]),
            tool_mbps=float(sent["image-mbytes-per-second"]),
            send_cpu_s=send.cpu_s,
            recv_cpu_s=recv.cpu_s,
            send_rss_kib=send.rss_peak_kib,
            recv_rss_kib=recv.rss_peak_kib,
            send_rss_samples=relative(send.rss_samples, started),
            recv_rss_samples=relative(recv.rss_samples, started),
            other_cpu_s=others,
            send_report=sent,
            recv_report=received,
        )
    finally:
        kill_all([send, recv])
        remove(dest, Path(f"{dest}.partial"), ready)


def relative(samples: list[tuple[float, int]], origin: float) -> list[tuple[float, int]]:
    """Sample times as seconds since ``origin`` (the sender's start; the receiver's idle samples come out negative)."""
    return [(round(t - origin, 3), kib) for t, kib in samples]


def parse_report(child: Child, what: str) -> dict[str, Any]:
    try:
        report = json.loads(child.stdout().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError) as exc:
        raise BenchError(f"{what}: {child.tag} printed no JSON report ({exc}): {child.stderr_tail()}") from None
    if not isinstance(report, dict):
        raise BenchError(f"{what}: {child.tag} JSON report is not an object")
    return report


def verify_case(what: str, sent: dict[str, Any], received: dict[str, Any], dest: Path, size: int) -> None:
    if sent.get("status") != "completed" or received.get("status") != "completed":
        raise BenchError(f"{what}: status send={sent.get('status')} recv={received.get('status')}")
    if not sent.get("digest") or sent.get("digest") != received.get("digest"):
        raise BenchError(f"{what}: digest mismatch: send {sent.get('digest')} recv {received.get('digest')}")
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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
        recv = Child(["bash", "-c", f"set -o pipefail; {recv_cmd}"], workdir, "base-recv", sample=False)
        wait_listening(port, recv)
        started = time.perf_counter()
        send = Child(["bash", "-c", f"set -o pipefail; {send_cmd}"], workdir, "base-send", sample=False)
        wait_all([send, recv], started + CASE_TIMEOUT, name)
        others = other_cpu(before, [send, recv])
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


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def fmt_size(size: int) -> str:
    for unit, factor in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def ratio(value: float, base: Result | None) -> float | None:
    if base is None or not base.runs or base.image_bytes == 0:
        return None
    return value / base.wall_mbps


def machine_info() -> dict[str, Any]:
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "nproc": os.cpu_count(),
        "usable-cpus": len(os.sched_getaffinity(0)),
        "cpu-model": model,
        "memory-gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "load-average": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "vmmig": _command_output(vmmig("--version")),
        "commit": _command_output(["git", "rev-parse", "--short", "HEAD"]),  # read-only
        "socat": _command_output(["socat", "-V"], "socat version").split(" on ")[0],
        "zstd": _command_output(["zstd", "--version"]).strip("* ").split(",")[0],
    }


def _command_output(argv: list[str], prefix: str = "") -> str:
    try:
        out = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(prefix)]
    return lines[0] if lines else "unavailable"


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
    header = [name for name, _ in COLUMNS]
    widths = [max(width, len(name)) for name, width in COLUMNS]
    rows = [table_row(r, baselines) for r in results]
    line = "  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(header, widths, strict=True)))
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    for result in results:
        if result.error is not None:
            print(f"  {result.name}: FAILED: {result.error}")
    print("  MB = 10^6 bytes of image; 'x socat' / 'x zstd|socat' = MB/s wall over that baseline's MB/s wall;")
    print("  RssAnon = peak anonymous RSS (mapped images excluded); baselines' RSS is not sampled.")
    print("  other CPU s = CPU time used by everything else on the machine during the run (should be ~0).")
    busy = [
        r.name for r in results if r.runs and (r.other_cpu_s or 0) > max(OTHER_CPU_WARN, 0.1 * r.runs[0].wall_s * CPUS)
    ]
    if busy:
        print(f"  WARNING: the machine was busy during {', '.join(busy)}: those numbers are not reliable; rerun.")
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
    args = parser.parse_args(argv)
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


def run_vmmig_cases(image: Path, size: int, workdir: Path, repeat: int) -> list[Result]:
    results = []
    for codec, level in CODECS:
        for threads in THREADS:
            for channels in CHANNELS:
                name = case_name(codec, level, threads, channels)
                once = functools.partial(run_case, image, size, workdir, codec, level, threads, channels)
                results.append(repeat_runs(name, "vmmig", size, repeat, once))
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
        check_space(rss_size)
        make_image(generator, image, rss_size)
        prefault(workdir, rss_size)
        return repeat_runs(name, "rss", rss_size, 1, lambda: run_case(image, rss_size, workdir, "zlib", 1, 2))
    except BenchError as exc:
        return Result(name=name, image_bytes=rss_size, runs=[], kind="rss", error=str(exc))
    finally:
        remove(image)


def write_json(
    path: str,
    info: dict[str, Any],
    args: argparse.Namespace,
    results: Sequence[Result],
    targets: Sequence[tuple[str, str]],
) -> None:
    document = {
        "machine": info,
        "options": {"size": args.size, "rss-size": args.rss_size, "repeat": args.repeat, "quick": args.quick},
        "results": [r.summary() for r in results],
        "targets": [{"verdict": v, "target": t} for v, t in targets],
    }
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=1)
        fh.write("\n")
    log(f"wrote {path}")


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    generator = load_generator()
    size, rss_size = generator.parse_size(args.size), generator.parse_size(args.rss_size)
    tools = ensure_tools()
    info = machine_info()
    print_header(info, size, rss_size, args.repeat)
    image = workdir / "image.img"
    check_space(size)
    make_image(generator, image, size)  # the image stays in /dev/shm (RAM) for every case: no cache effects
    prefault(workdir, size)
    results = run_vmmig_cases(image, size, workdir, args.repeat)
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
    failed = [r.name for r in results if r.error is not None]
    if failed:
        print(f"FAILED runs: {', '.join(failed)} (exit status 1)")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # Bytecode, as an installed package has it (pip compiles on install; an editable install under
    # PYTHONDONTWRITEBYTECODE would compile every module again in every vmmig process's start-up time).
    compileall.compile_dir(REPO / "migrate_cli", quiet=1)
    workdir = Path(tempfile.mkdtemp(prefix="vmmig-bench-", dir=SHM))
    try:
        return benchmark(args, workdir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
