"""Pausing and resuming the source guest, and throttling it (auto-converge).

A ``Pauser`` stops the guest for switchover and resumes it when the migration fails before the destination has
confirmed. Three ways, chosen on the command line:
- ``PidPauser`` (--pause-pid): SIGSTOP/SIGCONT; paused means every thread in /proc/PID/task/*/stat shows state T.
  The pid is checked first (``check_pause_pid``): never 0, a negative id, init, vmmig or one of its parents.
- ``QmpPauser`` (--qmp): QEMU's ``stop``/``cont``, confirmed with ``query-status``. Prefer it for QEMU: a SIGSTOP
  does not stop in-kernel devices.
- ``CommandPauser`` (--pause-cmd/--unpause-cmd): shell hooks, bounded by --hook-timeout; a hook that runs past it
  is killed with everything it started, and a pause hook killed so is followed by the unpause hook.

``Throttle`` runs a SIGSTOP/SIGCONT duty cycle over a 100 ms period (QEMU's cpu-throttle, by signals) on a
--pause-pid process; a QEMU guest (--qmp) is throttled by a CPU quota on its vCPU threads instead
(vcpu_cgroup.py), so that QEMU itself never stops. Both are ``GuestThrottle``s.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import weakref
from pathlib import Path
from typing import Protocol

from ..errors import HookTimeout, PauseError, QemuError, UsageError
from .qmp import Qmp


class GuestThrottle(Protocol):
    """Auto-converge: ``step_up()`` to the next percentage (returned), ``release()`` to leave the guest unthrottled."""

    percentage: int

    def step_up(self) -> int: ...

    def release(self) -> None: ...


class Pauser(Protocol):
    description: str
    kind: str  # "pid", "qmp" or "command": what a pause costs (sender/downtime.py)

    def pause(self) -> None: ...

    def resume(self) -> None: ...


def _process_paused(pid: int) -> bool:
    tasks = Path(f"/proc/{pid}/task")
    try:
        states = [(task / "stat").read_text().rsplit(")", 1)[1].split()[0] for task in tasks.iterdir()]
    except (FileNotFoundError, ProcessLookupError):
        raise PauseError(f"guest process {pid} is gone") from None
    return bool(states) and all(state in ("T", "t") for state in states)


def _thread_group(pid: int) -> int:
    """The process a pid names: kill(2) on one thread's id signals its whole process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return pid


def _vmmig_and_parents() -> set[int]:
    """vmmig's pid and its ancestors': stopping any of them would stop vmmig (or the shell waiting for it) for good."""
    import psutil  # only with --pause-pid: psutil costs start-up time

    try:
        return {os.getpid(), *(parent.pid for parent in psutil.Process().parents())}
    except psutil.Error:
        return {os.getpid(), os.getppid()}


def check_pause_pid(pid: int) -> None:
    """Refuse a --pause-pid that is not one other process (UsageError), before anything is signalled.

    kill(2) reads 0 as the caller's process group, -1 as every process it may signal and -N as process group N, and
    nothing would ever SIGCONT them; 1 is init.
    """
    if pid <= 1:
        raise UsageError(f"--pause-pid {pid}: not a guest's process id (0 and negative ids name groups, 1 is init)")
    if _thread_group(pid) in _vmmig_and_parents():
        raise UsageError(f"--pause-pid {pid}: that is vmmig itself or one of its parents; give the guest's pid")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        raise UsageError(f"--pause-pid {pid}: no such process") from None
    except PermissionError:
        raise UsageError(f"--pause-pid {pid}: not permitted to signal it (another user's process?)") from None


class GuestProcess:
    """A checked guest pid, signalled through a pidfd where the kernel has them: if the guest exits and its pid goes
    to another process, that process is never signalled (the guest is reported gone instead)."""

    def __init__(self, pid: int) -> None:
        check_pause_pid(pid)
        self.pid = pid
        self._pidfd: int | None = None
        try:
            self._pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise UsageError(f"--pause-pid {pid}: no such process") from None
        except (AttributeError, OSError):
            return  # no pidfds here (old kernel, seccomp): plain kill(2) on the checked pid
        weakref.finalize(self, os.close, self._pidfd)

    def send(self, signum: int) -> None:
        """Signal the guest; ProcessLookupError when it is gone."""
        if self._pidfd is not None:
            signal.pidfd_send_signal(self._pidfd, signum)
        elif self.pid > 1:  # checked in __init__; never let a group or every process be signalled
            os.kill(self.pid, signum)
        else:
            raise ProcessLookupError(self.pid)


