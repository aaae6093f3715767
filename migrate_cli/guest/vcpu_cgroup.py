"""Auto-converge for QEMU (--qmp): a CPU quota on a cgroup that holds only the guest's vCPU threads.

A SIGSTOP would stop all of QEMU: its monitor (our QMP connection), its I/O and migration threads. QEMU's own
cpu-throttle sleeps only the vCPUs; this does the same from outside, on the thread ids QMP ``query-cpus-fast``
names. The cgroup ``vmmig-PID`` (PID: this vmmig) is made under the cgroup the vCPU threads share, so that limits
set above them (libvirt's, a container's) still apply, in whichever hierarchy has a ``cpu`` controller that takes
single threads:
- cgroup v1: the ``cpu`` hierarchy; a thread id written to ``tasks`` moves that thread alone;
- cgroup v2 with ``cpu``: the group is made ``threaded`` (cgroup.type), ``cpu`` enabled in its parent's
  cgroup.subtree_control, and thread ids go to ``cgroup.threads``.
Throttling P% sets a quota of ``period * vCPU threads * (100 - P) / 100`` per 100 ms period: each vCPU gets
(100 - P)% of a CPU, as with QEMU's cpu-throttle-percentage.

The threads go back to the cgroups they came from on every exit path: ``release()`` (the switchover, and the
sender's failure path, which a signal also takes), and an atexit hook. SIGKILL cannot be caught: a killed vmmig
leaves its group behind, so every throttle first removes the ``vmmig-N`` groups whose N is not a running vmmig
(their threads go to the group's parent, where they were). Without the rights for any of this: PauseError (exit
14) naming the cause; never a fallback to SIGSTOP.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import PauseError, QemuError
from .qmp import Qmp

PERIOD_US = 100_000  # 100 ms, as the SIGSTOP throttle's period
GROUP = re.compile(r"vmmig-(\d+)")
NO_HIERARCHY = "--auto-converge: no cgroup cpu controller that takes single threads (v1 cpu, or v2 threaded cpu)"


@dataclass(frozen=True)
class CpuHierarchy:
    """A mounted cgroup hierarchy with the cpu controller."""

    version: int  # 1 or 2
    mountpoint: Path
    root: str = "/"  # the cgroup shown at the mountpoint (not / for a bind mount or inside a cgroup namespace)

    @property
    def members(self) -> str:
        """The file a single thread id is written to, to move that thread."""
        return "tasks" if self.version == 1 else "cgroup.threads"

    def directory(self, cgroup: str) -> Path:
        relative = os.path.relpath(cgroup, self.root)
        if relative == ".." or relative.startswith("../"):
            raise PauseError(f"--auto-converge: cgroup {cgroup} is outside the mount at {self.mountpoint}")
        return self.mountpoint if relative == "." else self.mountpoint / relative


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)  # mountinfo octal-escapes spaces


def find_cpu_hierarchy(mountinfo: Path = Path("/proc/self/mountinfo")) -> CpuHierarchy:
    """The v1 cpu hierarchy, or else a v2 one whose root offers cpu (a controller lives in one hierarchy only)."""
    unified: list[CpuHierarchy] = []
    for line in mountinfo.read_text().splitlines():
        fields, _, tail = line.partition(" - ")
        before, after = fields.split(), tail.split()
        if len(before) < 5 or len(after) < 3:
            continue
        root, mountpoint = _unescape(before[3]), Path(_unescape(before[4]))
        if after[0] == "cgroup" and "cpu" in after[2].split(","):
            return CpuHierarchy(1, mountpoint, root)
        if after[0] == "cgroup2":
            with contextlib.suppress(OSError):
                if "cpu" in (mountpoint / "cgroup.controllers").read_text().split():
                    unified.append(CpuHierarchy(2, mountpoint, root))
    if unified:
        return unified[0]
    raise PauseError(NO_HIERARCHY)


def thread_cgroup(tid: int, version: int) -> str:
    """The cgroup (path from its hierarchy's root) that thread ``tid`` is in, for the cpu controller."""
    try:
        lines = Path(f"/proc/{tid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        raise PauseError(f"--auto-converge: vCPU thread {tid} is gone (did QEMU exit?)") from None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if (version == 1 and "cpu" in controllers.split(",")) or (version == 2 and controllers == ""):
            return path
    raise PauseError(f"--auto-converge: /proc/{tid}/cgroup names no cgroup v{version} cpu hierarchy")


def is_running_vmmig(pid: int) -> bool:
    """Whether ``pid`` is a vmmig: ``vmmig ...``, ``python .../vmmig ...`` or ``python -m migrate_cli ...``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(os.path.basename(arg) == b"vmmig" or arg == b"migrate_cli" for arg in argv[:3])


def _reason(exc: OSError) -> str:
    return (exc.strerror or str(exc)).lower()


def _write(path: Path, text: str) -> None:
    """One write(2) to a cgroup file, never creating it (a missing file means this is no cgroup of that kind)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _members(group: Path, hierarchy: CpuHierarchy) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(tid) for tid in (group / hierarchy.members).read_text().split()]
    return []


def _empty_and_remove(group: Path, hierarchy: CpuHierarchy) -> None:
    """Move every thread of ``group`` to its parent (where vmmig took it from) and remove it."""
    for _ in range(10):  # a thread may be born in the group meanwhile: its parent's thread, not a vCPU
        members = _members(group, hierarchy)
        if not members:
            break
        for tid in members:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                _write(group.parent / hierarchy.members, str(tid))
    with contextlib.suppress(FileNotFoundError):
        group.rmdir()


def remove_stale_groups(hierarchy: CpuHierarchy, also: int) -> list[Path]:
    """Remove every ``vmmig-N`` group whose N is not a running vmmig (its vmmig was killed), and ``vmmig-also``
    (ours: a vmmig of the same pid was killed, or an earlier throttle of this process was not released)."""
    removed = []
    for top, dirs, _ in os.walk(hierarchy.mountpoint):
        for name in list(dirs):
            match = GROUP.fullmatch(name)
            if match is None:
                continue
            dirs.remove(name)  # never descend into a group of ours
            pid = int(match.group(1))
            if pid != also and is_running_vmmig(pid):
                continue
            group = Path(top) / name
            try:
                _empty_and_remove(group, hierarchy)
            except OSError as exc:
                raise PauseError(f"--auto-converge: cannot remove stale cgroup {group}: {_reason(exc)}") from None
            removed.append(group)
    return removed


class VcpuCgroupThrottle:
    """Auto-converge by CPU quota on the vCPU threads ``tids`` (QEMU: initial 20, +10, max 99), as ``Throttle``:
    ``step_up()``, ``release()``, ``percentage``; ``tids`` are the threads' ids (QMP ``query-cpus-fast``
    ``thread-id``); ``hierarchy`` defaults to the mounted one (tests point it elsewhere); ``owner`` names the group
    (default: this process)."""

    def __init__(
        self,
        tids: Sequence[int],
        hierarchy: CpuHierarchy | None = None,
        owner: int | None = None,
        initial: int = 20,
        increment: int = 10,
        maximum: int = 99,
    ) -> None:
        self.tids = sorted(set(tids))
        if not self.tids:
            raise PauseError("--auto-converge: QEMU names no vCPU threads (query-cpus-fast)")
        self.hierarchy = hierarchy or find_cpu_hierarchy()
        self.owner = owner or os.getpid()
        self.initial, self.increment, self.maximum = initial, increment, maximum
        self.percentage = 0
        self._homes: dict[int, Path] = {}  # thread -> the cgroup it came from, for release()
        self._enabled_cpu = False  # v2: we turned cpu on in the parent's subtree_control
        self._lock = threading.Lock()
        remove_stale_groups(self.hierarchy, also=self.owner)
        shared = os.path.commonpath([thread_cgroup(tid, self.hierarchy.version) for tid in self.tids])
        self.parent = self.hierarchy.directory(shared)
        self.group: Path | None = self.parent / f"vmmig-{self.owner}"
        self._create(self.group)
        atexit.register(self._release_at_exit)

    @classmethod
    def for_qemu(cls, qmp: Qmp, hierarchy: CpuHierarchy | None = None) -> VcpuCgroupThrottle:
        """The throttle of the vCPU threads QEMU names over ``qmp``."""
        try:
            cpus = qmp.execute("query-cpus-fast") or []
        except QemuError as exc:
            raise PauseError(f"--auto-converge: {exc}") from None
        return cls([int(cpu["thread-id"]) for cpu in cpus if "thread-id" in cpu], hierarchy)

    def _create(self, group: Path) -> None:
        try:
            group.mkdir()
        except OSError as exc:
            raise PauseError(f"--auto-converge: cannot create cgroup {group}: {_reason(exc)}") from None
        try:
            if self.hierarchy.version == 1:
                self._set(group / "cpu.cfs_period_us", str(PERIOD_US), "set the period of")
                self._set(group / "cpu.cfs_quota_us", "-1", "set the quota of")
            else:
                self._set(group / "cgroup.type", "threaded", "make threaded")
                subtree = self.parent / "cgroup.subtree_control"
                if "cpu" not in subtree.read_text().split():
                    self._set(subtree, "+cpu", "enable cpu in")
                    self._enabled_cpu = True
                self._set(group / "cpu.max", f"max {PERIOD_US}", "set the quota of")
        except BaseException:
            self._remove_group(group)
            raise

    def _set(self, path: Path, value: str, what: str) -> None:
        try:
            _write(path, value)
        except FileNotFoundError:
            if path.exists():  # the kernel's ENOENT for a controller it does not have here (cgroup.subtree_control)
                raise PauseError(
                    f"--auto-converge: cannot {what} cgroup {path.parent} ({path.name}): no such controller in "
                    f"this cgroup v{self.hierarchy.version} hierarchy (is cpu bound to a v1 hierarchy?)"
                ) from None
            raise PauseError(
                f"--auto-converge: {self.hierarchy.mountpoint} is not a cgroup v{self.hierarchy.version} cpu "
                f"hierarchy (no {path.name} in {path.parent})"
            ) from None
        except OSError as exc:
            reason = _reason(exc)
            raise PauseError(f"--auto-converge: cannot {what} cgroup {path.parent} ({path.name}): {reason}") from None

    def _quota(self) -> str:
        if not self.percentage:
            return "-1" if self.hierarchy.version == 1 else f"max {PERIOD_US}"
        quota = max(1000, PERIOD_US * len(self.tids) * (100 - self.percentage) // 100)  # the kernel's minimum: 1 ms
        return str(quota) if self.hierarchy.version == 1 else f"{quota} {PERIOD_US}"

    def _quota_file(self, group: Path) -> Path:
        return group / ("cpu.cfs_quota_us" if self.hierarchy.version == 1 else "cpu.max")

    def step_up(self) -> int:
        """Start at ``initial`` or raise by ``increment`` (capped); returns the percentage now in force."""
        with self._lock:
            if self.group is None:
                raise PauseError("--auto-converge: the throttle was released")
            step = self.initial if self.percentage == 0 else self.percentage + self.increment
            self.percentage = min(self.maximum, step)
            self._set(self._quota_file(self.group), self._quota(), "set the quota of")
            if not self._homes:
                self._move_in(self.group)
            return self.percentage

    def _move_in(self, group: Path) -> None:
        for tid in self.tids:
            home = self.hierarchy.directory(thread_cgroup(tid, self.hierarchy.version))
            try:
                _write(group / self.hierarchy.members, str(tid))
            except ProcessLookupError:
                raise PauseError(f"--auto-converge: vCPU thread {tid} is gone (did QEMU exit?)") from None
            except OSError as exc:
                raise PauseError(
                    f"--auto-converge: cannot move vCPU thread {tid} into cgroup {group}: {_reason(exc)}"
                ) from None
            self._homes[tid] = home

    def release(self) -> None:
        """Give every vCPU thread back to its cgroup and remove ours (idempotent); PauseError if that failed."""
        with self._lock:
            group, self.group = self.group, None
            self.percentage = 0
            if group is None:
                return
            atexit.unregister(self._release_at_exit)
            problems = []
            try:
                _write(self._quota_file(group), self._quota())  # unthrottled first, whatever happens next
            except OSError as exc:
                problems.append(f"lifting the quota of {group}: {_reason(exc)}")
            for tid, home in self._homes.items():
                try:
                    _write(home / self.hierarchy.members, str(tid))
                except ProcessLookupError:
                    pass  # the thread exited: nothing to give back
                except OSError as exc:
                    problems.append(f"thread {tid} to {home}: {_reason(exc)}")
            self._homes.clear()
            try:
                self._remove_group(group)
            except OSError as exc:
                problems.append(f"removing {group}: {_reason(exc)}")
            if problems:
                raise PauseError(
                    f"--auto-converge: could not undo the throttle ({'; '.join(problems)}); "
                    "the next vmmig run removes the cgroup"
                )

    def _remove_group(self, group: Path) -> None:
        _empty_and_remove(group, self.hierarchy)  # anything still inside goes to the parent, where it came from
        if self._enabled_cpu:  # leave the parent as we found it; another user may need cpu on: not an error
            with contextlib.suppress(OSError):
                _write(self.parent / "cgroup.subtree_control", "-cpu")
            self._enabled_cpu = False

    def _release_at_exit(self) -> None:
        with contextlib.suppress(PauseError, OSError):
            self.release()
