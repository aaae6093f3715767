"""Auto-converge for QEMU: the vCPU threads alone go into a cgroup `vmmig-PID` with a CPU quota, and back.

Against the real cpu cgroup hierarchy (skipped where there is none we may write to), with a test process whose
threads stand for vCPU threads. Groups are named after a stand-in vmmig (a sleeping script called `vmmig`), so
that another test run's stale-group cleanup leaves them alone, as it would a running vmmig's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.errors import ExitCode, PauseError
from migrate_cli.guest.pause import QmpPauser
from migrate_cli.guest.vcpu_cgroup import (
    NO_HIERARCHY,
    CpuHierarchy,
    VcpuCgroupThrottle,
    find_cpu_hierarchy,
    remove_stale_groups,
    thread_cgroup,
)

from .conftest import ROOT, Processes, make_image
from .fakeqmp import FakeQmp
from .guest import Guest, start_guest

# Two threads that each want about half a CPU (bursts of 10 ms), and a main thread that sleeps.
THREADS = (
    "import threading, time\n"
    "def work():\n"
    "    while True:\n"
    "        start = time.perf_counter()\n"
    "        while time.perf_counter() - start < 0.01: pass\n"
    "        time.sleep(0.01)\n"
    "for _ in range(2): threading.Thread(target=work, daemon=True).start()\n"
    "time.sleep(600)\n"
)
# A process that throttles the given threads and then is killed, or exits without releasing the throttle.
THROTTLER = (
    "import sys, time\n"
    "from migrate_cli.guest.vcpu_cgroup import VcpuCgroupThrottle\n"
    "throttle = VcpuCgroupThrottle([int(tid) for tid in sys.argv[1:]])\n"
    "throttle.step_up()\n"
    "print('throttled', flush=True)\n"
    "if sys.stdin.readline() == 'exit\\n':\n"
    "    sys.exit(0)\n"
    "time.sleep(600)\n"
)


def usable_hierarchy() -> CpuHierarchy | str:
    try:
        hierarchy = find_cpu_hierarchy()
    except PauseError as exc:
        return str(exc)
    if not os.access(hierarchy.mountpoint, os.W_OK):
        return f"{hierarchy.mountpoint} is not writable here (not root?)"
    return hierarchy


HIERARCHY = usable_hierarchy()
needs_cgroups = pytest.mark.skipif(isinstance(HIERARCHY, str), reason=f"no usable cpu cgroup: {HIERARCHY}")


@pytest.fixture
def hierarchy() -> CpuHierarchy:
    assert isinstance(HIERARCHY, CpuHierarchy)
    return HIERARCHY


@pytest.fixture
def vcpus() -> Iterator[list[int]]:
    """The ids of two busy threads of a test process (not its main thread)."""
    proc = subprocess.Popen([sys.executable, "-c", THREADS])
    try:
        tasks = Path(f"/proc/{proc.pid}/task")
        deadline = time.monotonic() + 10
        while len(list(tasks.iterdir())) < 3:
            assert time.monotonic() < deadline, "the test threads did not start"
            time.sleep(0.02)
        yield sorted(int(t.name) for t in tasks.iterdir() if int(t.name) != proc.pid)
    finally:
        proc.kill()
        proc.wait()


def start_fake_vmmig(tmp_path: Path, name: str = "vmmig") -> subprocess.Popen[bytes]:
    script = tmp_path / name
    script.write_text("import time\ntime.sleep(600)\n")
    return subprocess.Popen([sys.executable, str(script)])


@pytest.fixture
def owner(tmp_path: Path, hierarchy: CpuHierarchy) -> Iterator[int]:
    """A running process that looks like vmmig; groups named after it are removed at the end."""
    proc = start_fake_vmmig(tmp_path)
    yield proc.pid
    proc.kill()
    proc.wait()
    remove_stale_groups(hierarchy, also=proc.pid)


def process_of(tid: int) -> int:
    return int(Path(f"/proc/{tid}/status").read_text().split("Tgid:")[1].split()[0])


def cgroup_of(tid: int, hierarchy: CpuHierarchy) -> str:
    return thread_cgroup(tid, hierarchy.version)


def group_of(owner: int, home: str, hierarchy: CpuHierarchy) -> Path:
    """Where a throttle named after ``owner`` puts its group: under the cgroup ``home`` its threads are in."""
    return hierarchy.directory(home) / f"vmmig-{owner}"


def quota(group: Path, hierarchy: CpuHierarchy) -> int:
    if hierarchy.version == 1:
        return int((group / "cpu.cfs_quota_us").read_text())
    limit = (group / "cpu.max").read_text().split()[0]
    return -1 if limit == "max" else int(limit)


def throttled_periods(group: Path) -> int:
    for line in (group / "cpu.stat").read_text().splitlines():
        name, value = line.split()
        if name == "nr_throttled":
            return int(value)
    raise AssertionError(f"no nr_throttled in {group}/cpu.stat")


@needs_cgroups
def test_the_vcpu_threads_alone_move_into_the_group_and_its_quota_follows_the_percentage(
    hierarchy: CpuHierarchy, vcpus: list[int], owner: int
) -> None:
    homes = {tid: cgroup_of(tid, hierarchy) for tid in vcpus}
    group = group_of(owner, homes[vcpus[0]], hierarchy)
    throttle = VcpuCgroupThrottle(vcpus, hierarchy, owner=owner)
    try:
        assert group.is_dir() and throttle.group == group
        assert all(cgroup_of(tid, hierarchy) == homes[tid] for tid in vcpus), "threads move in at the first step"
        assert throttle.step_up() == 20
        assert all(cgroup_of(tid, hierarchy).endswith(f"/vmmig-{owner}") for tid in vcpus)
        assert not cgroup_of(process_of(vcpus[0]), hierarchy).endswith(f"/vmmig-{owner}"), "only the vCPU threads move"
        assert quota(group, hierarchy) == 100_000 * 2 * 80 // 100  # each thread: 80% of a CPU
        assert throttle.step_up() == 30 and quota(group, hierarchy) == 100_000 * 2 * 70 // 100
        for _ in range(10):
            throttle.step_up()
        assert throttle.percentage == 99 and quota(group, hierarchy) == 100_000 * 2 * 1 // 100
        deadline = time.monotonic() + 20
        while throttled_periods(group) == 0:  # the threads want half a CPU each, they get 1%
            assert time.monotonic() < deadline, "the quota never held the threads back"
            time.sleep(0.1)
    finally:
        throttle.release()
    assert throttle.percentage == 0 and throttle.group is None
    assert not group.exists()
    assert {tid: cgroup_of(tid, hierarchy) for tid in vcpus} == homes
    throttle.release()  # idempotent


@needs_cgroups
def test_stale_groups_of_dead_processes_are_removed_at_start_and_a_running_vmmigs_are_left(
    hierarchy: CpuHierarchy, vcpus: list[int], owner: int, tmp_path: Path
) -> None:
    home = cgroup_of(vcpus[0], hierarchy)
    parent = hierarchy.directory(home)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = parent / f"vmmig-{dead.pid}"
    other = start_fake_vmmig(tmp_path)
    live = parent / f"vmmig-{other.pid}"
    try:
        stale.mkdir()
        live.mkdir()
        (stale / hierarchy.members).write_text(str(vcpus[0]))  # a throttled thread left behind by a killed vmmig
        assert cgroup_of(vcpus[0], hierarchy).endswith(f"/vmmig-{dead.pid}")
        throttle = VcpuCgroupThrottle(vcpus, hierarchy, owner=owner)
        throttle.release()
        assert not stale.exists(), "a dead vmmig's group is removed"
        assert cgroup_of(vcpus[0], hierarchy) == home, "its thread went back to the parent"
        assert live.is_dir(), "a running vmmig's group is left alone"
    finally:
        other.kill()
        other.wait()
        remove_stale_groups(hierarchy, also=other.pid)
        remove_stale_groups(hierarchy, also=dead.pid)
    assert not live.exists()


def start_throttler(vcpus: list[int]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", THROTTLER, *map(str, vcpus)], cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line != "throttled\n":
        proc.kill()
        raise AssertionError(f"the throttling process failed: {line}{proc.communicate()[1]}")
    return proc


@needs_cgroups
def test_a_killed_vmmig_leaves_the_threads_throttled_until_the_next_start_removes_its_group(
    hierarchy: CpuHierarchy, vcpus: list[int], owner: int
) -> None:
    homes = {tid: cgroup_of(tid, hierarchy) for tid in vcpus}
    killed = start_throttler(vcpus)
    group = group_of(killed.pid, homes[vcpus[0]], hierarchy)
    try:
        assert all(cgroup_of(tid, hierarchy).endswith(f"/vmmig-{killed.pid}") for tid in vcpus)
    finally:
        os.kill(killed.pid, signal.SIGKILL)
        killed.communicate()
    assert group.is_dir() and quota(group, hierarchy) > 0, "SIGKILL cannot be caught: the group stays"
    VcpuCgroupThrottle(vcpus, hierarchy, owner=owner).release()
    assert not group.exists()
    assert {tid: cgroup_of(tid, hierarchy) for tid in vcpus} == homes


@needs_cgroups
def test_a_vmmig_that_exits_without_releasing_gives_the_threads_back(hierarchy: CpuHierarchy, vcpus: list[int]) -> None:
    homes = {tid: cgroup_of(tid, hierarchy) for tid in vcpus}
    proc = start_throttler(vcpus)
    group = group_of(proc.pid, homes[vcpus[0]], hierarchy)
    try:
        assert group.is_dir()
        _, err = proc.communicate("exit\n", timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        remove_stale_groups(hierarchy, also=proc.pid)
    assert {tid: cgroup_of(tid, hierarchy) for tid in vcpus} == homes, "the atexit hook moved them back"
    assert not group.exists()


@needs_cgroups
def test_qemu_names_its_vcpu_threads_over_qmp(
    hierarchy: CpuHierarchy, vcpus: list[int], owner: int, tmp_path: Path
) -> None:
    qmp = FakeQmp(str(tmp_path / "qmp.sock"), process_of(vcpus[0]))
    try:
        pauser = QmpPauser(qmp.path)
        throttle = VcpuCgroupThrottle.for_qemu(pauser.qmp, hierarchy)
        throttle.release()
    finally:
        qmp.close()
    assert throttle.tids == vcpus
    assert qmp.commands == ["qmp_capabilities", "query-cpus-fast"]


def test_a_directory_that_is_no_cgroup_is_a_pause_error_and_left_clean(tmp_path: Path) -> None:
    fake = CpuHierarchy(1, tmp_path)
    with pytest.raises(PauseError, match=rf"{tmp_path} is not a cgroup v1 cpu hierarchy") as raised:
        VcpuCgroupThrottle([os.getpid()], fake, owner=os.getpid())
    assert raised.value.exit_code == ExitCode.PAUSE
    assert list(tmp_path.iterdir()) == []


def test_a_cgroup_root_that_cannot_be_written_is_a_pause_error(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(PauseError, match=r"--auto-converge: cannot create cgroup .*/file/vmmig-\d+: not a directory"):
        VcpuCgroupThrottle([os.getpid()], CpuHierarchy(1, tmp_path / "file"))


@needs_cgroups
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root, to drop to nobody")
def test_without_the_rights_to_make_a_cgroup_the_error_says_so(vcpus: list[int], hierarchy: CpuHierarchy) -> None:
    code = (
        "import os, sys\n"
        "from migrate_cli.guest.vcpu_cgroup import VcpuCgroupThrottle\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        "    VcpuCgroupThrottle([int(sys.argv[1])])\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__, int(exc.exit_code), exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(vcpus[0])], cwd=ROOT, capture_output=True, text=True, timeout=60
    ).stdout
    assert out.startswith("PauseError 14 --auto-converge: cannot "), out
    assert "cgroup" in out and out.rstrip().endswith("permission denied"), out


def cgroup2_without_cpu() -> CpuHierarchy | str:
    """A writable cgroup v2 mount whose controllers do not include cpu (cpu bound to v1, as on this project's
    machines), or why there is none."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        if tail.split()[:1] == ["cgroup2"]:
            root, mount = fields.split()[3], Path(fields.split()[4])
            try:
                controllers = (mount / "cgroup.controllers").read_text().split()
            except OSError:
                continue
            if "cpu" not in controllers and os.access(mount, os.W_OK) and (mount / "cgroup.subtree_control").exists():
                return CpuHierarchy(2, mount, root)
    return "no writable cgroup v2 mount without the cpu controller"


