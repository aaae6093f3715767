"""The source guest as the sender holds it: whether we paused it (or throttle it), and resuming it after a failure.

Separate from the session's phase (lifecycle.py): a plain copy never pauses, stop-and-copy pauses before its only
pass, a live migration at the switchover. ``GuestHold`` is itself a Pauser, so pre-copy (precopy.py) pauses through
it and it always knows whether the guest is paused.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import PauseError
from ..guest.libvirt import LibvirtPauser, LibvirtQuotaThrottle
from ..guest.pause import GuestThrottle, Pauser, PidPauser, QmpPauser, Throttle
from ..guest.pause import make_pauser as pauser_for
from ..guest.vcpu_cgroup import VcpuCgroupThrottle
from .options import SendOptions


def make_pauser(opts: SendOptions) -> Pauser | None:
    return pauser_for(opts.pause_pid, opts.qmp, opts.pause_cmd, opts.unpause_cmd, opts.hook_timeout)


class GuestHold:
    def __init__(self, pauser: Pauser | None, notice: Callable[[str], None]) -> None:
        self.pauser = pauser
        self.throttle: GuestThrottle | None = None  # --auto-converge, during pre-copy
        self.paused = False  # we paused the guest and have not resumed it
        self._notice = notice

    @property
    def description(self) -> str:
        return self.pauser.description if self.pauser is not None else "no pause option"

    def pause(self) -> None:
        assert self.pauser is not None
        self.paused = True  # before the call: a signal landing inside pause() must still lead to a resume
        self.pauser.pause()

    def resume(self) -> None:
        assert self.pauser is not None
        self.pauser.resume()
        self.paused = False

    def start_throttle(self) -> GuestThrottle:
        """--auto-converge: a SIGSTOP duty cycle on a --pause-pid process; for --qmp a CPU quota on QEMU's vCPU
        threads, found over the pauser's QMP connection (its monitor, I/O and migration threads never stop)."""
        if isinstance(self.pauser, PidPauser):
            self.throttle = Throttle(self.pauser.pid)
        elif isinstance(self.pauser, LibvirtPauser):  # libvirt's own cgroups, via schedinfo
            self.throttle = LibvirtQuotaThrottle(self.pauser.domain)
        elif isinstance(self.pauser, QmpPauser):
            self.throttle = VcpuCgroupThrottle.for_qemu(self.pauser.qmp)
        else:  # options.check refuses this combination
            raise PauseError("--auto-converge needs --pause-pid or --qmp")
        return self.throttle

    def settle_after_failure(self, keep_stopped: bool) -> None:
        """Release the throttle; resume the guest if we paused it, unless ``keep_stopped`` (the destination VM may
        be running, or the outcome is unknown)."""
        if self.throttle is not None:
            try:
                self.throttle.release()
            except PauseError as exc:
                self._notice(str(exc))
        if not self.paused or self.pauser is None:
            return
        if keep_stopped:
            self._notice("the source guest stays stopped: the destination VM may be running")
            return
        try:
            self.resume()
            self._notice(f"guest resumed on the source ({self.description})")
        except PauseError as exc:
            self._notice(f"could not resume the guest: {exc}")
