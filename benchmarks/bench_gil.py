#!/usr/bin/env python3
"""Who holds the GIL on the hot path: py-spy samples both vmmig ends while they transfer.

Only work done outside the GIL adds throughput on a host with more cores than this one, so this benchmark measures,
per end, the share of wall time during which *some* thread of the process held the GIL, and which Python code
held it.

What it runs
------------
One deterministic 'mixed' image (examples/make_guest_image.py, seed 1; 1 GiB, ``--quick`` 256 MiB) in /dev/shm,
moved by a fresh ``vmmig recv`` + ``vmmig send`` pair over 127.0.0.1 for each case: ``--compress none``, ``zlib``
and ``zstd`` (level 1), at 1 and 2 threads a side (``--compress-threads N`` / ``--decompress-threads N``), each
``--repeat`` times (samples of the repeats are pooled). ``--tree DIR`` runs the vmmig of another checkout.

How the share is computed
-------------------------
What marks "some thread holds the GIL" in CPython 3.11 is ``_PyRuntime.gilstate.tstate_current``: a thread sets it
to its thread state when it takes the GIL and back to NULL when it releases it (``PyEval_SaveThread``). py-spy's
``--gil`` reads exactly that pointer (at offset 576 on Linux x86_64, from its table) to decide which thread "owns
the GIL". Two samplers read it over the same window:

* **the direct reader** (the ``GIL %`` column): a thread of this script ``pread``s those 8 bytes from
  /proc/PID/mem of each end at random times (exponential gaps, 1,000 a second), without pausing the process, and
  counts every read, so ``share = reads that found it non-NULL / reads``, standard error sqrt(p (1 - p) / reads)
  (+-). ``_PyRuntime`` is found by its distance from the start of the interpreter's file mapping, the same in this
  process and in the vmmig children (they run ``sys.executable``).
* **py-spy** (``py-spy %``, and who holds it): ``py-spy record --gil --idle --threads --nolineno --format raw
  --rate R --pid PID`` pauses the process at each tick, reads the pointer and keeps only the stack of the thread
  it names (``--idle`` keeps a holder py-spy would call idle, e.g. in ``threading.wait``'s Python code), so its
  samples are the ticks at which some thread held the GIL. It does not report how many ticks it took; its timer
  draws exponential gaps of mean 1/R from when it prints "Sampling process ..." and catches up when late, so the
  ticks over W seconds are a Poisson count of mean R x W: ``share = GIL samples / (R x W)``, standard error
  sqrt(GIL samples) / (R x W). Ticks py-spy failed to read are counted as errors. Its stacks give the top 5
  innermost Python functions and the top threads among GIL-holding samples.

The method check that runs first samples toy child processes both ways; each toy's thread measures by its own
clock the share of the window it spent in Python, i.e. held the GIL (the 'expected' share). A pure-Python loop
(~100%), a thread in ``time.sleep`` (0%) and one in long ``zlib.compress`` calls (~0%: CPython releases the GIL
around deflate) must read within 3 standard errors + 3 points by the direct reader (PASS/FAIL; py-spy's reading
is marked ok or LOW/HIGH).

Known bias (the ``half`` toys: 1 ms of Python, 1 ms of sleep, expected ~47%; BIAS when outside the range). On
this shared 2-vCPU machine both samplers under-read GIL holding that comes in ~1 ms stretches, by an amount that
changes from run to run: py-spy read 10-50% for them, the direct reader 22-47% (alone on a machine with load 5 it
read 40% for a 41% toy three times out of three), with 50 ms stretches py-spy read right (49% for 50%). A
sampler has to get a core to take its reading, and on busy cores it tends to get one when the target has just
blocked, i.e. released the GIL. vmmig's threads hold the GIL in short stretches between blocking calls, on two
cores shared by both ends and the samplers, so its shares are lower bounds; compare trees (``--tree``) in runs on
the same machine state, where the bias is alike, and look at the half toys of the same run. ``--nice -20`` (py-spy
at the highest priority) removed py-spy's bias in one series of runs and not in another: an option, not the
default.

The window: py-spy starts on both ends when the receiver creates DEST.partial (just before it welcomes the
sender); the direct reader starts once both py-spys sample; both stop when DEST.partial is renamed to DEST (after
the last page, the flush and the digest check) or either end exits. Interpreter start-up and the handshake are
outside it; ``pass %`` says how much of the sender's copy pass (from its ``--stats`` events) the window covered,
attaching costing ~20 ms. py-spy pauses each process at every tick and both samplers take CPU on the same cores,
so ``MB/s tool`` reads below an unsampled run.

Output per case and end: ``GIL %`` (+- its standard error, the runs' own shares), py-spy's share and counts, the
window, pass coverage, then py-spy's top 5 Python functions (innermost frame) and top threads among GIL-holding
samples, each as a share of wall time (they add up to py-spy's share). ``--json PATH`` also writes every pooled
stack count.

    python benchmarks/bench_gil.py [--size 1GiB] [--repeat 3] [--rate 200] [--quick] [--tree DIR] [--json out.json]
        [--codecs none,zlib,zstd] [--threads 1,2] [--nice N] [--nonblocking]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import harness
from harness import (
    GIB,
    BenchError,
    VmmigPair,
    arg_parser,
    check_space,
    fmt_size,
    load_generator,
    log,
    make_image,
    prefault,
    remove,
    run_main,
)

CASE_TIMEOUT = 300.0  # seconds for one migration
SPY_TIMEOUT = 30.0  # seconds for py-spy to attach, or to write its output once stopped
POLL = 0.002  # seconds between checks of DEST.partial
TOP = 5
CODECS: tuple[tuple[str, int | None], ...] = (("none", None), ("zlib", 1), ("zstd", 1))
THREADS: tuple[int, ...] = (1, 2)

TOY_SECONDS = 2.0
TOY = """
import sys, threading, time, zlib
DATA = bytes(range(256)) * 16384 + bytes(4 << 20)  # 8 MiB that deflate works on long; little output
held = 0.0  # seconds the toy thread spent in its Python loop: the truth to compare py-spy with
def spin(seconds):
    global held
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        pass
    held += time.perf_counter() - start