class PidPauser:
    kind = "pid"

    def __init__(self, pid: int, timeout: float = 5.0) -> None:
        self.process = GuestProcess(pid)
        self.pid = pid
        self.timeout = timeout
        self.description = f"pid {pid}"

    def pause(self) -> None:
        try:
            self.process.send(signal.SIGSTOP)
        except ProcessLookupError:
            raise PauseError(f"guest process {self.pid} is gone") from None
        deadline = time.monotonic() + self.timeout
        while not _process_paused(self.pid):
            if time.monotonic() > deadline:
                raise PauseError(f"guest process {self.pid} did not stop within {self.timeout:g}s")
            time.sleep(0.001)

    def resume(self) -> None:
        try:
            self.process.send(signal.SIGCONT)
        except ProcessLookupError:
            raise PauseError(f"guest process {self.pid} is gone") from None


class QmpPauser:
    """QEMU's ``stop``/``cont`` over QMP, each confirmed with ``query-status``."""

    kind = "qmp"

    def __init__(self, path: str, timeout: float = 10.0) -> None:
        self.path = path
        self.description = f"QMP {path}"
        try:
            self.qmp = Qmp(path, timeout)
        except QemuError as exc:
            raise PauseError(str(exc).replace(f"QMP {path}", f"--qmp {path}")) from None

    def pause(self) -> None:
        self._step("stop", ("paused", "postmigrate", "finish-migrate"), "paused")

    def resume(self) -> None:
        self._step("cont", ("running",), "running")

    def _step(self, command: str, expected: tuple[str, ...], wanted: str) -> None:
        """Run ``command`` and check the status QEMU reports after it: a QMP reply alone does not prove the state."""
        try:
            self.qmp.execute(command)
            status = self.qmp.status()
        except QemuError as exc:
            raise PauseError(str(exc)) from None
        if status not in expected:
            raise PauseError(f"QMP {command}: guest status is {status!r}, not {wanted}")


class CommandPauser:
    kind = "command"

    def __init__(self, pause_cmd: str, unpause_cmd: str, timeout: float) -> None:
        self.pause_cmd = pause_cmd
        self.unpause_cmd = unpause_cmd
        self.timeout = timeout
        self.description = f"command {pause_cmd!r}"

    def _run(self, cmd: str, what: str) -> None:
        # Its own process group (session), so that a timeout kills what the shell started too, not just the shell.
        with subprocess.Popen(
            cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        ) as proc:
            try:
                stdout, stderr = proc.communicate(timeout=self.timeout)
            except BaseException as exc:  # the timeout, or a signal (Interrupted): leave nothing of the hook behind
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                if isinstance(exc, subprocess.TimeoutExpired):
                    raise HookTimeout(
                        f"{what} {cmd!r} did not finish within {self.timeout:g}s (--hook-timeout): killed it"
                    ) from None
                raise
        if proc.returncode:
            detail = (stderr or stdout).strip().splitlines()
            raise PauseError(f"{what} {cmd!r} exited {proc.returncode}" + (f": {detail[-1]}" if detail else ""))

    def pause(self) -> None:
        try:
            self._run(self.pause_cmd, "--pause-cmd")
        except HookTimeout as exc:
            # Killed half way, the hook may have paused the guest: resume it rather than leave it stopped.
            try:
                self._run(self.unpause_cmd, "--unpause-cmd")
            except PauseError as undo:
                raise PauseError(f"{exc}; then {undo}: the guest may still be paused") from None
            raise PauseError(f"{exc}; ran --unpause-cmd") from None

    def resume(self) -> None:
        self._run(self.unpause_cmd, "--unpause-cmd")


def make_pauser(
    pause_pid: int | None, qmp: str | None, pause_cmd: str | None, unpause_cmd: str | None, hook_timeout: float
) -> Pauser | None:
    """The pauser the pause options name (send and save check first that at most one is given)."""
    if pause_pid is not None:
        return PidPauser(pause_pid)
    if qmp is not None:
        return QmpPauser(qmp, timeout=hook_timeout)
    if pause_cmd is not None and unpause_cmd is not None:
        return CommandPauser(pause_cmd, unpause_cmd, hook_timeout)
    return None


class Throttle:
    """Auto-converge: keep ``pid`` stopped for ``percentage`` of every 100 ms period (QEMU: initial 20, +10, max 99)."""

    PERIOD = 0.1

    def __init__(self, pid: int, initial: int = 20, increment: int = 10, maximum: int = 99) -> None:
        try:
            self.process = GuestProcess(pid)
        except UsageError as exc:  # the pauser checked this pid before connecting: here the guest is gone
            raise PauseError(f"--auto-converge: {exc}") from None
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
                self.process.send(signal.SIGSTOP)
                self._stop.wait(stopped)
                self.process.send(signal.SIGCONT)
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
            with contextlib.suppress(ProcessLookupError):
                self.process.send(signal.SIGCONT)
        self.percentage = 0
        self._stop = threading.Event()
