"""Shared fixtures and helpers: generated guest images, real `vmmig` processes on 127.0.0.1 and simulated guests
(tests/guest.py), cleaned up by PID; a socket for a scripted receiver (tests/fakepeer.py); what the tests check on
a process's output and on DEST."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from migrate_cli.wire.frames import Hello

from .fakepeer import FakePeer
from .faultproxy import FaultProxy
from .guest import Guest

ROOT = Path(__file__).resolve().parent.parent


def load_script(path: Path) -> ModuleType:
    """A script of examples/ (not a package) imported as a module named after its file."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(path.stem, module)
    spec.loader.exec_module(module)
    return module


GENERATOR = load_script(ROOT / "examples" / "make_guest_image.py")


def make_image(path: Path, size: int, profile: str = "mixed", seed: int = 1, page_size: int = 4096) -> Path:
    GENERATOR.generate(str(path), size, seed=seed, profile=profile, page_size=page_size)
    return path


def vmmig_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "migrate_cli", *args]


def wait_until_landed(control: Path, pages: int = 1, timeout: float = 60) -> None:
    """Wait until the receiver behind ``control`` (its --control socket) has applied ``pages`` non-zero pages: a fault
    injected after that hits a session that holds pages, however slowly a loaded machine started the processes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = subprocess.run(vmmig_command("ctl", str(control), "status"), capture_output=True, text=True, timeout=20)
        if done.returncode == 0 and json.loads(done.stdout).get("normal", 0) >= pages:
            return
        time.sleep(0.05)
    raise AssertionError(f"the receiver applied fewer than {pages} pages within {timeout:g}s")


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    address: str = ""

    def wait(self, timeout: float = 60) -> tuple[int, str, str]:
        out, err = self.popen.communicate(timeout=timeout)
        return self.popen.returncode, out, err


def await_ready(proc: Proc, ready: Path, what: str) -> Proc:
    """Wait (20 s at most) for a `vmmig recv` to write its --ready-file; its address goes to ``proc.address``.
    A receiver that exits or takes too long fails the test with its stderr, ``what`` naming it."""
    deadline = time.monotonic() + 20
    while not ready.exists():
        if proc.popen.poll() is not None or time.monotonic() > deadline:
            if proc.popen.poll() is None:
                os.kill(proc.popen.pid, signal.SIGKILL)
            code, _out, err = proc.wait()
            raise AssertionError(f"{what} did not become ready (exit {code}): {err}")
        time.sleep(0.02)
    proc.address = ready.read_text().strip()
    ready.unlink()
    return proc


class Processes:
    """Starts vmmig processes and kills whatever is still running at the end of the test, by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[subprocess.Popen[str]] = []

    def start(self, *args: str) -> Proc:
        popen = subprocess.Popen(
            vmmig_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        self.started.append(popen)
        return Proc(popen)

    def recv(self, dest: Path, *args: str, listen: str = "127.0.0.1:0") -> Proc:
        ready = self.tmp / f"ready-{len(self.started)}"
        proc = self.start("recv", "--listen", listen, "--ready-file", str(ready), *args, str(dest))
        return await_ready(proc, ready, "recv")

    def send(self, source: Path, address: str, *args: str) -> Proc:
        return self.start("send", str(source), address, *args)

    def run(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        return self.start(*args).wait(timeout)

    def cleanup(self) -> None:
        for popen in self.started:
            if popen.poll() is None:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(5)


@pytest.fixture(autouse=True)
def private_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Resume state files of the vmmig processes a test starts go to a directory of the test's own (beside its
    tmp_path, which some tests list), never the user's home."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture(autouse=True)
def no_vmmig_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test sees only the options it gives: a VMMIG_* variable of the shell running the tests (options of
    send and recv come from such variables) is removed, for the vmmig processes the test starts too."""
    for name in [name for name in os.environ if name.startswith("VMMIG_")]:
        monkeypatch.delenv(name)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    processes = Processes(tmp_path)
    yield processes
    processes.cleanup()


@pytest.fixture
def qemus() -> Iterator[list[Any]]:
    """QEMU guests a test starts (examples/qemu/run_guest.py GuestProcess): killed at its end."""
    started: list[Any] = []
    yield started
    for guest in started:
        guest.kill()


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    """A directory of the test's own on /dev/shm (guest RAM files), removed at its end."""
    directory = Path("/dev/shm") / f"vmmig-test-{tmp_path.name}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def fake_receiver() -> Iterator[socket.socket]:
    """A listening socket on 127.0.0.1 for a scripted receiver (FakePeer.accept); its address: address_of()."""
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def address_of(listener: socket.socket) -> str:
    return f"127.0.0.1:{listener.getsockname()[1]}"


def sender_met_by(fake_receiver: socket.socket, procs: Processes, image: Path) -> tuple[Proc, FakePeer, Hello]:
    """`vmmig send` of ``image`` to a scripted receiver on ``fake_receiver``, which has read its HELLO."""
    send = procs.send(image, address_of(fake_receiver))
    peer = FakePeer.accept(fake_receiver)
    hello = peer.read_until(Hello)
    assert isinstance(hello, Hello)
    return send, peer, hello


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    """Simulated guests a test starts (tests/guest.py start_guest), killed by PID at its end."""
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


@pytest.fixture(scope="session")
def image_8m(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A mixed 8 MiB guest image (zero, text, code and random runs), shared read-only by the tests."""
    return make_image(tmp_path_factory.mktemp("images") / "mixed-8m.img", 8 << 20)


def assert_no_destination(dest: Path) -> None:
    assert not dest.exists(), f"{dest} must not exist after a failed migration"
    assert not Path(str(dest) + ".partial").exists(), f"{dest}.partial must be removed after a failure"


def assert_resumable(dest: Path) -> None:
    """A link fault: no DEST, but DEST.partial and its state file kept for `vmmig recv --resume`."""
    assert not dest.exists(), f"{dest} must not exist after a failed migration"
    assert resume_files_kept(dest), "kept for a resume"


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (killed, not yet reaped by whoever inherited it) counts as gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def dies(pid: int, timeout: float = 10) -> bool:
    """A SIGKILLed process takes a moment to die."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def read_stderr_until(proc: Proc, text: str, timeout: float = 30) -> str:
    """A running process's stderr up to the first line containing ``text`` (or its end, or ``timeout``): where a
    receiver logs a connection it refused before it goes on waiting."""
    lines: list[str] = []

    def read() -> None:
        assert proc.popen.stderr is not None
        for line in proc.popen.stderr:
            lines.append(line)
            if text in line:
                return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(timeout)
    return "".join(lines)


def last_line(err: str) -> str:
    """The last non-empty line of a process's stderr: where vmmig's one-line error is."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def json_report(out: str) -> dict[str, Any]:
    """A process's --json report, or {} when it printed none (a failed run)."""
    return json.loads(out) if out.strip() else {}


def resume_files_kept(dest: Path) -> bool:
    return Path(f"{dest}.partial").exists() and Path(f"{dest}.partial.state").exists()


@dataclass
class Outcome:
    """Both ends of a migration that went through a FaultProxy."""

    proxy: FaultProxy
    send_code: int
    send_out: str
    send_err: str
    recv_code: int
    recv_out: str
    recv_err: str


def migrate_through_fault(
    procs: Processes, source: Path, dest: Path, fault: str, at: int, recv_args: Sequence[str], send_args: Sequence[str]
) -> Outcome:
    """`vmmig recv` into ``dest``, `vmmig send` of ``source`` through a proxy injecting ``fault`` at byte ``at``."""
    recv = procs.recv(dest, *recv_args)
    proxy = FaultProxy(recv.address, fault, at=at)
    try:
        code, out, err = procs.send(source, proxy.address, *send_args).wait(90)
        recv_code, recv_out, recv_err = recv.wait(30)
    finally:
        proxy.close()
    return Outcome(proxy, code, out, err, recv_code, recv_out, recv_err)


def still_serves(procs: Processes, recv: Proc, tmp_path: Path, size: int = 1 << 20) -> str:
    """The receiver survived whatever reached it before: a real sender still migrates into it (then it exits 0).

    Returns the receiver's stderr, where each connection it turned away has its "refused a connection" line.
    """
    image = make_image(tmp_path / "after-the-stranger.img", size, seed=9)
    code, _, err = procs.send(image, recv.address).wait(60)
    recv_code, _, recv_err = recv.wait(60)
    assert (code, recv_code) == (0, 0), err + recv_err
    return recv_err