def busy():
    while True:
        spin(0.01)
def asleep():
    while True:
        time.sleep(1)
def deflate():
    while True:
        zlib.compress(DATA, 9)
def half():
    while True:
        spin(0.001)
        time.sleep(0.001)
kinds = {"busy": busy, "sleep": asleep, "zlib": deflate, "half": half}
threading.Thread(target=kinds[sys.argv[1]], daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
held0, t0 = held, time.perf_counter()
sys.stdin.readline()
print((held - held0) / (time.perf_counter() - t0), flush=True)
"""
HOG = "while True: pass"
# (name, what the toy's thread does while its main thread waits on stdin, toy kind, a CPU hog beside it)
TOYS: tuple[tuple[str, str, str, bool], ...] = (
    ("busy", "pure-Python loop", "busy", False),
    ("sleep", "time.sleep", "sleep", False),
    ("zlib", "zlib.compress level 9 of 8 MiB", "zlib", False),
    ("half", "1 ms loop, 1 ms time.sleep", "half", False),  # the bias checks: see "Known bias"
    ("half+hog", "the same beside a CPU hog", "half", True),
)
TOY_SLACK = 0.03  # allowed beyond 3 standard errors: what CPython does around the loop or the call


# ----------------------------------------------------------------------------------------------------------------
# py-spy


def py_spy() -> str:
    """The py-spy beside this interpreter (the venv's), else the one on PATH."""
    found = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is not installed: .venv/bin/python -m pip install py-spy (or make bench)")
    return found


@dataclass
class Sampled:
    """What py-spy saw of one process over one window: its GIL-holding stacks (root first, thread frame first)."""

    window_s: float
    rate: int
    gil_samples: int
    errors: int
    stacks: Counter[str] = field(default_factory=Counter)
    reads: int = 0  # the direct reader's reads of tstate_current over the same window
    reads_held: int = 0  # ... of which found it set: some thread held the GIL

    @property
    def ticks(self) -> float:
        """The expected number of ticks in the window (py-spy's timer is a Poisson process of rate R)."""
        return self.rate * self.window_s


@dataclass(frozen=True)
class SpyOptions:
    """How py-spy samples: ``rate`` ticks per second, at niceness ``nice`` (negative needs root), pausing the
    process at each tick unless ``nonblocking``."""

    rate: int
    nice: int = 0
    nonblocking: bool = False

    def argv(self, pid: int, output: Path) -> list[str]:
        niced = ["nice", "-n", str(self.nice)] if self.nice else []
        return [*niced, py_spy(), "record", "--pid", str(pid), "--gil", "--idle", "--threads", "--nolineno",
                "--format", "raw", "--output", str(output), "--rate", str(self.rate),
                *(["--nonblocking"] if self.nonblocking else [])]  # fmt: skip

    def __str__(self) -> str:
        pausing = "nonblocking" if self.nonblocking else "pausing the process at each tick"
        return f"{self.rate} Hz, nice {self.nice}, {pausing}"


TSTATE_CURRENT = 576  # offsetof(_PyRuntimeState, gilstate.tstate_current), CPython 3.11 on Linux x86_64 (py-spy's)
READ_RATE = 1000.0  # mean reads per second and process of the direct reader


def mappings(pid: int) -> list[tuple[int, int, str]]:
    """(start, end, path) of each file mapping of a process."""
    rows = []
    with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(v, 16) for v in fields[0].split("-"))
                rows.append((start, end, fields[5].strip()))
    return rows


def runtime_place() -> tuple[str, int] | None:
    """(file, distance from its lowest mapping) of this interpreter's ``_PyRuntime``, which a child running the same
    interpreter has at the same distance; None where TSTATE_CURRENT is not known to be right."""
    if sys.version_info[:2] != (3, 11) or platform.machine() != "x86_64":
        return None
    address = ctypes.addressof(ctypes.c_char.in_dll(ctypes.pythonapi, "_PyRuntime"))
    own = mappings(os.getpid())
    path = next((p for start, end, p in own if start <= address < end), None)
    if path is None:
        return None
    return path, address - min(start for start, _, p in own if p == path)


class GilReader:
    """The direct reader: reads each process's ``tstate_current`` (8 bytes of /proc/PID/mem, no pause) at random
    times, READ_RATE a second, from a thread of this process; every read is counted, so the share needs no
    estimate of the ticks."""

    def __init__(self, pids: Sequence[int]) -> None:
        place = runtime_place()
        if place is None:
            raise BenchError("the direct reader needs CPython 3.11 on x86_64")
        path, distance = place
        self.fds: list[int] = []
        self.addresses: list[int] = []
        for pid in pids:
            bases = [start for start, _, p in mappings(pid) if p == path]
            if not bases:
                raise BenchError(f"process {pid} does not run {path}")
            self.addresses.append(min(bases) + distance + TSTATE_CURRENT)
            self.fds.append(os.open(f"/proc/{pid}/mem", os.O_RDONLY))
        self.reads = [0] * len(pids)
        self.held = [0] * len(pids)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="gil-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for i, (fd, address) in enumerate(zip(self.fds, self.addresses, strict=True)):
                try:
                    value = os.pread(fd, 8, address)
                except OSError:
                    continue  # the process has exited
                self.reads[i] += 1
                self.held[i] += value != bytes(8)
            time.sleep(random.expovariate(READ_RATE))

    def stop(self) -> list[tuple[int, int]]:
        """Stop reading: (reads, reads that found the GIL held) per process."""
        self._stop.set()
        self._thread.join()
        for fd in self.fds:
            os.close(fd)
        return list(zip(self.reads, self.held, strict=True))


class GilSpy:
    """``py-spy record --gil`` of one process, from the line saying it samples until ``stop()``."""

    def __init__(self, pid: int, output: Path, options: SpyOptions) -> None:
        self.output, self.rate = output, options.rate
        self.started: float | None = None  # time.time() of "Sampling process ..."
        self.exited: float | None = None  # time.time() py-spy saw the process exit
        self.stopped: float | None = None  # time.time() of our SIGINT
        self.lines: list[str] = []
        self.reads = self.reads_held = 0  # the direct reader's, over the same window
        self.sampling = threading.Event()
        self.proc = subprocess.Popen(
            options.argv(pid, output),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, name=f"py-spy-{pid}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            now = time.time()
            self.lines.append(line.strip())
            if "Sampling process" in line:
                self.started = now
                self.sampling.set()
            elif "because process exited" in line:
                self.exited = now
        self.sampling.set()  # py-spy ended: whoever waits for it to sample must not wait forever

    def wait_sampling(self, timeout: float = SPY_TIMEOUT) -> None:
        if not self.sampling.wait(timeout) or self.started is None:
            raise BenchError(f"py-spy did not start sampling: {self.tail()}")

    def stop(self) -> None:
        """SIGINT (py-spy then writes its output); the window ends now unless the process exited before."""
        if self.proc.poll() is None:
            self.stopped = time.time()
            self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(SPY_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(SPY_TIMEOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def tail(self) -> str:
        return " | ".join(line for line in self.lines[-3:] if line) or "(no output)"

    @property
    def window(self) -> tuple[float, float]:
        """(start, end) of the sampled window, time.time() seconds."""
        if self.started is None:
            raise BenchError(f"py-spy never sampled: {self.tail()}")
        ends = [t for t in (self.exited, self.stopped) if t is not None]
        return self.started, min(ends) if ends else self.started

    def result(self) -> Sampled:
        samples = errors = None
        for line in self.lines:
            if "Samples:" in line and "Errors:" in line:
                samples = int(line.split("Samples:")[1].split()[0])
                errors = int(line.split("Errors:")[1].split()[0])
        if samples is None or errors is None or not self.output.exists():
            raise BenchError(f"py-spy wrote no samples (exit {self.proc.returncode}): {self.tail()}")
        stacks = parse_raw(self.output.read_text(errors="replace"))
        if sum(stacks.values()) != samples:
            raise BenchError(f"py-spy counted {samples} samples but wrote {sum(stacks.values())}")
        start, end = self.window
        return Sampled(end - start, self.rate, samples, errors, stacks, self.reads, self.reads_held)


def parse_raw(text: str) -> Counter[str]:
    """py-spy's raw (collapsed) format: ``frame;frame;...;leaf COUNT`` per line."""
    stacks: Counter[str] = Counter()
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks[stack] += int(count)
    return stacks


def thread_of(stack: str) -> str:
    """The thread's name from the first frame ``thread (TID): NAME`` (the TID differs from run to run)."""
    first = stack.split(";", 1)[0]
    if not first.startswith("thread ("):
        return "?"
    return first.split("): ", 1)[1] if "): " in first else "(unnamed thread)"


def leaf_of(stack: str) -> str:
    """The innermost Python frame, ``function (file)``: the code that held the GIL."""
    frames = stack.split(";")
    return frames[-1] if len(frames) > 1 else "(no Python frame)"


# ----------------------------------------------------------------------------------------------------------------
# Pooled results of one end of a case


@dataclass
class EndResult:
    case: str
    end: str  # "send" or "recv"
    runs: list[Sampled] = field(default_factory=list)
    pass_cover: list[float] = field(default_factory=list)  # share of the sender's pass inside the window, per run
    tool_mbps: list[float] = field(default_factory=list)
    image_bytes: int = 0

    @property
    def gil_s_per_gib(self) -> float:
        """GIL-held seconds per GiB moved: the least time one GiB takes at this end, however many cores."""
        moved = len(self.runs) * self.image_bytes / GIB
        return self.direct * sum(r.window_s for r in self.runs) / moved if moved else math.nan

    @property
    def ticks(self) -> float:
        return sum(r.ticks for r in self.runs)

    @property
    def gil_samples(self) -> int:
        return sum(r.gil_samples for r in self.runs)

    @property
    def share(self) -> float:
        return self.gil_samples / self.ticks if self.ticks else math.nan

    @property
    def stderr(self) -> float:
        return math.sqrt(self.gil_samples) / self.ticks if self.ticks else math.nan

    @property
    def direct(self) -> float:
        """The direct reader's share: reads that found the GIL held / reads."""
        reads = sum(r.reads for r in self.runs)
        return sum(r.reads_held for r in self.runs) / reads if reads else math.nan

    @property
    def direct_stderr(self) -> float:
        """Binomial, as if the reads were independent (they are at random times)."""
        reads = sum(r.reads for r in self.runs)
        return math.sqrt(self.direct * (1 - self.direct) / reads) if reads else math.nan

    def run_shares(self) -> list[float]:
        """Each run's own direct share: their spread shows the run-to-run noise the standard error leaves out."""
        return [direct_share(r) for r in self.runs]

    def stacks(self) -> Counter[str]:
        return sum((r.stacks for r in self.runs), Counter())

    def top(self, key: str, n: int = TOP) -> list[tuple[str, float]]:
        """The n leaf functions (``key`` "function") or threads ("thread") holding the GIL most: share of wall."""
        get = leaf_of if key == "function" else thread_of
        counts: Counter[str] = Counter()
        for stack, count in self.stacks().items():
            counts[get(stack)] += count
        return [(name, count / self.ticks) for name, count in counts.most_common(n)]

    def summary(self) -> dict[str, Any]:
        return {
            "case": self.case,
            "end": self.end,
            "gil-share": self.direct,
            "gil-share-stderr": self.direct_stderr,
            "reads": sum(r.reads for r in self.runs),
            "py-spy-gil-share": self.share,
            "py-spy-gil-share-stderr": self.stderr,
            "run-shares": self.run_shares(),
            "gil-samples": self.gil_samples,
            "ticks": self.ticks,
            "window-seconds": sum(r.window_s for r in self.runs),
            "gil-seconds-per-gib": self.gil_s_per_gib,
            "errors": sum(r.errors for r in self.runs),
            "pass-covered": self.pass_cover,
            "tool-mbytes-per-second": self.tool_mbps,
            "top-functions": self.top("function"),
            "top-threads": self.top("thread"),
            "stacks": dict(self.stacks().most_common()),
        }


# ----------------------------------------------------------------------------------------------------------------
# The toy check of the method


@dataclass
class ToyCheck:
    toy: str
    what: str
    expected: float  # the share of wall time the toy's thread held the GIL, by its own clock
    result: EndResult

    @property
    def tolerance(self) -> float:
        """For the direct reader: 3 binomial standard errors at the expected share, plus TOY_SLACK."""
        reads = sum(r.reads for r in self.result.runs)
        p = min(1.0, self.expected)  # the toy's clock can read a hair over 100%
        return 3 * math.sqrt(p * (1 - p) / reads) + TOY_SLACK if reads else math.inf

    @property
    def spy_tolerance(self) -> float:
        """For py-spy: 3 standard errors of a Poisson count whose mean is the expected share of the ticks, + slack."""
        ticks = self.result.ticks
        return 3 * math.sqrt(self.expected * ticks) / ticks + TOY_SLACK if ticks else math.inf

    @property
    def ok(self) -> bool:
        return abs(self.result.direct - self.expected) <= self.tolerance

    @property
    def verdict(self) -> str:
        """PASS/FAIL for the validation toys; the ``half`` toys only probe for bias: BIAS when outside the range."""
        return "PASS" if self.ok else "BIAS" if self.toy.startswith("half") else "FAIL"

    @property
    def spy_ok(self) -> bool:
        return abs(self.result.share - self.expected) <= self.spy_tolerance


def check_method(workdir: Path, options: SpyOptions) -> list[ToyCheck]:
    """Each toy in a child process, sampled by py-spy and the direct reader for TOY_SECONDS as a vmmig end is; the
    toy measures the share of that time its thread spent in Python (the 'expected' share)."""
    checks = []
    for name, what, kind, hog in TOYS:
        toy = subprocess.Popen([sys.executable, "-c", TOY, kind], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True, start_new_session=True)  # fmt: skip
        hogs = [subprocess.Popen([sys.executable, "-c", HOG], start_new_session=True)] if hog else []
        spy: GilSpy | None = None
        try:
            assert toy.stdin is not None and toy.stdout is not None
            if toy.stdout.readline().strip() != "ready":
                raise BenchError(f"toy {name} did not start")
            spy = GilSpy(toy.pid, workdir / f"toy-{name}.txt", options)
            spy.wait_sampling()
            reader = GilReader([toy.pid])
            toy.stdin.write("start\n")
            toy.stdin.flush()
            time.sleep(TOY_SECONDS)
            toy.stdin.write("stop\n")
            toy.stdin.flush()
            [(spy.reads, spy.reads_held)] = reader.stop()
            spy.stop()
            expected = 0.0 if kind in ("sleep", "zlib") else float(toy.stdout.readline())
            result = EndResult(case=f"toy {name}", end="toy", runs=[spy.result()])
            checks.append(ToyCheck(name, what, expected, result))
        finally:
            if spy is not None:
                spy.kill()
            for proc in (toy, *hogs):
                proc.kill()
                proc.wait()
    return checks


def print_method(checks: Sequence[ToyCheck], options: SpyOptions) -> bool:
    """The toys' shares by the direct reader (PASS/FAIL) and by py-spy (ok, or LOW/HIGH beyond its tolerance)."""
    print(f"method check on toy processes, {TOY_SECONDS:.0f} s each: the direct reader at {READ_RATE:.0f} Hz and "
          f"py-spy --gil ({options})")  # fmt: skip
    for c in checks:
        r = c.result
        spy = "ok" if c.spy_ok else "LOW" if r.share < c.expected else "HIGH"
        print(f"  {c.verdict}  {c.toy:<8} {c.what:<32} expected {pct(c.expected):>6}: "
              f"direct {pct(r.direct):>6} +-{pct(c.tolerance, 0)}, "
              f"py-spy {pct(r.share):>6} +-{pct(c.spy_tolerance, 0)} {spy}")  # fmt: skip
    print()
    if any(c.verdict == "BIAS" or not c.spy_ok for c in checks):
        print("  BIAS / LOW: GIL holding in ~1 ms stretches read low now (see 'Known bias' in the docstring):")
        print("  read the shares below as lower bounds; py-spy % is a cross-check only")
        print()
    return all(c.verdict != "FAIL" for c in checks)


# ----------------------------------------------------------------------------------------------------------------
# vmmig cases


def case_name(codec: str, level: int | None, threads: int) -> str:
    return f"{codec}{'' if level is None else f'-{level}'} x{threads}"


def run_case(
    image: Path, workdir: Path, codec: str, level: int | None, threads: int, options: SpyOptions
) -> tuple[Sampled, Sampled, float, float]:
    """One migration sampled at both ends: (send, recv, share of the sender's pass in the window, MB/s tool)."""
    what = case_name(codec, level, threads)
    dest, stats = workdir / "dest.img", workdir / "send.stats"
    partial = Path(f"{dest}.partial")
    remove(dest, partial, stats)
    level_args = [] if level is None else ["--level", str(level)]
    spies: list[GilSpy] = []
    try:
        with VmmigPair(workdir, what) as pair:
            address = pair.start_recv("--decompress-threads", str(threads), str(dest))
            pair.start_send(str(image), address, "--compress", codec, *level_args, "--compress-threads", str(threads),
                            "--stats", str(stats))  # fmt: skip
            spies = sample_transfer(pair, partial, options, workdir)
            pair.wait(CASE_TIMEOUT)
            sent, _ = pair.reports()
        if not spies:
            raise BenchError(f"{what}: the transfer ended before py-spy could attach")
        send, recv = (spy.result() for spy in spies)
        return send, recv, pass_covered(stats, spies[0].window), float(sent["image-mbytes-per-second"])
    finally:
        for spy in spies:
            spy.kill()
        remove(dest, partial, stats)


def sample_transfer(pair: VmmigPair, partial: Path, options: SpyOptions, workdir: Path) -> list[GilSpy]:
    """Start py-spy on both ends once DEST.partial exists; stop both once it is gone (renamed) or an end exited."""
    deadline = pair.started + CASE_TIMEOUT
    while not partial.exists():
        if any(c.done.is_set() for c in pair.children) or time.perf_counter() > deadline:
            return []  # pair.wait() says why
        time.sleep(POLL)
    send, recv = pair.children
    spies = [GilSpy(send.pid, workdir / "send.gil", options), GilSpy(recv.pid, workdir / "recv.gil", options)]
    reader: GilReader | None = None
    try:
        for spy in spies:
            spy.wait_sampling()
        reader = GilReader([send.pid, recv.pid])
        while partial.exists() and not any(c.done.is_set() for c in pair.children):
            if time.perf_counter() > deadline:
                raise BenchError(f"{pair.what}: timed out")
            time.sleep(POLL)
    finally:
        reads = reader.stop() if reader is not None else [(0, 0), (0, 0)]
        for spy, (count, held) in zip(spies, reads, strict=True):
            spy.stop()
            spy.reads, spy.reads_held = count, held
    return spies


def pass_covered(stats: Path, window: tuple[float, float]) -> float:
    """The share of the sender's copy passes (``pass`` events of its --stats file) inside the sampled window."""
    total = inside = 0.0
    for line in stats.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "pass":
            end = float(event["time"])
            start = end - float(event["duration"]) / 1000
            total += end - start
            inside += max(0.0, min(end, window[1]) - max(start, window[0]))
    return inside / total if total else math.nan


def direct_share(sampled: Sampled) -> float:
    return sampled.reads_held / sampled.reads if sampled.reads else math.nan


def run_cases(image: Path, workdir: Path, args: argparse.Namespace) -> list[EndResult]:
    """Every case ``--repeat`` times, in interleaved rounds; the samples of each end pooled over the rounds."""
    results: dict[tuple[str, str], EndResult] = {}
    for round_no in range(args.repeat):
        for codec, level in CODECS:
            if codec not in args.codecs:
                continue
            for threads in args.threads:
                name = case_name(codec, level, threads)
                send, recv, cover, mbps = run_case(image, workdir, codec, level, threads, args.spy)
                for end, sampled in (("send", send), ("recv", recv)):
                    result = results.setdefault(
                        (name, end), EndResult(case=name, end=end, image_bytes=image.stat().st_size)
                    )
                    result.runs.append(sampled)
                    result.pass_cover.append(cover)
                    result.tool_mbps.append(mbps)
                shares = ", ".join(f"{end} {pct(direct_share(s))} (py-spy {pct(s.gil_samples / s.ticks)})"
                                   for end, s in (("send", send), ("recv", recv)))  # fmt: skip
                log(f"round {round_no + 1}: {name}: {mbps:.0f} MB/s tool, GIL {shares}, pass covered {pct(cover, 0)}")
    return list(results.values())


# ----------------------------------------------------------------------------------------------------------------
# Output


def pct(share: float, digits: int = 1) -> str:
    return "-" if math.isnan(share) else f"{100 * share:.{digits}f}%"


COLUMNS: tuple[tuple[str, int], ...] = (
    ("case", 9),
    ("end", 4),
    ("GIL %", 6),
    ("+-", 5),
    ("runs min-max", 12),
    ("reads", 6),
    ("py-spy %", 8),
    ("py-spy samples / ticks", 22),
    ("window s", 8),
    ("GIL s/GiB", 9),
    ("pass %", 6),
    ("MB/s tool", 9),
    ("errors", 6),
)


def print_results(results: Sequence[EndResult]) -> None:
    rows = [
        [
            r.case,
            r.end,
            pct(r.direct),
            pct(r.direct_stderr),
            f"{pct(min(r.run_shares()), 0)}-{pct(max(r.run_shares()), 0)}",
            str(sum(s.reads for s in r.runs)),
            pct(r.share),
            f"{r.gil_samples} / {r.ticks:.0f}",
            f"{sum(s.window_s for s in r.runs):.2f}",
            f"{r.gil_s_per_gib:.2f}",
            pct(min(r.pass_cover), 0),
            f"{statistics.median(r.tool_mbps):.0f}",
            str(sum(s.errors for s in r.runs)),
        ]
        for r in results
    ]
    harness.print_table(COLUMNS, rows, left=(0, 1))
    print(
        "  GIL % = the share of wall time some thread held the GIL (direct reader: reads that found it held / reads);"
    )
    print("  +- = its standard error; runs min-max = the runs' own shares; py-spy % = GIL-holding samples / (rate x")
    print("  window); GIL s/GiB = GIL % x window / GiB moved: a floor on seconds per GiB at this end on any number")
    print("  of cores; pass % = the least share of the sender's copy pass that the window covered in a run.")
    print()
    print(f"who holds it: py-spy's top {TOP} innermost Python functions, then threads, as % of wall time (pooled)")
    for r in results:
        print(f"  {r.case} {r.end}: GIL {pct(r.direct)} (py-spy {pct(r.share)})")
        for name, share in r.top("function"):
            print(f"    {pct(share):>6}  {name}")
        threads = ", ".join(f"{name} {pct(share)}" for name, share in r.top("thread"))
        print(f"    threads: {threads}")
    print()


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = arg_parser(__doc__ or "", "1GiB", "smoke test: --size 256MiB --repeat 1")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case, pooled (default 3)")
    parser.add_argument("--rate", type=int, default=200, help="py-spy samples per second (default 200)")
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="py-spy's niceness (default 0; negative needs root): the half toys show whether it helps",
    )
    parser.add_argument(
        "--nonblocking", action="store_true", help="py-spy --nonblocking: read without pausing the processes"
    )
    parser.add_argument("--codecs", default="none,zlib,zstd", help="these codecs only (comma-separated)")
    parser.add_argument("--threads", default="1,2", help="these thread counts only (comma-separated)")
    args = parser.parse_args(argv)
    args.codecs = args.codecs.split(",")
    try:
        args.threads = [int(v) for v in args.threads.split(",")]
    except ValueError:
        parser.error("--threads takes comma-separated whole numbers")
    if args.quick:
        args.size, args.repeat = "256MiB", 1
    if args.repeat < 1 or args.rate < 1:
        parser.error("--repeat and --rate must be at least 1")
    if args.nice < 0 and os.geteuid() != 0:
        parser.error("a negative --nice needs root (use --nice 0, and read the method check)")
    args.spy = SpyOptions(args.rate, args.nice, args.nonblocking)
    return args


def benchmark(args: argparse.Namespace, workdir: Path) -> int:
    py_spy()  # fails early, with the way to install it
    generator = load_generator()
    size = generator.parse_size(args.size)
    info = harness.machine_info()
    print("vmmig: who holds the GIL, per end, over 127.0.0.1")
    print(f"  date     {info['date']}   (load average at start: {' '.join(info['load-average'])})")
    print(
        f"  machine  nproc {info['nproc']} (usable {info['usable-cpus']}), {info['cpu-model']}, Linux {info['kernel']}"
    )
    print(f"  software {info['vmmig']} (commit {info['commit']}, tree {info['tree']}), Python {info['python']}, "
          f"{harness.command_output([py_spy(), '--version'])}")  # fmt: skip
    print(f"  image    {fmt_size(size)} 'mixed' (seed 1) in /dev/shm; {args.repeat} run(s) per case; py-spy {args.spy}")
    print(flush=True)
    checks = check_method(workdir, args.spy)
    method_ok = print_method(checks, args.spy)
    image = workdir / "image.img"
    check_space(size, 1.7, "the source image (sparse: ~60%) and one destination")
    make_image(generator, image, size)
    prefault(workdir, size)
    try:
        results = run_cases(image, workdir, args)
    finally:
        remove(image)
    print_results(results)
    if not method_ok:
        print("WARNING: the method check failed: the GIL shares above are not reliable.")
    if args.json_path:
        harness.write_json(
            args.json_path,
            {
                "machine": info,
                "options": {
                    "size": args.size,
                    "repeat": args.repeat,
                    "rate": args.rate,
                    "nice": args.nice,
                    "nonblocking": args.nonblocking,
                },
                "method-check": [
                    {"toy": c.toy, "expected": c.expected, "ok": c.ok, **c.result.summary()} for c in checks
                ],
                "results": [r.summary() for r in results],
            },
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main(lambda workdir: benchmark(args, workdir), "vmmig-bench-gil-", args.tree)


if __name__ == "__main__":
    sys.exit(main())
