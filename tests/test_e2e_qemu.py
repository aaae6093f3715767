"""A real QEMU guest (TCG) moves host to host: vmmig carries the RAM live, QEMU only the device state.

Needs qemu-system-x86_64 and the guest from examples/qemu/build_guest.sh (.ci/run builds it); skipped otherwise.
The guest prints `HEARTBEAT n` every second and `DATA OK n` after re-checksumming 32 MiB of data held in RAM, and
rewrites another 4 MiB of RAM every second during the pre-copy.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from pathlib import Path
from types import ModuleType

import pytest

from migrate_cli.errors import PauseError
from migrate_cli.guest.vcpu_cgroup import CpuHierarchy, find_cpu_hierarchy

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


def boot_pair(qemus: list, tmp_path: Path, shm: Path, write_mb: int = 4) -> tuple:
    source = rg.start_guest(tmp_path / "src", shm / "src.ram", role="source", write_mb=write_mb)
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


def writable_cpu_hierarchy() -> CpuHierarchy:
    try:
        hierarchy = find_cpu_hierarchy()
    except PauseError as exc:
        pytest.skip(str(exc))
    if not os.access(hierarchy.mountpoint, os.W_OK):
        pytest.skip(f"{hierarchy.mountpoint} is not writable here (not root?)")
    return hierarchy


def cpu_cgroup(tid: int) -> str:
    """The cgroup a thread is in for the cpu controller (v1), or its v2 cgroup."""
    lines = Path(f"/proc/{tid}/cgroup").read_text().splitlines()
    v1 = [line.split(":", 2)[2] for line in lines if "cpu" in line.split(":", 2)[1].split(",")]
    return v1[0] if v1 else next(line.split(":", 2)[2] for line in lines if line.startswith("0::"))


class ThreadWatch:
    """Samples, while a migration runs, which cgroups QEMU's vCPU threads are in and whether any QEMU thread is
    stopped by a signal (state T)."""

    def __init__(self, qemu_pid: int, vcpus: list[int]) -> None:
        self.qemu_pid, self.vcpus = qemu_pid, vcpus
        self.cgroups: set[str] = set()
        self.signal_stopped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            try:
                self.cgroups.update(cpu_cgroup(tid) for tid in self.vcpus)
                tasks = Path(f"/proc/{self.qemu_pid}/task").iterdir()
                states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in tasks]
            except (FileNotFoundError, ProcessLookupError):
                continue  # a thread came or went between listing and reading
            self.signal_stopped += sum(state in ("T", "t") for state in states)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


@pytest.mark.slow
def test_auto_converge_throttles_only_the_vcpu_threads_and_a_guest_that_outran_the_cap_moves(
    procs: Processes, qemus: list, tmp_path: Path, shm: Path
) -> None:
    """Rewriting 80 MiB in bursts (TCG tops out near 60 MB/s), the guest outruns a 25 MB/s cap: without
    --auto-converge it does not converge; with it, only its vCPU threads are throttled (in a cgroup), QEMU itself
    never stops, it converges, and the guest runs on at the destination."""
    hierarchy = writable_cpu_hierarchy()
    source, dest = boot_pair(qemus, tmp_path, shm, write_mb=80)
    with source.qmp() as qmp:  # QEMU takes one QMP client at a time: ask before vmmig connects
        vcpus = [int(cpu["thread-id"]) for cpu in qmp.execute("query-cpus-fast")]
    homes = {tid: cpu_cgroup(tid) for tid in vcpus}
    limits = ("--live", "--qmp", str(source.qmp_path), "--max-bandwidth", "25M", "--max-passes", "30")

    recv = procs.recv(shm / "attempt.ram")
    send = procs.send(shm / "src.ram", recv.address, *limits, "--max-time", "20s")
    code, _, err = send.wait(180)
    recv.wait(60)
    assert code == 10 and "did not converge" in err, err
    with source.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "running"

    recv = procs.recv(shm / "dst.ram", "--in-place", "--qmp", str(dest.qmp_path), "--json")
    send = procs.send(shm / "src.ram", recv.address, *limits, "--qemu-handoff", "--auto-converge", "--json")
    watch = ThreadWatch(source.pid, vcpus)
    try:
        code, out, err = send.wait(240)
    finally:
        watch.stop()
    recv_code, _, recv_err = recv.wait(60)
    assert (code, recv_code) == (0, 0), err + recv_err
    report = json.loads(out)
    assert report["cpu-throttle-percentage"] >= 20, report
    assert any(group.endswith(f"/vmmig-{send.popen.pid}") for group in watch.cgroups), watch.cgroups
    assert watch.signal_stopped == 0, "no QEMU thread was ever stopped by a signal"
    assert {tid: cpu_cgroup(tid) for tid in vcpus} == homes, "the vCPU threads are back where they were"
    assert not list(hierarchy.mountpoint.rglob(f"vmmig-{send.popen.pid}")), "its cgroup is gone"
    last_on_source = max(rg.heartbeats(source.serial_log))
    rg.wait_for_line(dest.serial_log, rf"^HEARTBEAT {last_on_source + 1} ", timeout=60, proc=dest)
    assert rg.heartbeats(dest.serial_log)[0] == last_on_source + 1, "the guest continued, it did not reboot"
    rg.wait_for_line(dest.serial_log, r"^DATA OK ", timeout=30, proc=dest)
    assert all(kind == "OK" for kind, _ in rg.data_checks(dest.serial_log))
