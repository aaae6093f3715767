"""Specification of examples/guest_workload.py, the simulated guest that keeps rewriting a shared memory image.

The script runs as a real process, as it does next to ``vmmig send --live``. Its writes are observed from outside by
reading the image file page by page; to get a clean before/after picture the whole process is frozen with SIGSTOP
while the image is read, exactly as vmmig freezes a guest for the switchover.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from .conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "guest_workload.py"
PAGE = 4096
MiB = 1024 * 1024
READY_LINE = re.compile(r"^guest_workload: pid (\d+) writing (.+) at (.+) with (\d+) threads \((\w+)\)$")
SUMMARY_LINE = re.compile(r"wrote (\d+) pages \((\d+) overwrite, (\d+) zero, (\d+) restore\) in ([\d.]+) s")


@pytest.fixture(scope="module")
def gw() -> ModuleType:
    return load_script(SCRIPT)


class Guests:
    """Starts guest_workload processes and SIGKILLs, by PID, whatever is still running at the end of the test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen[str]] = []

    def start(self, image: Path, *args: str, wait: bool = True) -> subprocess.Popen[str]:
        pid_file = self.tmp / f"guest-{len(self.started)}.pid"
        popen = subprocess.Popen(
            [sys.executable, str(SCRIPT), str(image), "--pid-file", str(pid_file), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.started.append(popen)
        if wait:
            deadline = time.monotonic() + 15
            while not pid_file.exists():
                if popen.poll() is not None or time.monotonic() > deadline:
                    popen.kill()
                    _out, err = popen.communicate()
                    raise AssertionError(f"guest_workload did not start (exit {popen.returncode}): {err}")
                time.sleep(0.01)
        return popen

    def run(self, image: Path, *args: str, timeout: float = 10) -> tuple[int, str, str]:
        popen = self.start(image, *args, wait=False)
        out, err = popen.communicate(timeout=timeout)
        return popen.returncode, out, err

    def cleanup(self) -> None:
        for popen in self.started:
            if popen.poll() is None:
                os.kill(popen.pid, signal.SIGKILL)
            popen.communicate(timeout=5)


@pytest.fixture
def guests(tmp_path: Path) -> Iterator[Guests]:
    started = Guests(tmp_path)
    try:
        yield started
    finally:
        started.cleanup()


def freeze(pid: int) -> None:
    """SIGSTOP the process and wait until every one of its threads is stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while True:
        states = []
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                states.append((task / "stat").read_text().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(state in "tT" for state in states):
            return
        assert time.monotonic() < deadline, f"process {pid} did not stop: {states}"
        time.sleep(0.005)


def thaw(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def pages_of(path: Path) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, PAGE)


def changed(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """Indices of the pages that differ."""
    return np.flatnonzero((before != after).any(axis=1))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def distinct_pages(writes: float, pages: int) -> float:
    """Expected number of distinct pages hit by ``writes`` uniformly random page writes."""
    return pages * (1 - math.exp(-writes / pages))


def expect_exit(popen: subprocess.Popen[str], timeout: float = 10) -> tuple[str, str]:
    out, err = popen.communicate(timeout=timeout)
    assert popen.returncode == 0, err
    return out, err


# --------------------------------------------------------------------------------------------------------------------
# Start-up and shutdown


def test_prints_one_pid_line_and_writes_the_pid_file_then_exits_0_on_sigterm(guests: Guests, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    popen = guests.start(image, "--create", "4MiB", "--rate", "8M", "--threads", "3", "--pattern", "sweep")
    assert (tmp_path / "guest-0.pid").read_text().strip() == str(popen.pid)
    assert popen.stdout is not None
    match = READY_LINE.match(popen.stdout.readline().rstrip("\n"))
    assert match, "the first line must announce pid, image, rate, threads and pattern"
    assert match.groups() == (str(popen.pid), str(image), "8.0 MB/s", "3", "sweep")
    assert image.stat().st_size == 4 * MiB, "--create makes a zero-filled image of the given size"

    os.kill(popen.pid, signal.SIGTERM)
    out, err = expect_exit(popen)
    assert out == "", "nothing but the pid line goes to stdout"
    assert SUMMARY_LINE.search(err), "a summary of the pages written per kind goes to stderr"


def test_defaults_to_8_threads_and_exits_0_on_sigint(guests: Guests, tmp_path: Path) -> None:
    popen = guests.start(tmp_path / "vm.ram", "--create", "1MiB")
    assert popen.stdout is not None
    match = READY_LINE.match(popen.stdout.readline().rstrip("\n"))
    assert match and match.group(3, 4, 5) == ("50.0 MB/s", "8", "uniform")
    os.kill(popen.pid, signal.SIGINT)
    expect_exit(popen)


def test_duration_1_exits_0_by_itself_having_written_at_the_rate(guests: Guests, tmp_path: Path) -> None:
    start = time.monotonic()
    code, out, err = guests.run(tmp_path / "vm.ram", "--create", "8MiB", "--rate", "4M", "--duration", "1")
    took = time.monotonic() - start
    assert code == 0, err
    assert 1 <= took < 6
    assert READY_LINE.match(out.strip())
    match = SUMMARY_LINE.search(err)
    assert match, err
    pages, overwrite, zero, restore = (int(group) for group in match.groups()[:4])
    elapsed = float(match.group(5))
    assert pages == overwrite + zero + restore
    assert 0.7 <= pages * PAGE / (4e6 * elapsed) <= 1.2
    assert zero > 0 and restore > 0, "by default 10% of the writes zero a page and 10% restore old content"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "multiple of the page size"),
        (("--page-size", "8192"), "multiple of the page size"),
        (("--rate", "fast"), "invalid size"),
        (("--zero-fraction", "0.6", "--restore-fraction", "0.6"), "must not exceed 1"),
    ],
)
def test_bad_arguments_exit_2_with_a_one_line_message(
    guests: Guests, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    image = tmp_path / "odd.ram"
    image.write_bytes(b"\1" * (PAGE * 3 if args[:1] == ("--page-size",) else PAGE + 1))
    code, out, err = guests.run(image, *args)
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "guest-0.pid").exists()


def test_missing_image_without_create_exits_2(guests: Guests, tmp_path: Path) -> None:
    code, _out, err = guests.run(tmp_path / "missing.ram")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "missing.ram" in err


# --------------------------------------------------------------------------------------------------------------------
# What it writes


def test_the_image_keeps_changing(guests: Guests, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    guests.start(image, "--create", "16MiB")
    first = digest(image)
    time.sleep(0.5)
    assert digest(image) != first


def test_the_guest_writes_at_the_rate_it_is_given(guests: Guests, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    pages = 64 * MiB // PAGE
    popen = guests.start(image, "--create", "64MiB", "--rate", "8M", "--zero-fraction", "0", "--restore-fraction", "0")
    freeze(popen.pid)
    before = pages_of(image)
    thaw(popen.pid)
    time.sleep(2)
    freeze(popen.pid)
    after = pages_of(image)
    expected = distinct_pages(2 * 8e6 / PAGE, pages)  # about 3470 distinct of 3906 page writes
    assert 0.3 * expected <= len(changed(before, after)) <= 1.5 * expected
    assert (after[changed(before, after)] != 0).any(axis=1).all(), "new content is never all zero"


def test_zero_fraction_1_writes_only_zero_pages(guests: Guests, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    image.write_bytes(b"\xab" * (8 * MiB))
    before = pages_of(image)
    popen = guests.start(image, "--rate", "8M", "--zero-fraction", "1", "--restore-fraction", "0")
    time.sleep(0.5)
    os.kill(popen.pid, signal.SIGTERM)
    expect_exit(popen)
    after = pages_of(image)
    written = changed(before, after)
    assert len(written) > 100
    assert not after[written].any(), "every written page is all zero"


def test_restored_pages_hold_earlier_content(guests: Guests, tmp_path: Path) -> None:
    """With every write a restore or an overwrite, some written pages end up with content seen earlier."""
    image = tmp_path / "vm.ram"
    popen = guests.start(
        image, "--create", "256KiB", "--rate", "4M", "--zero-fraction", "0", "--restore-fraction", "0.5"
    )
    seen: set[bytes] = set()
    previous = pages_of(image)
    repeats = 0
    for _ in range(10):
        time.sleep(0.05)
        freeze(popen.pid)
        current = pages_of(image)
        thaw(popen.pid)
        for index in changed(previous, current):
            repeats += current[index].tobytes() in seen
        seen.update(page.tobytes() for page in current)
        previous = current
    assert repeats > 0, "a restore writes back content the page held before"


def test_hotset_concentrates_changes_on_a_small_set_of_pages(gw: ModuleType, guests: Guests, tmp_path: Path) -> None:
    pages = 64 * MiB // PAGE
    images = {pattern: tmp_path / f"{pattern}.ram" for pattern in ("uniform", "hotset")}
    common = ("--create", "64MiB", "--rate", "16M", "--zero-fraction", "0", "--restore-fraction", "0", "--seed", "7")
    pids = {pattern: guests.start(image, "--pattern", pattern, *common).pid for pattern, image in images.items()}
    before = {}
    for pattern, pid in pids.items():
        freeze(pid)
        before[pattern] = pages_of(images[pattern])
    for pid in pids.values():
        thaw(pid)
    time.sleep(1)
    for pid in pids.values():
        freeze(pid)
    counts = {pattern: changed(before[pattern], pages_of(images[pattern])) for pattern in images}

    hot = gw.hot_pages(pages, 0.05, 7)
    assert len(hot) == round(0.05 * pages)
    hot_changed = np.isin(counts["hotset"], hot)
    assert hot_changed.sum() >= 0.9 * len(hot), "nearly the whole hot set is rewritten within a second"
    assert (~hot_changed).sum() <= 0.15 * len(counts["uniform"]), "only about 5% of the writes miss the hot set"
    assert len(counts["hotset"]) < 0.5 * len(counts["uniform"])


# --------------------------------------------------------------------------------------------------------------------
# Stopped and continued


def test_sigstop_stops_writing_and_sigcont_resumes_without_catching_up(guests: Guests, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    popen = guests.start(image, "--create", "64MiB", "--rate", "8M", "--zero-fraction", "0", "--restore-fraction", "0")
    time.sleep(0.2)
    freeze(popen.pid)
    stopped = pages_of(image)
    time.sleep(1)
    assert np.array_equal(pages_of(image), stopped), "nothing is written while the process is stopped"

    resumed_at = time.monotonic()
    thaw(popen.pid)
    time.sleep(0.25)
    freeze(popen.pid)
    window = time.monotonic() - resumed_at
    resumed = len(changed(stopped, pages_of(image)))
    # The time it ran at 8 MB/s plus at most 0.1 s of saved credit: about 680 pages. Catching up on the 1 s it was
    # stopped would add about 1950 more.
    assert 100 < resumed < 1.3 * (window + 0.1) * 8e6 / PAGE + 50

    thaw(popen.pid)
    os.kill(popen.pid, signal.SIGTERM)
    expect_exit(popen)


# --------------------------------------------------------------------------------------------------------------------
# Importable pieces


def test_parse_size_takes_decimal_and_binary_units_and_refuses_garbage(gw: ModuleType) -> None:
    assert gw.parse_size("4096") == 4096
    assert gw.parse_size("50M") == 50_000_000
    assert gw.parse_size("8MB/s") == 8_000_000
    assert gw.parse_size("64MiB") == 64 * MiB
    assert gw.parse_size("1GiB") == 1 << 30
    assert gw.parse_size("1.5K") == 1500
    assert gw.parse_size("0") == 0
    for bad in ("", "fast", "1.5B", "-1M", "3 parsecs"):
        with pytest.raises(ValueError):
            gw.parse_size(bad)


def test_workload_in_process_sweeps_every_page_through_a_proc_fd_path(gw: ModuleType, tmp_path: Path) -> None:
    image = tmp_path / "vm.ram"
    image.write_bytes(b"\x01" * (64 * PAGE))
    before = pages_of(image)
    fd = os.open(image, os.O_RDWR)
    try:
        workload = gw.Workload(f"/proc/{os.getpid()}/fd/{fd}", threads=4, rate=0, pattern="sweep", seed=3)
        with workload:
            time.sleep(0.2)
            assert workload.running()
        stats = workload.stats()
    finally:
        os.close(fd)
    assert not workload.running()
    assert stats["pages"] == stats["overwrite"] + stats["zero"] + stats["restore"] > 64
    assert stats["bytes"] == stats["pages"] * PAGE and stats["errors"] == 0
    assert len(changed(before, pages_of(image))) == 64, "each thread sweeps its own quarter, wrapping around"


def test_workload_rejects_bad_parameters(gw: ModuleType, tmp_path: Path) -> None:
    for kwargs in ({"threads": 0}, {"pattern": "random"}, {"page_size": 1000}, {"hot_fraction": 0.0}):
        with pytest.raises(ValueError):
            gw.Workload(str(tmp_path / "vm.ram"), **kwargs)
