"""A real QEMU guest (TCG) moves host to host: vmmig carries the RAM live, QEMU only the device state.

Needs qemu-system-x86_64 and the guest from examples/qemu/build_guest.sh (.ci/run builds it); skipped otherwise.
The guest prints `HEARTBEAT n` every second and `DATA OK n` after re-checksumming 32 MiB of data held in RAM, and
rewrites another 4 MiB of RAM every second during the pre-copy.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

from .conftest import ROOT, Processes


def load_run_guest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_guest", ROOT / "examples" / "qemu" / "run_guest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_guest"] = module
    spec.loader.exec_module(module)
    return module


rg = load_run_guest()


def guest_available() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (.ci/run installs qemu-system-x86)"
    try:
        rg.kernel_paths()
    except FileNotFoundError as exc:
        return str(exc)
    return None


pytestmark = pytest.mark.skipif(guest_available() is not None, reason=str(guest_available()))


@pytest.fixture
def qemus(tmp_path: Path) -> Iterator[list]:
    started: list = []
    yield started
    for guest in started:
        guest.kill()


@pytest.fixture
def shm(tmp_path: Path) -> Iterator[Path]:
    directory = Path("/dev/shm") / f"vmmig-test-{tmp_path.name}"
    directory.mkdir()
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def boot_pair(qemus: list, tmp_path: Path, shm: Path) -> tuple:
    source = rg.start_guest(tmp_path / "src", shm / "src.ram", role="source", write_mb=4)
    qemus.append(source)
    dest = rg.start_guest(tmp_path / "dst", shm / "dst.ram", role="dest")
    qemus.append(dest)
    rg.wait_for_line(source.serial_log, r"^HEARTBEAT 3 ", timeout=120, proc=source)
    deadline = time.monotonic() + 30
    while not dest.qmp_path.exists() or not (shm / "dst.ram").exists():
        assert time.monotonic() < deadline, "destination QEMU did not come up"
        time.sleep(0.05)
    return source, dest


def test_a_running_guest_moves_and_keeps_running(procs: Processes, qemus: list, tmp_path: Path, shm: Path) -> None:
    source, dest = boot_pair(qemus, tmp_path, shm)
    recv = procs.recv(shm / "dst.ram", "--in-place", "--qmp", str(dest.qmp_path), "--json")
    send = procs.send(
        shm / "src.ram", recv.address, "--live", "--qmp", str(source.qmp_path), "--qemu-handoff",
        "--max-bandwidth", "200M", "--json",
    )  # fmt: skip
    code, out, err = send.wait(180)
    recv_code, _, recv_err = recv.wait(60)
    assert (code, recv_code) == (0, 0), err + recv_err
    report = json.loads(out)
    assert report["mode"] == "live" and report["qemu-handoff"]["qemu-migrate"] > 0
    last_on_source = max(rg.heartbeats(source.serial_log))
    rg.wait_for_line(dest.serial_log, rf"^HEARTBEAT {last_on_source + 1} ", timeout=60, proc=dest)
    time.sleep(21)  # the data checksum, every ~3 s, must stay OK for at least 20 s on the destination
    checks = rg.data_checks(dest.serial_log)
    assert len(checks) >= 5 and all(kind == "OK" for kind, _ in checks), checks
    assert rg.heartbeats(dest.serial_log)[0] == last_on_source + 1, "the guest continued, it did not reboot"
    with source.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "postmigrate"


def test_a_destination_that_dies_leaves_the_source_running(
    procs: Processes, qemus: list, tmp_path: Path, shm: Path
) -> None:
    source, dest = boot_pair(qemus, tmp_path, shm)
    recv = procs.recv(shm / "dst.ram", "--in-place", "--qmp", str(dest.qmp_path))
    send = procs.send(
        shm / "src.ram", recv.address, "--live", "--qmp", str(source.qmp_path), "--qemu-handoff",
        "--max-bandwidth", "50M",
    )  # fmt: skip
    time.sleep(1.0)
    dest.kill()  # during the pre-copy: the handoff after the pause cannot succeed
    code, _, err = send.wait(180)
    recv.wait(60)
    assert code == 12 and "guest resumed on the source" in err, err
    before = max(rg.heartbeats(source.serial_log))
    rg.wait_for_line(source.serial_log, rf"^HEARTBEAT {before + 2} ", timeout=30, proc=source)
    with source.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "running"
