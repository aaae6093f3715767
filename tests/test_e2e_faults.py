"""Faults that are not the link's: a source that shrinks under the sender, a receiver slower than the sender, and
kill -9 at different moments of a transfer. Real processes on 127.0.0.1 throughout.

The link faults (cut, bit flip, stall) and their resumes are in test_e2e_resume.py; a full disk at allocation in
test_e2e_errors.py; the seeded mix of everything in test_soak.py.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest

from .conftest import Processes, assert_no_destination, last_line, make_image

MiB = 1 << 20


def anon_rss(pid: int) -> int:
    """Anonymous resident memory of a process (RssAnon), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def test_a_source_truncated_while_sending_fails_cleanly_and_publishes_nothing(procs: Processes, tmp_path: Path) -> None:
    """A shrinking file behind the mapping would kill the sender with SIGBUS: it is noticed first (exit 3), the
    receiver is told, and since this is not a link fault nothing is kept for a resume."""
    source = make_image(tmp_path / "vm.ram", 32 * MiB, profile="random")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    send = procs.send(source, recv.address, "--compress", "none", "--max-bandwidth", "8M")
    time.sleep(1.0)
    os.truncate(source, 8 * MiB)
    code, _, err = send.wait(30)
    recv_code, _, recv_err = recv.wait(30)
    assert code == 3 and "shrank from 33554432 to 8388608 bytes" in last_line(err), err
    assert recv_code == 8 and "peer: source" in last_line(recv_err)
    assert_no_destination(dest)
    assert not Path(f"{dest}.partial.state").exists()


def test_a_receiver_slower_than_the_sender_holds_both_ends_memory_bounded(procs: Processes, tmp_path: Path) -> None:
    """Backpressure: the receiver is stopped and continued (SIGSTOP/SIGCONT) through the transfer, so it reads far
    slower than the sender encodes; neither side may buffer the difference."""
    source = make_image(tmp_path / "vm.ram", 256 * MiB, profile="random")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--json")
    send = procs.send(source, recv.address, "--json", "--compress", "none")
    peak = {"send": 0, "recv": 0}
    stops = 0
    while send.popen.poll() is None:
        os.kill(recv.popen.pid, signal.SIGSTOP)
        stops += 1
        for name, proc in (("send", send), ("recv", recv)):
            try:
                peak[name] = max(peak[name], anon_rss(proc.popen.pid))
            except (FileNotFoundError, ProcessLookupError):
                pass
        time.sleep(0.3)
        os.kill(recv.popen.pid, signal.SIGCONT)
        time.sleep(0.1)
    code, out, err = send.wait(120)
    recv_code, _, recv_err = recv.wait(60)
    assert (code, recv_code) == (0, 0), err + recv_err
    assert stops >= 3, "the receiver must have been held back several times"
    assert json.loads(out)["status"] == "completed"
    # A 256 MiB image and a sender that could run ahead: bounded means well under the image size on both ends.
    assert 0 < peak["send"] < 100 * MiB and 0 < peak["recv"] < 100 * MiB, peak
    assert dest.read_bytes() == source.read_bytes()


@pytest.mark.parametrize("after", [0.3, 1.0, 2.0], ids=["early", "middle", "late"])
def test_kill_9_of_the_sender_at_any_moment_resumes_to_a_verified_image(
    procs: Processes, tmp_path: Path, after: float
) -> None:
    source = make_image(tmp_path / "vm.ram", 24 * MiB, profile="random", seed=int(after * 10))
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    recv = procs.recv(dest, "--resume-window", "30s")
    args = ("--compress", "zlib", "--state-file", str(state))
    first = procs.send(source, recv.address, "--max-bandwidth", "6M", *args)
    time.sleep(after)
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    resume = ("--resume",) if state.exists() else ()  # killed before the receiver's WELCOME: nothing to resume
    code, _, err = procs.send(source, recv.address, *resume, *args).wait(60)
    recv_code, _, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    assert dest.read_bytes() == source.read_bytes()
    assert not state.exists() and not Path(f"{dest}.partial").exists()


def test_processes_exit_on_their_own_after_a_resumed_migration(procs: Processes, tmp_path: Path) -> None:
    """No vmmig process outlives its migration (the fixture would kill leftovers by PID; none must be left)."""
    source = make_image(tmp_path / "vm.ram", 8 * MiB)
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--resume-window", "30s")
    first = procs.send(source, recv.address, "--max-bandwidth", "1M", "--state-file", str(tmp_path / "s"))
    time.sleep(0.8)
    os.kill(first.popen.pid, signal.SIGKILL)
    assert first.wait()[0] == -signal.SIGKILL, "the first sender must be killed mid-way (~2.4 MiB at 1 MB/s)"
    assert procs.send(source, recv.address, "--resume", "--state-file", str(tmp_path / "s")).wait(60)[0] == 0
    assert recv.wait(30)[0] == 0
    alive = [p.pid for p in procs.started if psutil.pid_exists(p.pid) and p.poll() is None]
    assert alive == []