V2_WITHOUT_CPU = cgroup2_without_cpu()


@pytest.mark.skipif(isinstance(V2_WITHOUT_CPU, str), reason=str(V2_WITHOUT_CPU))
def test_a_cgroup_v2_hierarchy_without_cpu_is_a_pause_error_naming_it_and_is_left_as_found(vcpus: list[int]) -> None:
    """The v2 steps run against the kernel (the group made, made threaded) until cpu is enabled for it, which a v2
    hierarchy without the cpu controller refuses with ENOENT on a file that exists: exit 14 naming the controller,
    not "no such file"; the group removed, the threads and the parent's controllers as they were."""
    assert isinstance(V2_WITHOUT_CPU, CpuHierarchy)
    hierarchy = V2_WITHOUT_CPU
    homes = {tid: thread_cgroup(tid, 2) for tid in vcpus}
    parent = hierarchy.directory(os.path.commonpath(list(homes.values())))
    subtree = (parent / "cgroup.subtree_control").read_text()
    if subtree.split():  # a parent with domain controllers on refuses a threaded child before cpu is asked for
        pytest.skip(f"{parent} has controllers enabled for its children ({subtree.strip()})")
    with pytest.raises(PauseError) as raised:
        VcpuCgroupThrottle(vcpus, hierarchy, owner=os.getpid())
    assert raised.value.exit_code == ExitCode.PAUSE
    assert str(raised.value) == (
        f"--auto-converge: cannot enable cpu in cgroup {parent} (cgroup.subtree_control): no such controller in "
        "this cgroup v2 hierarchy (is cpu bound to a v1 hierarchy?)"
    )
    assert not (parent / f"vmmig-{os.getpid()}").exists()
    assert {tid: thread_cgroup(tid, 2) for tid in vcpus} == homes
    assert (parent / "cgroup.subtree_control").read_text() == subtree


