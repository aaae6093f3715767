"""libvirt guests (``libvirt:DOMAIN``): QEMU mode with libvirt holding the monitor, and libvirt's view kept true.

libvirt owns a domain's QMP monitor; its commands pass through ``virsh qemu-monitor-command`` on one long-lived
virsh (virsh.py), so ``LibvirtQmp`` stands in for ``Qmp`` and the QEMU-mode checks and handoff (qemu.py) run as
they are. What libvirt must do itself, so that it never shows a stale state (docs/LIBVIRT.md):
- pause and resume go through ``virsh suspend``/``resume``, so libvirt knows why the guest is paused;
- after a verified handoff the source is stopped with ``virsh destroy``: left "paused" in libvirt's eyes, a
  ``virsh resume`` would run the old copy beside the new one;
- the destination runs by ``virsh resume``, so libvirt reports it running;
- auto-converge lowers the vCPUs' quota with ``virsh schedinfo --live`` on libvirt's own cgroups, and puts the
  previous value back on every exit path.
The RAM is found, not given: a file backend's ``mem-path``, or the memfd the QEMU process holds (its pid from a
vCPU thread's id in ``query-cpus-fast``, which does not depend on where libvirt keeps pid files).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import PauseError, QemuError
from .qemu import Backend, DestHandoff, SourceHandoff, ram_backend
from .virsh import Virsh

SCHEME = "libvirt:"
PERIOD_US = 100_000


def domain_name(spec: str) -> str | None:
    """DOMAIN of a ``libvirt:DOMAIN`` source or destination; None for anything else."""
    if not spec.startswith(SCHEME):
        return None
    name = spec[len(SCHEME) :]
    if not name:
        from ..errors import UsageError

        raise UsageError("libvirt: names no domain: give libvirt:DOMAIN")
    return name


class LibvirtQmp:
    """QMP through libvirt: the ``Qmp`` interface (``execute``, ``status``, ``path``) over ``virsh``."""

    def __init__(self, virsh: Virsh, domain: str) -> None:
        self.virsh = virsh
        self.domain = domain
        self.path = f"libvirt:{domain}"  # what messages name, as Qmp's socket path

    def execute(self, command: str, **arguments: Any) -> Any:
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        output = self.virsh.run("qemu-monitor-command", self.domain, json.dumps(message))
        replies = [line for line in output.splitlines() if line.startswith("{")]
        if not replies:
            raise QemuError(f"QMP {command} via libvirt {self.domain}: no reply ({output.strip()!r})")
        reply = json.loads(replies[-1])
        if "error" in reply:
            raise QemuError(f"QMP {command} failed: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def status(self) -> str:
        return str(self.execute("query-status").get("status"))

    def close(self) -> None:
        pass  # the Virsh is the domain's


@dataclass(frozen=True)
class RamLocation:
    path: str  # what vmmig maps: a file, or /proc/PID/fd/N of QEMU's memfd
    how: str  # said to the operator: which RAM vmmig found


class LibvirtDomain:
    """One libvirt domain over one virsh session."""

    def __init__(self, name: str, uri: str | None, timeout: float = 30.0) -> None:
        self.name = name
        self.virsh = Virsh(uri, timeout)
        try:
            self.state()  # a domain that does not exist fails here, before anything else
        except BaseException:
            self.virsh.close()
            raise
        self.qmp = LibvirtQmp(self.virsh, name)

    def state(self) -> str:
        """libvirt's view: "running", "paused", "shut off", …"""
        return self.virsh.run("domstate", self.name).strip()

    def suspend(self) -> None:
        self.virsh.run("suspend", self.name)

    def resume(self) -> None:
        self.virsh.run("resume", self.name)

    def destroy(self) -> None:
        self.virsh.run("destroy", self.name)

    def qemu_pid(self) -> int:
        """The QEMU process: the thread group of its first vCPU thread."""
        cpus = self.qmp.execute("query-cpus-fast") or []
        tids = [int(cpu["thread-id"]) for cpu in cpus if "thread-id" in cpu]
        if not tids:
            raise QemuError(f"libvirt:{self.name}: QEMU names no vCPU thread (query-cpus-fast)")
        try:
            status = Path(f"/proc/{tids[0]}/status").read_text()
        except OSError:
            raise QemuError(f"libvirt:{self.name}: vCPU thread {tids[0]} is not on this host") from None
        found = re.search(r"^Tgid:\s*(\d+)", status, re.M)
        if found is None:
            raise QemuError(f"libvirt:{self.name}: no process for vCPU thread {tids[0]}")
        return int(found.group(1))

    def find_ram(self) -> tuple[RamLocation, Backend]:
        """Where the guest's RAM is, refusing a backend vmmig cannot map shared."""
        backend = ram_backend(self.qmp)
        where = f"libvirt:{self.name}"
        if not backend.share:
            raise QemuError(
                f"{where}: RAM backend {backend.id!r} is not shared: give the domain <memoryBacking><source "
                "type='memfd'/><access mode='shared'/></memoryBacking> (docs/LIBVIRT.md)"
            )
        if backend.mem_path is not None:
            return RamLocation(backend.mem_path, f"file backend {backend.id!r}: {backend.mem_path}"), backend
        if backend.type != "memory-backend-memfd":
            raise QemuError(f"{where}: RAM backend {backend.id!r} is {backend.type}, which vmmig cannot reach")
        pid = self.qemu_pid()
        fds = _memfds(pid, backend.size)
        if len(fds) != 1:
            raise QemuError(
                f"{where}: QEMU process {pid} holds {len(fds)} memfds of {backend.size} bytes; expected exactly one"
            )
        path = f"/proc/{pid}/fd/{fds[0]}"
        return RamLocation(path, f"memfd backend {backend.id!r} held by QEMU process {pid}: {path}"), backend

    def close(self) -> None:
        self.virsh.close()


