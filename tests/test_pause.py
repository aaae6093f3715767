"""Pausing the guest: SIGSTOP/SIGCONT with a check of every thread, QMP, shell hooks, and the throttle."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.errors import PauseError
from migrate_cli.pause import CommandPauser, PidPauser, QmpPauser, Throttle

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
    with pytest.raises(PauseError, match="no such process"):
        PidPauser(2**22 + 12345)


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
