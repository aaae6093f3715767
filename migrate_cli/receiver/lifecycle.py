"""The receiver's lifecycle: the phases of one `vmmig recv` and the moves allowed between them.

Like ``Conversation`` in wire/protocol.py does for frames, every phase decision lives in one table; ``move`` is the
only way to change phase and refuses a move the table does not allow (a bug, not a user error). The failure rules
(failure_rules.py) and the cleanup read the phase, never a set of booleans:

    new session:   LISTENING --> ALLOCATING ---+
    kept session:  PARKED -----> READING_BACK -+-> TRANSFERRING --> VERIFYING --> PUBLISHED --> [HANDING_OVER] --> DONE

    a link fault once DEST.partial holds pages (READING_BACK, TRANSFERRING, VERIFYING)  --> PARKED  (a resume)
    a link fault of a new session before any page (ALLOCATING .. VERIFYING)            --> LISTENING (start over)
    any other failure, from any phase but DONE                                          --> FAILED
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

from ..errors import InternalError


class Phase(Enum):
    LISTENING = "listening"  # waiting for a sender this session can take: accepting, handshakes, channels joining
    PARKED = "parked"  # DEST.partial and its state are kept; waiting for their sender to resume
    ALLOCATING = "allocating"  # a new sender admitted: DEST.partial created and allocated, WELCOME
    READING_BACK = "reading back"  # the resuming sender admitted: the kept DEST.partial fingerprinted, RESUME_STATE
    TRANSFERRING = "transferring"  # frames from every channel into the pipeline, passes closed at the barrier
    VERIFYING = "verifying"  # END arrived: DEST.partial flushed and its digest compared with the sender's
    PUBLISHED = "published"  # DEST renamed into place (or written in place) and RESULT sent
    HANDING_OVER = "handing over"  # QEMU mode: the destination VM is started
    DONE = "done"
    FAILED = "failed"


# Rule: every phase decision lives in this table. Nothing leaves PUBLISHED but forward or to FAILED: a published
# DEST is never parked, started over or removed.
TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.LISTENING: frozenset({Phase.ALLOCATING, Phase.FAILED}),
    Phase.PARKED: frozenset({Phase.READING_BACK, Phase.FAILED}),
    Phase.ALLOCATING: frozenset({Phase.TRANSFERRING, Phase.LISTENING, Phase.FAILED}),
    Phase.READING_BACK: frozenset({Phase.TRANSFERRING, Phase.PARKED, Phase.FAILED}),
    Phase.TRANSFERRING: frozenset({Phase.VERIFYING, Phase.PARKED, Phase.LISTENING, Phase.FAILED}),
    Phase.VERIFYING: frozenset({Phase.PUBLISHED, Phase.PARKED, Phase.LISTENING, Phase.FAILED}),
    Phase.PUBLISHED: frozenset({Phase.HANDING_OVER, Phase.DONE, Phase.FAILED}),
    Phase.HANDING_OVER: frozenset({Phase.DONE, Phase.FAILED}),
    Phase.DONE: frozenset(),
    Phase.FAILED: frozenset(),
}

KEPT = frozenset({Phase.PARKED, Phase.READING_BACK})  # a session kept for a resume, not yet continued
PUBLISHED = frozenset({Phase.PUBLISHED, Phase.HANDING_OVER, Phase.DONE})  # DEST exists and is verified


class Lifecycle:
    """The current phase; for a failed session also the phase it failed in, which decides what stays on disk.
    Moved by the session's main thread only (channel 0's reader included); other threads only read it."""

    def __init__(self, start: Phase, on_move: Callable[[Phase], None] | None = None) -> None:
        self.phase = start
        self.failed_in: Phase | None = None
        self._on_move = on_move

    def move(self, to: Phase) -> None:
        if to not in TRANSITIONS[self.phase]:
            raise InternalError(RuntimeError(f"receiver lifecycle: no move from {self.phase.value} to {to.value}"))
        if to is Phase.FAILED:
            self.failed_in = self.phase
        self.phase = to
        if self._on_move is not None:
            self._on_move(to)

    def fail(self) -> None:
        """Move to FAILED from wherever the session is (once)."""
        if self.phase is not Phase.FAILED:
            self.move(Phase.FAILED)

    @property
    def reached(self) -> Phase:
        """The phase the session got to: the current one, or the one it failed in."""
        return self.failed_in if self.phase is Phase.FAILED and self.failed_in is not None else self.phase

    @property
    def parked(self) -> bool:
        """A kept session not yet continued: whatever ends the wait, its files stay for `recv --resume`."""
        return self.reached in KEPT

    @property
    def published(self) -> bool:
        """DEST is verified and in place: nothing may remove it any more."""
        return self.reached in PUBLISHED

    @property
    def transferring(self) -> bool:
        """Frames are expected on every channel; after END (or the attempt's end) a closing channel is no fault."""
        return self.phase is Phase.TRANSFERRING
