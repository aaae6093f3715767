"""QEMU mode: vmmig carries a running guest's RAM, QEMU carries only its device state.

QEMU's capability ``x-ignore-shared`` migrates everything except shared RAM. So, on both ends:
1. check over QMP that the image vmmig reads (or writes in place) really is the VM's one ``share=on`` RAM backend,
   of the same size (``check_backend``);
2. set ``x-ignore-shared`` (and on the destination start ``migrate-incoming`` on a port recv picks) before the
   copy, so none of it counts as downtime;
3. vmmig's live pre-copy, ``stop``, the last pass, the verified digest (QEMU never checks shared RAM: a stale
   page there is a silent guest corruption);
4. source: ``migrate`` to the destination's URI, poll ``query-migrate``; destination: wait until ``query-status``
   leaves ``inmigrate``, then ``cont``.
Rules: before the destination can run, a failure resumes the source; once it may be running, the source is never
resumed (no split brain): the outcome is reported as unknown instead.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..errors import QemuError
from .qmp import QmpChannel

RAM_BACKEND_TYPES = ("memory-backend-file", "memory-backend-memfd", "memory-backend-ram")
POLL = 0.02


@dataclass(frozen=True)
class Backend:
    id: str
    type: str
    size: int
    share: bool
    mem_path: str | None


def ram_backend(qmp: QmpChannel) -> Backend:
    """The VM's single RAM backend object; refuse VMs with none or several."""
    children = qmp.execute("qom-list", path="/objects") or []
    found = []
    for child in children:
        kind = str(child.get("type", ""))
        if kind.startswith("child<") and kind[6:-1] in RAM_BACKEND_TYPES:
            found.append((str(child["name"]), kind[6:-1]))
    if len(found) != 1:
        names = ", ".join(f"{n} ({t})" for n, t in found) or "none"
        raise QemuError(f"QMP {qmp.path}: the VM must have exactly one RAM backend object, it has {names}")
    name, kind = found[0]
    path = f"/objects/{name}"
    size = int(qmp.execute("qom-get", path=path, property="size"))
    share = bool(qmp.execute("qom-get", path=path, property="share"))
    mem_path = str(qmp.execute("qom-get", path=path, property="mem-path")) if kind == "memory-backend-file" else None
    return Backend(name, kind, size, share, mem_path)


def check_backend(qmp: QmpChannel, image: str, image_size: int, role: str) -> Backend:
    """Check that ``image`` is the VM's shared RAM backend and has its size."""
    backend = ram_backend(qmp)
    where = f"{role} QEMU ({qmp.path})"
    if not backend.share:
        raise QemuError(f"{where}: RAM backend {backend.id!r} is not share=on: vmmig could not see or write it")
    if backend.size != image_size:
        raise QemuError(f"{where}: RAM backend {backend.id!r} is {backend.size} bytes, the image {image_size}")
    if backend.mem_path is not None:
        if os.path.realpath(backend.mem_path) != os.path.realpath(image):
            raise QemuError(f"{where}: its RAM is {backend.mem_path}, not {image}")
    elif backend.type == "memory-backend-memfd":
        if not (os.path.islink(image) and os.readlink(image).startswith("/memfd:")):
            raise QemuError(f"{where}: its RAM is a memfd: give it as /proc/QEMUPID/fd/N, not {image}")
    else:
        raise QemuError(f"{where}: RAM backend {backend.id!r} is {backend.type}, which vmmig cannot reach")
    return backend


def set_ignore_shared(qmp: QmpChannel, state: bool = True) -> None:
    qmp.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": state}])


class SourceHandoff:
    def __init__(self, qmp: QmpChannel) -> None:
        self.qmp = qmp
        self.steps: dict[str, float] = {}

    def prepare(self) -> None:
        set_ignore_shared(self.qmp)

    def retire_source(self) -> None:
        """After the destination runs: nothing here (QEMU stays in postmigrate, never resumed); libvirt.py's
        handoff destroys the domain so that libvirt cannot resume the old copy."""

    def migrate(self, uri: str, timeout: float = 60.0) -> dict[str, Any]:
        """Send the device state; returns QEMU's final query-migrate. The guest must be stopped already."""
        started = time.monotonic()
        self.qmp.execute("migrate", uri=uri)
        while True:
            info = self.qmp.execute("query-migrate") or {}
            status = info.get("status")
            if status == "completed":
                self.steps["qemu-migrate"] = round((time.monotonic() - started) * 1000, 3)
                self.steps["qemu-stream-bytes"] = int(info.get("ram", {}).get("transferred", 0))
                return dict(info)
            if status in ("failed", "cancelled"):
                raise QemuError(f"QEMU migrate (device state) {status}: {info.get('error-desc', 'no reason given')}")
            if time.monotonic() - started > timeout:
                raise QemuError(f"QEMU migrate (device state) did not complete within {timeout:g}s")
            time.sleep(POLL)


class DestHandoff:
    def __init__(self, qmp: QmpChannel) -> None:
        self.qmp = qmp
        self.uri = ""
        self.steps: dict[str, float] = {}

    def prepare(self, host: str) -> str:
        """Set the capability and start QEMU's incoming migration on a free port of ``host``; returns the URI."""
        status = self.qmp.status()
        if status != "inmigrate":
            raise QemuError(f"destination QEMU is {status!r}: start it with -incoming defer (and -S)")
        set_ignore_shared(self.qmp)
        probe = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        probe.bind((host, 0))
        port = probe.getsockname()[1]
        probe.close()  # QEMU binds it next; the window is tiny and a clash fails loudly
        self.uri = f"tcp:[{host}]:{port}" if ":" in host else f"tcp:{host}:{port}"
        self.qmp.execute("migrate-incoming", uri=self.uri)
        return self.uri

    def finish(self, timeout: float = 60.0) -> None:
        """Wait for the device state to load, then run the guest."""
        started = time.monotonic()
        while (status := self.qmp.status()) == "inmigrate":
            if time.monotonic() - started > timeout:
                raise QemuError(f"destination QEMU still inmigrate after {timeout:g}s: no device state arrived")
            time.sleep(POLL)
        self.steps["qemu-load"] = round((time.monotonic() - started) * 1000, 3)
        if status not in ("paused", "postmigrate", "prelaunch"):
            raise QemuError(f"destination QEMU is {status!r} after the incoming migration (did it fail to load?)")
        cont = time.monotonic()
        self.run_guest()
        if (status := self.qmp.status()) != "running":
            raise QemuError(f"destination QEMU is {status!r} after cont")
        self.steps["cont"] = round((time.monotonic() - cont) * 1000, 3)

    def run_guest(self) -> None:
        self.qmp.execute("cont")

    def quit(self) -> None:
        """--on-failure quit-dest: end the destination QEMU."""
        self.qmp.execute("quit")
