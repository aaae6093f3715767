"""What every benchmark shares: vmmig processes, their rusage and JSON reports, the machine's load, the output.

* ``vmmig(...)`` / ``Child`` / ``VmmigPair``: a ``vmmig recv`` started with a ready file, a ``vmmig send`` to the
  address it writes, both reaped by ``os.wait4`` (exit time and rusage), their ``--json`` reports parsed and checked.
* ``--tree DIR`` (``add_tree_option``): run the vmmig of another checkout (``python -m migrate_cli`` with cwd = DIR,
  as tests/conftest.py does), e.g. a ``git worktree`` of an older commit, to compare before and after in one run.
* ``cpu_clock`` / ``other_cpu`` / ``machine_busy_s``: how much CPU the rest of the machine used during a case.
* ``load_generator``: examples/make_guest_image.py as a module; ``print_table``: aligned columns.
"""

from __future__ import annotations

import argparse
import compileall
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType, ModuleType, TracebackType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHM = Path("/dev/shm")
MB = 1_000_000
MIB = 1 << 20
GIB = 1 << 30
CPUS = len(os.sched_getaffinity(0))
CLK_TCK = os.sysconf("SC_CLK_TCK")
KILL_GRACE = 5.0  # seconds to wait for a killed child to be reaped
FAIL_GRACE = 3.0  # seconds the other side gets to exit (and explain) once one side of a run has failed
RSS_INTERVAL = 0.05  # seconds between /proc/PID/status samples
OTHER_CPU_WARN = 0.5  # warn when other processes used more CPU seconds than this (and 10% of the run's capacity)


class BenchError(Exception):
    """A run failed (non-zero exit, digest or size mismatch, timeout): the benchmark cannot report it."""


# ----------------------------------------------------------------------------------------------------------------
# Which vmmig: this checkout's, or another tree's (--tree)

_tree = REPO


def add_tree_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tree",
        metavar="DIR",
        type=Path,
        help="run the vmmig of the checkout DIR (python -m migrate_cli with cwd=DIR), e.g. a git worktree",
    )