def test_the_cpu_hierarchy_is_found_in_mountinfo(tmp_path: Path) -> None:
    unified = tmp_path / "unified"
    unified.mkdir()
    (unified / "cgroup.controllers").write_text("memory pids\n")
    v2_line = f"41 31 0:38 / {unified} rw,relatime - cgroup2 cgroup2 rw\n"
    v1_line = "32 31 0:29 /machine /sys/fs/cgroup/cpu\\040x rw,relatime - cgroup cgroup rw,cpu,cpuacct\n"
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(v2_line + v1_line)
    assert find_cpu_hierarchy(mountinfo) == CpuHierarchy(1, Path("/sys/fs/cgroup/cpu x"), "/machine")
    mountinfo.write_text(v2_line)
    with pytest.raises(PauseError, match=re.escape(NO_HIERARCHY)):
        find_cpu_hierarchy(mountinfo)
    (unified / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    assert find_cpu_hierarchy(mountinfo) == CpuHierarchy(2, unified, "/")


def test_a_cgroup_outside_the_mount_is_refused() -> None:
    hierarchy = CpuHierarchy(1, Path("/sys/fs/cgroup/cpu"), "/machine")
    assert hierarchy.directory("/machine/vm1") == Path("/sys/fs/cgroup/cpu/vm1")
    assert hierarchy.directory("/machine") == Path("/sys/fs/cgroup/cpu")
    with pytest.raises(PauseError, match="outside the mount"):
        hierarchy.directory("/other")


@needs_cgroups
def test_a_qmp_guest_that_outruns_the_link_converges_with_only_its_vcpu_threads_throttled(
    procs: Processes, guests: list[Guest], tmp_path: Path, hierarchy: CpuHierarchy
) -> None:
    """The QMP monitor stands in for QEMU: it names the workload's writer threads as vCPU threads."""
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random")
    guest = start_guest(guests, image, tmp_path, "--threads", "2", "--rate", "12M", "--pattern", "hotset",
                        "--hot-fraction", "0.5")  # fmt: skip
    qmp = FakeQmp(str(tmp_path / "qmp.sock"), guest.pid)
    dest = tmp_path / "dest.ram"
    try:
        recv = procs.recv(dest)
        send = procs.send(
            image, recv.address, "--json", "--live", "--qmp", qmp.path, "--compress", "none",
            "--max-bandwidth", "8M", "--auto-converge", "--max-passes", "30",
        )  # fmt: skip
        code, out, err = send.wait(120)
        recv_code, _, recv_err = recv.wait(30)
    finally:
        qmp.close()
    assert (code, recv_code) == (0, 0), err + recv_err
    assert json.loads(out)["cpu-throttle-percentage"] >= 20
    assert qmp.commands[:3] == ["qmp_capabilities", "query-cpus-fast", "stop"], "threads asked for, never SIGSTOP"
    assert dest.read_bytes() == image.read_bytes()
    assert not list(hierarchy.mountpoint.rglob(f"vmmig-{send.popen.pid}")), "the group is gone"
    assert not any(cgroup_of(int(t.name), hierarchy).endswith(f"/vmmig-{send.popen.pid}")
                   for t in Path(f"/proc/{guest.pid}/task").iterdir())  # fmt: skip


@needs_cgroups
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_vmmig_stopped_by_a_signal_while_throttling_gives_the_threads_back(
    procs: Processes, guests: list[Guest], tmp_path: Path, hierarchy: CpuHierarchy, signum: int
) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random")
    guest = start_guest(guests, image, tmp_path, "--threads", "2", "--rate", "12M")
    homes = {int(t.name): cgroup_of(int(t.name), hierarchy) for t in Path(f"/proc/{guest.pid}/task").iterdir()}
    qmp = FakeQmp(str(tmp_path / "qmp.sock"), guest.pid)
    try:
        recv = procs.recv(tmp_path / "dest.ram")
        send = procs.send(
            image, recv.address, "--live", "--qmp", qmp.path, "--compress", "none", "--max-bandwidth", "4M",
            "--auto-converge", "--on-no-converge", "abort",
        )  # fmt: skip
        group = group_of(send.popen.pid, homes[guest.pid], hierarchy)
        deadline = time.monotonic() + 60
        while not (group.is_dir() and (group / hierarchy.members).read_text().strip()):
            assert send.popen.poll() is None and time.monotonic() < deadline, "the throttle never started"
            time.sleep(0.05)
        os.kill(send.popen.pid, signum)
        code, _, err = send.wait(60)
        recv.wait(30)
    finally:
        qmp.close()
    assert code == 128 + signum, err
    assert not group.exists()
    assert {tid: cgroup_of(tid, hierarchy) for tid in homes} == homes
