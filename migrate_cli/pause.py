"""Pausing and resuming the source guest, and throttling it (auto-converge).

A ``Pauser`` stops the guest for switchover and resumes it when the migration fails before the destination has
confirmed. Three ways, chosen on the command line:
- ``PidPauser`` (--pause-pid): SIGSTOP/SIGCONT; paused means every thread in /proc/PID/task/*/stat shows state T.
- ``QmpPauser`` (--qmp): QEMU's ``stop``/``cont``, confirmed with ``query-status``. Prefer it for QEMU: a SIGSTOP
  does not stop in-kernel devices.
- ``CommandPauser`` (--pause-cmd/--unpause-cmd): shell hooks, bounded by --hook-timeout.

``Throttle`` runs a SIGSTOP/SIGCONT duty cycle over a 100 ms period (QEMU's cpu-throttle, by signals).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Protocol

from .errors import PauseError, QemuError
from .qmp import Qmp


class Pauser(Protocol):
    description: str

    def pause(self) -> None: ...

    def resume(self) -> None: ...


def _process_paused(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        raise PauseError(f"guest process {pid} is gone") from None
    return bool(states) and all(state in ("T", "t") for state in states)


class PidPauser:
    def __init__(self, pid: int, timeout: float = 5.0) -> None:
        self.pid = pid
        self.timeout = timeout
        self.description = f"pid {pid}"
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            raise PauseError(f"--pause-pid {pid}: no such process") from None

    def pause(self) -> None:
        try:
            os.kill(self.pid, signal.SIGSTOP)
        except ProcessLookupError:
            raise PauseError(f"guest process {self.pid} is gone") from None
        deadline = time.monotonic() + self.timeout
        while not _process_paused(self.pid):
            if time.monotonic() > deadline:
                raise PauseError(f"guest process {self.pid} did not stop within {self.timeout:g}s")
            time.sleep(0.001)

    def resume(self) -> None:
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            raise PauseError(f"guest process {self.pid} is gone") from None


class QmpPauser:
    """QEMU's ``stop``/``cont`` over QMP, each confirmed with ``query-status``."""

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.description = f"QMP {path}"
        try:
            self.qmp = Qmp(path, timeout)
        except QemuError as exc:
            raise PauseError(str(exc).replace(f"QMP {path}", f"--qmp {path}")) from None

    def pause(self) -> None:
        try:
            self.qmp.execute("stop")
            status = self.qmp.status()
        except QemuError as exc:
            raise PauseError(str(exc)) from None
        if status not in ("paused", "postmigrate", "finish-migrate"):
            raise PauseError(f"QMP stop: guest status is {status!r}, not paused")

    def resume(self) -> None:
        try:
            self.qmp.execute("cont")
            status = self.qmp.status()
        except QemuError as exc:
            raise PauseError(str(exc)) from None
        if status != "running":
            raise PauseError(f"QMP cont: guest status is {status!r}, not running")


class CommandPauser:
    def __init__(self, pause_cmd: str, unpause_cmd: str, timeout: float) -> None:
        self.pause_cmd = pause_cmd
        self.unpause_cmd = unpause_cmd
        self.timeout = timeout
        self.description = f"command {pause_cmd!r}"

    def _run(self, cmd: str, what: str) -> None:
        try:
            result = subprocess.run(cmd, shell=True, timeout=self.timeout, capture_output=True, text=True)
        except subprocess.TimeoutExpired:
            raise PauseError(f"{what} {cmd!r} did not finish within {self.timeout:g}s (--hook-timeout)") from None
        if result.returncode:
            detail = (result.stderr or result.stdout).strip().splitlines()
            raise PauseError(f"{what} {cmd!r} exited {result.returncode}" + (f": {detail[-1]}" if detail else ""))

    def pause(self) -> None:
        self._run(self.pause_cmd, "--pause-cmd")

    def resume(self) -> None:
        self._run(self.unpause_cmd, "--unpause-cmd")


class Throttle:
    """Auto-converge: keep ``pid`` stopped for ``percentage`` of every 100 ms period (QEMU: initial 20, +10, max 99)."""

    PERIOD = 0.1

    def __init__(self, pid: int, initial: int = 20, increment: int = 10, maximum: int = 99) -> None:
        self.pid = pid
        self.initial, self.increment, self.maximum = initial, increment, maximum
        self.percentage = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def step_up(self) -> int:
        """Start at ``initial`` or raise by ``increment`` (capped); returns the percentage now in force."""
        self.percentage = self.initial if self.percentage == 0 else min(self.maximum, self.percentage + self.increment)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="throttle", daemon=True)
            self._thread.start()
        return self.percentage

    def _run(self) -> None:
        while not self._stop.is_set():
            stopped = self.PERIOD * self.percentage / 100
            try:
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(stopped)
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            self._stop.wait(self.PERIOD - stopped)

    def release(self) -> None:
        """Stop throttling and leave the guest running (idempotent)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        if self.percentage:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        self.percentage = 0
        self._stop = threading.Event()