def arg_parser(description: str, size: str, quick: str, json: bool = True) -> argparse.ArgumentParser:
    """A parser with the options the small benchmarks share: --size, --quick, --json PATH (``json_path``), --tree."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default=size, help=f"image size (default {size})")
    parser.add_argument("--quick", action="store_true", help=quick)
    if json:
        parser.add_argument("--json", dest="json_path", metavar="PATH", help="also write the results as JSON to PATH")
    add_tree_option(parser)
    return parser


def use_tree(tree: Path | None) -> Path:
    """Make every later ``vmmig()`` child run the package of ``tree`` (default: this checkout); returns it."""
    global _tree
    _tree = REPO if tree is None else tree.resolve()
    if not (_tree / "migrate_cli" / "__main__.py").is_file():
        raise BenchError(f"{_tree} has no migrate_cli package")
    return _tree


def tree() -> Path:
    """The checkout whose vmmig the children run (their cwd)."""
    return _tree


def vmmig(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def compile_package(root: Path | None = None) -> None:
    """Bytecode, as an installed package has it (pip compiles on install; an editable install under
    PYTHONDONTWRITEBYTECODE would compile every module again in every vmmig process's start-up time)."""
    compileall.compile_dir((root or _tree) / "migrate_cli", quiet=1)


def load_module(path: Path, name: str) -> ModuleType:
    """Import a script of the repository (examples/...) as a module."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def load_generator() -> ModuleType:
    """examples/make_guest_image.py: ``generate(path, size, seed=, profile=)`` and ``parse_size``."""
    return load_module(REPO / "examples" / "make_guest_image.py", "make_guest_image")


# ----------------------------------------------------------------------------------------------------------------
# The machine's load


def machine_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat", encoding="ascii") as fh:
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fh.readline().split()[1:8])
    return (user + nice + system + irq + softirq) / CLK_TCK


def own_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def cpu_clock() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of this process): the start of ``other_cpu``."""
    return machine_busy_s(), own_cpu_s()


def other_cpu(before: tuple[float, float], ours: float) -> float:
    """CPU seconds the rest of the machine used since ``before``: all busy time minus this script's and ``ours``."""
    busy, own = cpu_clock()
    return max(0.0, busy - before[0] - (own - before[1]) - ours)


def busy_warning(names_and_load: Sequence[tuple[str, float | None, float]]) -> str | None:
    """A warning naming the cases (name, other CPU s, wall s) during which the rest of the machine was busy."""
    busy = [name for name, other, wall in names_and_load if (other or 0) > max(OTHER_CPU_WARN, 0.1 * wall * CPUS)]
    if not busy:
        return None
    return f"WARNING: the machine was busy during {', '.join(busy)}: those numbers are not reliable; rerun."


def proc_cpu_s(pid: int) -> float | None:
    """utime + stime of a live process (all threads) from /proc/PID/stat; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def ip_out_octets() -> int:
    """IpExt OutOctets of this network namespace (loopback included)."""
    with open("/proc/net/netstat", encoding="ascii") as fh:
        lines = fh.read().splitlines()
    for header, values in zip(lines[::2], lines[1::2], strict=False):
        if header.startswith("IpExt:"):
            table = dict(zip(header.split()[1:], values.split()[1:], strict=True))
            return int(table["OutOctets"])
    return 0


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


# ----------------------------------------------------------------------------------------------------------------
# Child processes: own session (so a whole pipeline can be killed), reaped by a thread calling os.wait4


class Child:
    """A child process whose exit time and rusage come from os.wait4; RssAnon optionally sampled while it runs."""

    def __init__(
        self,
        argv: Sequence[str],
        workdir: Path,
        tag: str,
        sample: bool = False,
        stderr: int | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        """``stderr``: a file descriptor (e.g. a pty) instead of the file ``workdir/TAG.err``."""
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
                list(argv),
                cwd=_tree,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err if stderr is None else stderr,
                start_new_session=True,
            )
        self.pid = self.proc.pid
        threading.Thread(target=self._reap, name=f"reap-{tag}", daemon=True).start()
        self._sampler: threading.Thread | None = None
        if sample:
            self._sampler = threading.Thread(target=self._sample_rss, name=f"rss-{tag}", daemon=True)
            self._sampler.start()

    def _reap(self) -> None:
        _, status, rusage = os.wait4(self.pid, 0)
        self.ended = time.perf_counter()
        self.rusage = rusage
        self.returncode = os.waitstatus_to_exitcode(status)
        self.proc.returncode = self.returncode  # Popen must not wait for it again
        self.done.set()

    def _sample_rss(self) -> None:
        while not self.done.is_set():
            kib = read_rss_anon_kib(self.pid)
            if kib is None:
                return
            self.rss_samples.append((time.perf_counter(), kib))
            self.done.wait(RSS_INTERVAL)

    @property
    def cpu_s(self) -> float | None:
        return None if self.rusage is None else self.rusage.ru_utime + self.rusage.ru_stime

    @property
    def rss_peak_kib(self) -> int | None:
        return max((kib for _, kib in self.rss_samples), default=None)

    def live_cpu_s(self) -> float | None:
        """CPU seconds so far of the still running child; None once it has exited."""
        return None if self.done.is_set() else proc_cpu_s(self.pid)

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the child to be reaped; True if it was."""
        if self.done.wait(max(0.0, timeout)):
            if self._sampler is not None:
                self._sampler.join()
            return True
        return False

    def kill(self) -> None:
        """SIGKILL the child's process group (its own session: pgid == pid) unless it has been reaped already."""
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

    def report(self, what: str) -> dict[str, Any]:
        """The ``--json`` report on stdout (the whole output, or its last line after other output)."""
        text = self.stdout().strip()
        try:
            report = json.loads(text)
        except json.JSONDecodeError:
            try:
                report = json.loads(text.splitlines()[-1])
            except (IndexError, json.JSONDecodeError) as exc:
                raise BenchError(f"{what}: {self.tag} printed no JSON report ({exc}): {self.stderr_tail()}") from None
        if not isinstance(report, dict):
            raise BenchError(f"{what}: {self.tag} JSON report is not an object")
        return report


def wait_all(children: Sequence[Child], deadline: float, what: str) -> None:
    """Wait for every child until ``deadline`` (perf_counter); once one has failed, give the others FAIL_GRACE, then
    raise. Exit times come from the reaper threads, so the polling interval does not affect any measurement."""
    while pending := [c for c in children if not c.done.is_set()]:
        if failed := [c for c in children if c.done.is_set() and c.returncode != 0]:
            deadline = min(deadline, time.perf_counter() + FAIL_GRACE)
            for child in pending:
                child.wait(deadline - time.perf_counter())
            check_exits(failed, what)
        if time.perf_counter() > deadline:
            raise BenchError(f"{what}: timed out ({', '.join(c.tag for c in pending)} still running)")
        time.sleep(0.02)
    for child in children:
        child.wait(deadline - time.perf_counter())  # joins the RSS sampler


def check_exits(children: Sequence[Child], what: str) -> None:
    for child in children:
        if child.returncode != 0:
            raise BenchError(f"{what}: {child.tag} exited {child.returncode}: {child.stderr_tail()}")


def kill_all(children: Sequence[Child | None]) -> None:
    for child in children:
        if child is not None:
            child.kill()


def wait_for_text(path: Path, child: Child, timeout: float, what: str) -> str:
    """The stripped text of ``path`` once a child wrote it (a ready or pid file); raises if the child exits first."""
    deadline = time.perf_counter() + timeout
    while True:
        if path.exists() and (text := path.read_text().strip()):
            return text
        if child.done.is_set():
            raise BenchError(f"{what} exited {child.returncode} before writing {path.name}: {child.stderr_tail()}")
        if time.perf_counter() > deadline:
            raise BenchError(f"{what} did not write {path.name} within {timeout:.0f}s")
        time.sleep(0.01)


# ----------------------------------------------------------------------------------------------------------------
# One migration: vmmig recv with a ready file, then vmmig send to the address it wrote


class VmmigPair:
    """``vmmig recv --listen 127.0.0.1:0 --ready-file`` and ``vmmig send`` (both ``--json --quiet``); killed on exit.

    Use: ``with VmmigPair(workdir, what) as pair: address = pair.start_recv(...); pair.start_send(...);
    pair.wait(timeout); sent, received = pair.reports()``.
    """

    def __init__(
        self, workdir: Path, what: str, sample: bool = False, tags: tuple[str, str] = ("recv", "send")
    ) -> None:
        self.workdir, self.what, self.sample, self.tags = workdir, what, sample, tags
        self.ready = workdir / "ready"
        self.recv: Child | None = None
        self.send: Child | None = None
        self.started = 0.0  # perf_counter when the sender was started

    def __enter__(self) -> VmmigPair:
        self.ready.unlink(missing_ok=True)
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        kill_all([self.send, self.recv])
        self.ready.unlink(missing_ok=True)

    def start_recv(self, *args: str, timeout: float = 30.0) -> str:
        """Start the receiver (``args`` end with DEST) and return the address it listens on."""
        argv = vmmig("recv", "--listen", "127.0.0.1:0", "--ready-file", str(self.ready), "--json", "--quiet", *args)
        self.recv = Child(argv, self.workdir, self.tags[0], self.sample)
        return wait_for_text(self.ready, self.recv, timeout, "vmmig recv")

    def start_send(
        self, *args: str, quiet: bool = True, stderr: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        """Start the sender (``args``: IMAGE ADDRESS [options]); the wall clock of the case starts here."""
        argv = vmmig("send", *args, "--json", *(["--quiet"] if quiet else []))
        self.started = time.perf_counter()
        self.send = Child(argv, self.workdir, self.tags[1], self.sample, stderr, env)

    @property
    def children(self) -> list[Child]:
        assert self.send is not None and self.recv is not None
        return [self.send, self.recv]

    def wait(self, timeout: float) -> float:
        """Wait for both sides (raising on a failure or timeout); the wall seconds from send start to both exited."""
        wait_all(self.children, self.started + timeout, self.what)
        check_exits(self.children, self.what)
        return self.wall_s

    @property
    def ended(self) -> float:
        """perf_counter when the last of both sides exited (both must have)."""
        ends = [c.ended for c in self.children]
        assert None not in ends
        return max(e for e in ends if e is not None)

    @property
    def wall_s(self) -> float:
        return self.ended - self.started

    @property
    def cpu_s(self) -> float:
        return sum(c.cpu_s or 0.0 for c in self.children)

    def reports(self, verify: bool = True) -> tuple[dict[str, Any], dict[str, Any]]:
        """(send report, recv report); with ``verify``, both completed with the same digest."""
        send, recv = self.children
        sent, received = send.report(self.what), recv.report(self.what)
        if verify:
            check_completed(self.what, sent, received)
        return sent, received


def check_completed(what: str, sent: dict[str, Any], received: dict[str, Any]) -> None:
    if sent.get("status") != "completed" or received.get("status") != "completed":
        raise BenchError(f"{what}: status send={sent.get('status')} recv={received.get('status')}")
    if not sent.get("digest") or sent.get("digest") != received.get("digest"):
        raise BenchError(f"{what}: digest mismatch: send {sent.get('digest')} recv {received.get('digest')}")


# ----------------------------------------------------------------------------------------------------------------
# Results: one run, and a case over its repeats


@dataclass
class Measured:
    """What every run of a transfer case measures: its wall time, the image moved and the bytes on the wire."""

    wall_s: float
    image_bytes: int
    wire_bytes: int

    @property
    def wall_mbps(self) -> float:
        return self.image_bytes / MB / self.wall_s


@dataclass
class Aggregate:
    """A case over its repeats: medians of its runs (``error`` says why it stopped, if it did)."""

    name: str
    image_bytes: int
    runs: list[Any] = field(default_factory=list)
    error: str | None = None

    def median(self, get: Callable[[Any], float | None]) -> float | None:
        return median_of(self.runs, get)

    @property
    def wall_mbps(self) -> float | None:
        return self.median(lambda r: r.wall_mbps)

    @property
    def wire_mb(self) -> float | None:
        return self.median(lambda r: r.wire_bytes / MB)


def exit_status(results: Sequence[Aggregate]) -> int:
    """1 (after naming them) if any case failed, else 0: the targets' verdicts never change the exit status."""
    if failed := [r.name for r in results if r.error is not None]:
        print(f"FAILED: {', '.join(failed)} (exit status 1)")
        return 1
    return 0


def median_property(attribute: str) -> property:
    """A read-only property: the median of the runs' ``attribute`` (for ``Aggregate`` subclasses)."""
    return property(lambda self: self.median(lambda run: getattr(run, attribute)))


def median_of(items: Iterable[Any], get: Callable[[Any], float | None]) -> float | None:
    """The median of ``get(item)`` over the items where it is known; None if it is known for none."""
    values = [v for item in items if (v := get(item)) is not None]
    return statistics.median(values) if values else None


# ----------------------------------------------------------------------------------------------------------------
# Files and output


def remove(*paths: Path) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


def make_image(generator: ModuleType, path: Path, size: int, allocate: bool = False) -> None:
    """The deterministic 'mixed' image (seed 1); with ``allocate`` its holes are allocated too (fully resident)."""
    started = time.perf_counter()
    counts = generator.generate(str(path), size, seed=1, profile="mixed")
    if allocate:
        fd = os.open(path, os.O_RDWR)
        try:
            os.posix_fallocate(fd, 0, size)
        finally:
            os.close(fd)
    log(f"generated {fmt_size(size)} mixed image {path} in {time.perf_counter() - started:.1f}s: {counts}")


def check_space(size: int, copies: float, what: str) -> None:
    """``copies`` times ``size`` bytes (``what`` says of which files) must fit in /dev/shm."""
    free = shutil.disk_usage(SHM).free
    need = size * copies
    if free < need:
        raise BenchError(
            f"/dev/shm has {free / GIB:.1f} GiB free, need about {need / GIB:.1f} GiB for {what} of {fmt_size(size)}"
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


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def fmt_size(size: int) -> str:
    for unit, factor in (("GiB", GIB), ("MiB", MIB), ("KiB", 1 << 10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def print_table(columns: Sequence[tuple[str, int]], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> None:
    """A header, a rule and the rows: the ``left`` columns left-aligned, the others right-aligned to their widths."""
    widths = [max(width, len(name)) for name, width in columns]
    lefts = {i % len(columns) for i in left}

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i in lefts else c.rjust(w) for i, (c, w) in pairs).rstrip()

    header = line([name for name, _ in columns])
    print(header)
    print("-" * len(header))
    for row in rows:
        print(line(row))


def command_output(argv: list[str], prefix: str = "") -> str:
    """The first line of a command's output (starting with ``prefix``), or 'unavailable'."""
    try:
        out = subprocess.run(argv, cwd=_tree, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    lines = [line.strip() for line in out.splitlines() if line.strip().startswith(prefix)]
    return lines[0] if lines else "unavailable"


def machine_info() -> dict[str, Any]:
    """The machine and software a benchmark ran on (for its header and its --json document)."""
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
        "usable-cpus": CPUS,
        "cpu-model": model,
        "memory-gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "load-average": Path("/proc/loadavg").read_text().split()[:3],
        "python": platform.python_version(),
        "vmmig": command_output(vmmig("--version")),
        "commit": command_output(["git", "rev-parse", "--short", "HEAD"]),  # read-only
        "tree": str(_tree),
    }


def write_json(path: str, document: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(document, fh, indent=1)
        fh.write("\n")
    log(f"wrote {path}")


def _terminate(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_main(benchmark: Callable[[Path], int], prefix: str, tree: Path | None = None) -> int:
    """Compile the package, run ``benchmark(workdir)`` in a fresh /dev/shm directory and remove it whatever happens:
    a BenchError is one line and exit 1, an interrupt (SIGINT or SIGTERM) exit 130."""
    signal.signal(signal.SIGTERM, _terminate)
    workdir: Path | None = None
    try:
        compile_package(use_tree(tree))
        workdir = Path(tempfile.mkdtemp(prefix=prefix, dir=SHM if SHM.is_dir() else None))
        return benchmark(workdir)
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for tools that cannot report the port they bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
