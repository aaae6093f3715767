"""What a failure means for a receiving session, read off its phase (lifecycle.py):

- a link fault once DEST.partial holds pages (written now, or kept from before) parks the session: DEST.partial and
  its state file stay, the receiver waits --resume-window for the sender to come back (``parks``);
- a link fault of a new session before any page was written starts over: nothing is kept, the receiver waits for
  a sender again as if the connection had never happened (``starts_over``); not our own stall (--progress-timeout),
  which ends the receiver like a parked session whose window is 0;
- anything else ends the session; a parked session (or one being read back) keeps its files for `recv --resume`,
  any other removes DEST.partial unless --keep-partial, and a published DEST is never removed (``leave_on_disk``).
"""

from __future__ import annotations

from ..errors import (
    CancelledError,
    DestinationModified,
    MigrateError,
    PeerCancelled,
    ResumeKept,
    ResumeWindowExpired,
    Stalled,
)
from ..guest.qemu import DestHandoff
from .destination import DestinationImage, InPlaceDestination
from .discard import DiscardSink
from .lifecycle import Lifecycle, Phase
from .options import RecvOptions
from .state_file import ReceiverState

Sink = DestinationImage | InPlaceDestination | DiscardSink

# A sender is on and nothing is published yet: the phases in which a link fault may park or start over.
LINK_FAULT_PHASES = frozenset({Phase.ALLOCATING, Phase.READING_BACK, Phase.TRANSFERRING, Phase.VERIFYING})


class StreamLost(Exception):
    """An attempt ended by a link fault; DEST.partial and its state are kept and the session may continue."""

    def __init__(self, error: MigrateError) -> None:
        super().__init__(str(error))
        self.error = error


class StartOver(Exception):
    """An attempt ended by a link fault before any page arrived; nothing is kept and the receiver waits afresh."""

    def __init__(self, error: MigrateError) -> None:
        super().__init__(str(error))
        self.error = error


def parks(
    error: MigrateError,
    lifecycle: Lifecycle,
    resuming: bool,
    dest: Sink | None,
    state: ReceiverState | None,
    handoff: DestHandoff | None,
) -> bool:
    """A link fault after pages were written (or kept from before: ``resuming``) to a DEST.partial that has a state
    file and was allocated without error: keep the session for a resume."""
    return (
        error.resumable
        and lifecycle.phase in LINK_FAULT_PHASES
        and state is not None
        and handoff is None
        and type(dest) is DestinationImage  # not --in-place, not --discard
        and (resuming or dest.pages_written)
        and not dest.allocation_failed
    )


def starts_over(
    error: MigrateError,
    lifecycle: Lifecycle,
    resuming: bool,
    dest: Sink | None,
    handoff: DestHandoff | None,
    opts: RecvOptions,
) -> bool:
    """A link fault before any page of a new session arrived (a client that said HELLO and hung up): nothing to
    keep, wait for a sender again (only with a --resume-window: without one a link fault ends the receiver). Our own
    stall is final: the sender we gave up on may still be connected."""
    return (
        error.resumable
        and not isinstance(error, Stalled)
        and lifecycle.phase in LINK_FAULT_PHASES
        and not resuming
        and type(dest) is DestinationImage
        and not dest.pages_written
        and handoff is None
        and opts.resume_window > 0
    )


def kept_error(error: MigrateError, lost: MigrateError | None, opts: RecvOptions, dest: Sink | None) -> MigrateError:
    """The final error of a session whose DEST.partial stays for `vmmig recv --resume`, saying so."""
    partial = dest.partial if isinstance(dest, DestinationImage) else opts.destination + ".partial"
    if isinstance(error, ResumeWindowExpired) and lost is not None:
        cause = f"{lost}; no sender resumed within --resume-window {opts.resume_window:g}s"
        code = lost.exit_code
    else:
        cause, code = str(error), error.exit_code
    kept = ResumeKept(
        f"{cause}; {partial} and its state file are kept: "
        f"`vmmig recv --resume {opts.destination}` continues the migration"
    )
    kept.exit_code = code
    return kept


def leave_on_disk(
    exc: BaseException,
    error: BaseException,
    lifecycle: Lifecycle,
    dest: Sink | None,
    lost: MigrateError | None,
    opts: RecvOptions,
) -> BaseException:
    """Clean up after a failed session (already FAILED) and return the error to report: a kept session's files stay
    (the error says how to continue), any other DEST.partial goes (unless --keep-partial); an --in-place DEST
    written to but not published is reported as modified."""
    if lifecycle.parked and dest is not None:
        dest.close()
        if isinstance(error, MigrateError) and not isinstance(exc, ResumeKept):
            error = kept_error(error, lost, opts, dest)
    elif dest is not None:
        # a published DEST is never removed: once renamed, no DEST.partial is left to remove either
        dest.discard(keep_partial=opts.keep_partial or lifecycle.published)
        if not opts.keep_partial:
            ReceiverState.remove(opts.destination)
    if isinstance(dest, InPlaceDestination) and dest.modified and not lifecycle.published:
        error = DestinationModified(opts.destination, error)
    return error


def drop_destination(dest: Sink, state: ReceiverState | None, opts: RecvOptions) -> None:
    """Remove a DEST.partial that holds nothing (and its state file): the session starts over."""
    dest.discard(keep_partial=False)
    if state is not None:
        ReceiverState.remove(opts.destination)


def final_status(error: BaseException) -> str:
    return "cancelled" if isinstance(error, CancelledError | PeerCancelled) else "failed"
