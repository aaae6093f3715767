"""What a failure means, read off the phase it struck in (lifecycle.py):

- the destination VM may be running (QEMU's device state went out): the outcome is unknown whatever the error,
  and the source guest stays stopped;
- otherwise a guest we paused is resumed, except when the outcome is unknown (the verdict was lost in transit,
  or a signal came between END and the verdict);
- a resumable fault (a link fault) after WELCOME leaves the session resumable: the receiver keeps it, and so does
  our state file (not in QEMU mode: a handoff cannot be resumed);
- before WELCOME the receiver holds nothing: the state file this session replaced gets its place back;
- any other failure after WELCOME ends the session on both sides: the state file goes.
"""

from __future__ import annotations

from ..errors import Interrupted, MigrateError, OutcomeUnknown, ResumableFailure
from .guest_hold import GuestHold
from .handshake import SessionRecord
from .lifecycle import Lifecycle, Phase


def as_outcome(exc: BaseException, lifecycle: Lifecycle) -> BaseException:
    """A failure while the destination VM may be running is an unknown outcome, whatever it was; so is a signal
    between END and the verdict: the receiver may be publishing DEST right now, as after a link lost there."""
    if lifecycle.dest_may_run and not isinstance(exc, OutcomeUnknown):
        return OutcomeUnknown(f"{exc}; the destination VM may be running, so the source stays stopped")
    if lifecycle.phase is Phase.VERIFYING and isinstance(exc, Interrupted):
        unknown = OutcomeUnknown(
            f"{exc} after the last pages were sent and before the receiver's verdict; the receiver may publish DEST, "
            "so the guest stays paused: check the destination before resuming either copy"
        )
        unknown.exit_code = exc.exit_code  # still the signal's status (130/143), as after any interrupt
        return unknown
    return exc


def settle_guest(guest: GuestHold, error: BaseException | None, lifecycle: Lifecycle) -> None:
    """Resume the guest if it is paused and the destination never confirmed; never when the outcome is unknown."""
    guest.settle_after_failure(keep_stopped=isinstance(error, OutcomeUnknown) or lifecycle.dest_may_run)


def conclude(error: MigrateError, lifecycle: Lifecycle, record: SessionRecord, handoff: bool) -> MigrateError:
    """The error the run ends with, and what becomes of the state file."""
    if lifecycle.started and error.resumable and not handoff:
        return ResumableFailure(error, record.opts.state_path(), lifecycle.end_sent)
    if not lifecycle.started:
        record.restore_replaced()
    elif not error.resumable:
        record.remove()  # the receiver drops the session too
    return error