def _memfds(pid: int, size: int) -> list[int]:
    """The fds of process ``pid`` that are memfds of ``size`` bytes."""
    found = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError as exc:
        raise QemuError(f"cannot list QEMU process {pid}'s files: {exc.strerror}") from None
    for name in names:
        path = f"/proc/{pid}/fd/{name}"
        try:
            if os.readlink(path).startswith("/memfd:") and os.stat(path).st_size == size:
                found.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return sorted(found)


class LibvirtPauser:
    """Pause and resume through libvirt (``virsh suspend``/``resume``), confirmed with QEMU's own status."""

    kind = "libvirt"  # `virsh suspend`: ~11 ms here, against ~1 ms for QMP's `stop` (downtime.py)

    def __init__(self, domain: LibvirtDomain) -> None:
        self.domain = domain
        self.qmp = domain.qmp
        self.description = f"libvirt domain {domain.name}"

    def pause(self) -> None:
        self._step(self.domain.suspend, "suspend", ("paused", "postmigrate", "finish-migrate"))

    def resume(self) -> None:
        self._step(self.domain.resume, "resume", ("running",))

    def _step(self, action: Any, name: str, expected: tuple[str, ...]) -> None:
        try:
            action()
            status = self.qmp.status()
        except QemuError as exc:
            raise PauseError(str(exc)) from None
        if status not in expected:
            raise PauseError(f"libvirt {name} {self.domain.name}: QEMU status is {status!r}")


class LibvirtSourceHandoff(SourceHandoff):
    """QEMU mode's source end through libvirt; once the destination runs, the source domain is destroyed."""

    def __init__(self, domain: LibvirtDomain) -> None:
        super().__init__(domain.qmp)
        self.domain = domain

    def retire_source(self) -> None:
        started = time.monotonic()
        self.domain.destroy()
        self.steps["libvirt-destroy"] = round((time.monotonic() - started) * 1000, 3)
        try:
            state = self.domain.state()
        except QemuError:
            state = "undefined"  # a transient domain is gone once destroyed
        self.steps["source-state"] = state  # type: ignore[assignment]


class LibvirtDestHandoff(DestHandoff):
    """QEMU mode's destination end through libvirt: the guest runs by ``virsh resume``."""

    def __init__(self, domain: LibvirtDomain) -> None:
        super().__init__(domain.qmp)
        self.domain = domain

    def run_guest(self) -> None:
        self.domain.resume()

    def quit(self) -> None:
        self.domain.destroy()


class LibvirtQuotaThrottle:
    """Auto-converge through libvirt: ``schedinfo --live vcpu_quota`` on libvirt's own cgroups (QEMU's schedule:
    initial 20, +10, max 99), the quota found at start put back on release and at exit."""

    def __init__(self, domain: LibvirtDomain, initial: int = 20, increment: int = 10, maximum: int = 99) -> None:
        self.domain = domain
        self.initial, self.increment, self.maximum = initial, increment, maximum
        self.percentage = 0
        self._lock = threading.Lock()
        info = self._schedinfo()
        if "vcpu_quota" not in info:
            raise PauseError(f"--auto-converge: libvirt cannot set vcpu_quota on {domain.name} (no cpu cgroup?)")
        self.previous = info["vcpu_quota"]
        self.period = int(info.get("vcpu_period", PERIOD_US)) or PERIOD_US
        self._touched = False  # a quota of ours is in force: release() must put ``previous`` back

    def _schedinfo(self) -> dict[str, str]:
        try:
            output = self.domain.virsh.run("schedinfo", self.domain.name)
        except QemuError as exc:
            raise PauseError(f"--auto-converge: {exc}") from None
        pairs = (line.split(":", 1) for line in output.splitlines() if ":" in line)
        return {key.strip(): value.strip() for key, value in pairs}

    def _set(self, quota: str) -> None:
        try:
            self.domain.virsh.run("schedinfo", "--live", self.domain.name, f"vcpu_quota={quota}")
        except QemuError as exc:
            raise PauseError(f"--auto-converge: {exc}") from None

    def step_up(self) -> int:
        with self._lock:
            step = self.initial if self.percentage == 0 else self.percentage + self.increment
            self.percentage = min(self.maximum, step)
            if not self._touched:
                atexit.register(self._release_at_exit)  # an exit past the sender's own paths still restores it
                self._touched = True
            # libvirt's vcpu_quota is per vCPU: the share of each vCPU's period it may run
            self._set(str(max(1000, self.period * (100 - self.percentage) // 100)))
            return self.percentage

    def release(self) -> None:
        """Put the quota found at start back (idempotent)."""
        with self._lock:
            self.percentage = 0
            if not self._touched:
                return
            self._touched = False
            atexit.unregister(self._release_at_exit)
            self._set(self.previous)

    def _release_at_exit(self) -> None:
        with contextlib.suppress(PauseError):  # nothing is left to report to at interpreter exit
            self.release()
