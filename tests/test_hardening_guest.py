"""Guest safety and the control socket, on real processes: vmmig never signals anything but one guest process, a
pause hook that hangs is killed with all it started and undone, and a control client can never put a traceback on
the migration's stderr."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.control import ControlError, ControlServer, request

from .conftest import ROOT, Proc, Processes, alive, dies, make_image, vmmig_command

NO_SUCH_PID = 2**22 + 12345  # above the kernel's largest pid_max: never a process
IDLE_SECONDS = 10  # the control server closes a silent client after this long (control.IDLE_TIMEOUT)


@pytest.fixture
def silent_listener() -> Iterator[socket.socket]:
    """A TCP listener that never answers: a sender that reached it made a connection, and can never get as far as
    pausing anything (that needs the receiver's WELCOME)."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=8)
    yield listener
    listener.close()


def connections(listener: socket.socket) -> int:
    """How many connections reached the listener (the kernel queues them even though nobody accepts)."""
    listener.setblocking(False)
    count = 0
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


def run_in_own_session(*args: str, timeout: float = 30) -> tuple[int | None, str]:
    """`vmmig ARGS` in a session of its own, so that a SIGSTOP of "its process group" can never reach pytest;
    killed by pid if it is still running after ``timeout`` (returns None as its code then)."""
    popen = subprocess.Popen(
        vmmig_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    try:
        _, err = popen.communicate(timeout=timeout)
        return popen.returncode, err
    except subprocess.TimeoutExpired:
        os.kill(popen.pid, signal.SIGKILL)
        _, err = popen.communicate()
        return None, err
    finally:
        if popen.poll() is None:
            os.kill(popen.pid, signal.SIGKILL)
            popen.wait()


# -- item 1: --pause-pid is one guest process, checked before anything is connected or signalled --------------------


@pytest.mark.parametrize(
    "pid",
    [
        pytest.param("0", id="own-process-group"),
        pytest.param("-1", id="minus_one-every-process"),
        pytest.param("-2", id="a-process-group"),
        pytest.param("1", id="init"),
        pytest.param("parent", id="a-parent-of-vmmig"),
        pytest.param(str(NO_SUCH_PID), id="no-such-process"),
    ],
)
def test_pause_pid_that_is_not_one_guest_process_is_a_usage_error_before_connecting(
    tmp_path: Path, silent_listener: socket.socket, pid: str
) -> None:
    """`--pause-pid 0` used to SIGSTOP the sender's own process group (hung for good), `-1` as root every process on
    the host; the parent's pid (here: pytest's) would stop whoever waits for vmmig. Each is refused in one line,
    exit 2, before any connection is made."""
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    address = f"127.0.0.1:{silent_listener.getsockname()[1]}"
    pause_pid = str(os.getpid()) if pid == "parent" else pid
    code, err = run_in_own_session("send", str(image), address, "--pause-pid", pause_pid, "--io-timeout", "3s")
    assert code == 2, f"exit {code}: {err}"
    assert err.count("\n") == 1 and err.startswith(f"vmmig send: --pause-pid {pause_pid}: "), err
    assert connections(silent_listener) == 0, "refused before connecting to the receiver"


def test_the_pause_pid_check_comes_before_the_auto_converge_throttle(
    tmp_path: Path, silent_listener: socket.socket
) -> None:
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    address = f"127.0.0.1:{silent_listener.getsockname()[1]}"
    code, err = run_in_own_session(
        "send", str(image), address, "--live", "--auto-converge", "--pause-pid", "0", "--io-timeout", "3s"
    )
    assert code == 2 and "--pause-pid 0: not a guest's process id" in err, err
    assert connections(silent_listener) == 0


# -- item 9: a pause hook past --hook-timeout is killed with its children, then undone ------------------------------


def test_a_pause_hook_that_times_out_is_killed_with_its_children_and_the_guest_is_unpaused(
    procs: Processes, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    pidfile, marker = tmp_path / "hook-child.pid", tmp_path / "unpaused"
    recv = procs.recv(tmp_path / "dest.img")
    try:
        code, _, err = procs.send(
            image, recv.address, "--pause-cmd", f"sleep 30 & echo $! > {pidfile}; exec sleep 30",
            "--unpause-cmd", f"touch {marker}", "--hook-timeout", "1s",
        ).wait()  # fmt: skip
        child = int(pidfile.read_text())
        assert code == 14, err
        assert "did not finish within 1s (--hook-timeout)" in err and "Traceback" not in err, err
        assert marker.exists(), "the state after a killed pause hook is unknown: --unpause-cmd must run"
        assert dies(child), "the hook's background child outlived the hook"
    finally:
        if pidfile.exists() and alive(child := int(pidfile.read_text())):
            os.kill(child, signal.SIGKILL)  # the old code leaves it behind
    recv.wait()


# -- item 11: a control client gets one-line replies and never a traceback on the migration's stderr ---------------


@pytest.fixture
def slow_send(procs: Processes, tmp_path: Path) -> Iterator[tuple[Path, Proc]]:
    """A migration capped so that it runs ~16 s, with --control; lifted at the end so that both ends finish."""
    image = make_image(tmp_path / "random.img", 8 << 20, profile="random")
    sock = tmp_path / "send.sock"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(image, recv.address, "--max-bandwidth", "512K", "--compress", "none", "--control", str(sock))
    deadline = time.monotonic() + 10
    while not sock.exists():
        assert time.monotonic() < deadline and send.popen.poll() is None, "the control socket never appeared"
        time.sleep(0.02)
    yield sock, send
    if send.popen.poll() is None:
        procs.run("ctl", str(sock), "set", "max-bandwidth", "0", timeout=20)
    recv.wait()


def test_a_huge_bandwidth_value_is_a_one_line_error_reply(procs: Processes, slow_send: tuple[Path, Proc]) -> None:
    sock, send = slow_send
    code, out, err = procs.run("ctl", str(sock), "set", "max-bandwidth", "1" * 400, timeout=20)
    assert code == 2 and out == "", err
    assert err.count("\n") == 1 and err.startswith("vmmig ctl: "), err
    assert "closed the connection" not in err, "an empty reply: the handler's exception killed the connection"
    assert procs.run("ctl", str(sock), "set", "max-bandwidth", "0", timeout=20)[0] == 0
    send_code, _, send_err = send.wait()
    assert send_code == 0, send_err
    assert not any(word in send_err for word in ("Traceback", "TimeoutError", "OverflowError")), send_err


def test_an_idle_control_client_is_closed_with_one_error_line_and_nothing_on_stderr(
    procs: Processes, slow_send: tuple[Path, Proc]
) -> None:
    sock, send = slow_send
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.connect(str(sock))
        client.settimeout(IDLE_SECONDS + 10)
        with client.makefile("rb") as fh:
            reply = json.loads(fh.readline())
            assert fh.readline() == b"", "the connection is closed after the error reply"
    assert reply["ok"] is False and "no request for 10s" in reply["error"]
    code, out, _ = procs.run("ctl", str(sock), "status", timeout=20)
    assert code == 0 and json.loads(out)["status"] == "active", "the server still answers others"
    procs.run("ctl", str(sock), "set", "max-bandwidth", "0", timeout=20)
    send_code, _, send_err = send.wait()
    assert send_code == 0, send_err
    assert not any(word in send_err for word in ("Traceback", "TimeoutError", "OverflowError")), send_err


def test_any_exception_of_a_handler_is_a_one_line_error_reply(tmp_path: Path) -> None:
    def broken(_request: dict[str, object]) -> object:
        raise RuntimeError("first line\nsecond line")

    path = str(tmp_path / "ctl.sock")
    server = ControlServer(path, {"broken": broken, "opaque": lambda _request: object()})
    try:
        with pytest.raises(ControlError, match=r"^broken failed: RuntimeError: first line second line$"):
            request(path, {"command": "broken"})
        with pytest.raises(ControlError, match=r"^cannot encode the reply: "):
            request(path, {"command": "opaque"})
    finally:
        server.close()
