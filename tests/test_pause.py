"""Pausing the guest: SIGSTOP/SIGCONT with a check of every thread, QMP, shell hooks, and the throttle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.errors import PauseError, UsageError
from migrate_cli.guest.pause import CommandPauser, GuestProcess, PidPauser, QmpPauser, Throttle, check_pause_pid

from .conftest import alive, dies
from .fakeqmp import FakeQmp

BUSY = (
    "import threading,time\nfor _ in range(3): threading.Thread(target=lambda: time.sleep(60), daemon=True).start()\n"
    "while True: pass"
)


@pytest.fixture
def busy() -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([sys.executable, "-c", BUSY])
    time.sleep(0.3)
    yield proc
    proc.kill()
    proc.wait()


def states(pid: int) -> list[str]:
    return [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]


def test_pid_pauser_stops_every_thread_and_resumes(busy: subprocess.Popen[bytes]) -> None:
    pauser = PidPauser(busy.pid)
    pauser.pause()
    assert len(states(busy.pid)) == 4 and all(s == "T" for s in states(busy.pid))
    pauser.resume()
    time.sleep(0.05)
    assert "T" not in states(busy.pid)


def test_pid_pauser_refuses_a_missing_process() -> None:
    with pytest.raises(UsageError, match="no such process"):
        PidPauser(2**22 + 12345)


@pytest.mark.parametrize("pid", [0, -1, -2, 1])
def test_process_groups_every_process_and_init_are_never_a_guest(pid: int) -> None:
    """kill(2) reads 0 as our group, -1 as every process, -N as group N: none of them is one guest."""
    with pytest.raises(UsageError, match=f"--pause-pid {pid}: not a guest's process id"):
        check_pause_pid(pid)
    with pytest.raises(UsageError):
        PidPauser(pid)
    with pytest.raises(PauseError):  # built mid-migration, after the pauser checked the pid: a pause failure
        Throttle(pid)


def test_vmmig_its_threads_and_its_parents_are_never_a_guest() -> None:
    own_thread = threading.Thread(target=time.sleep, args=(0.5,))
    own_thread.start()
    try:
        for pid in (os.getpid(), os.getppid(), own_thread.native_id):
            with pytest.raises(UsageError, match="vmmig itself or one of its parents"):
                check_pause_pid(pid)
    finally:
        own_thread.join()


def test_a_reused_pid_is_never_signalled(busy: subprocess.Popen[bytes]) -> None:
    """The guest is held by a pidfd: once it is gone, a signal fails instead of reaching whoever has its pid now."""
    guest = GuestProcess(busy.pid)
    busy.kill()
    busy.wait()
    with pytest.raises(ProcessLookupError):
        guest.send(signal.SIGCONT)


def test_qmp_pauser_speaks_stop_cont_and_checks_status(busy: subprocess.Popen[bytes], tmp_path: Path) -> None:
    qmp = FakeQmp(str(tmp_path / "qmp.sock"), busy.pid)
    try:
        pauser = QmpPauser(qmp.path)
        pauser.pause()
        assert all(s == "T" for s in states(busy.pid))
        pauser.resume()
        assert qmp.commands == ["qmp_capabilities", "stop", "query-status", "cont", "query-status"]
    finally:
        qmp.close()


def test_qmp_pauser_names_a_missing_socket(tmp_path: Path) -> None:
    with pytest.raises(PauseError, match="cannot connect"):
        QmpPauser(str(tmp_path / "nope.sock"))


def test_command_hooks_fail_with_their_exit_status_and_time_out(tmp_path: Path) -> None:
    with pytest.raises(PauseError, match="exited 3: nope"):
        CommandPauser("echo nope >&2; exit 3", "true", 5).pause()
    with pytest.raises(PauseError, match=r"did not finish within 0\.2s"):
        CommandPauser("sleep 5", "true", 0.2).pause()
    marker = tmp_path / "resumed"
    CommandPauser("true", f"touch {marker}", 5).resume()
    assert marker.exists()


def test_a_hook_past_its_timeout_is_killed_with_everything_it_started(tmp_path: Path) -> None:
    pidfile, marker = tmp_path / "child.pid", tmp_path / "unpaused"
    hook = f"sleep 30 & echo $! > {pidfile}; exec sleep 30"
    try:
        with pytest.raises(PauseError, match=r"did not finish within 1s \(--hook-timeout\): killed it; ran --unpause"):
            CommandPauser(hook, f"touch {marker}", 1).pause()
        assert marker.exists(), "a pause hook killed half way may have paused the guest: the unpause hook runs"
        assert dies(int(pidfile.read_text())), "the hook's background child was killed with it"
        pidfile.unlink()
        with pytest.raises(PauseError, match=r"--unpause-cmd .* did not finish"):
            CommandPauser("true", hook, 1).resume()
        assert dies(int(pidfile.read_text()))
    finally:
        if pidfile.exists() and alive(child := int(pidfile.read_text())):
            os.kill(child, signal.SIGKILL)


def test_when_the_unpause_after_a_killed_pause_hook_fails_too_both_are_said() -> None:
    with pytest.raises(PauseError, match=r"did not finish.*; then --unpause-cmd 'exit 4' exited 4: the guest may"):
        CommandPauser("sleep 30", "exit 4", 0.3).pause()


def test_throttle_steps_like_qemu_and_release_leaves_the_guest_running(busy: subprocess.Popen[bytes]) -> None:
    throttle = Throttle(busy.pid)
    assert throttle.step_up() == 20
    assert throttle.step_up() == 30
    for _ in range(20):
        throttle.step_up()
    assert throttle.percentage == 99
    time.sleep(0.3)
    throttle.release()
    time.sleep(0.05)
    assert "T" not in states(busy.pid)
