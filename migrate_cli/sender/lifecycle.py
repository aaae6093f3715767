"""The sender's lifecycle: its phases, the moves allowed between them, and the rules that read off them.

    CONNECTING --> TRANSFER --> VERIFYING --> VERIFIED --> COMPLETED
                                                 |
                                                 +--> HANDING_OVER --> DEST_RUNNING --> COMPLETED
                                                            |
                                                            +--> DEST_NOT_STARTED

One method moves between phases and refuses a move the table does not allow (a bug in the orchestrator, as
``Conversation`` in wire/protocol.py refuses a frame out of order). A failure leaves the phase where it was: the
failure rules (failure_rules.py) decide from it what the failure means. Whether the guest is paused is a separate
concern, owned by ``GuestHold`` (guest_hold.py).
"""

from __future__ import annotations

import threading
from enum import Enum


class Phase(Enum):
    CONNECTING = "connecting"  # the state file is written, channels open, HELLO out: the receiver holds nothing yet
    TRANSFER = "transfer"  # the receiver WELCOMEd this session: pages go out; a link fault leaves it resumable
    VERIFYING = "verifying"  # END went out: the receiver may verify and publish DEST at any moment
    VERIFIED = "verified"  # the receiver's RESULT matched the digest
    HANDING_OVER = "handing-over"  # QEMU's device state went out: the destination VM may be running
    DEST_RUNNING = "dest-running"  # the receiver says its VM runs
    DEST_NOT_STARTED = "dest-not-started"  # the receiver says its VM did not start: resuming the source is safe
    COMPLETED = "completed"


TRANSITIONS: dict[Phase, frozenset[Phase]] = {
    Phase.CONNECTING: frozenset({Phase.TRANSFER}),
    Phase.TRANSFER: frozenset({Phase.VERIFYING}),
    Phase.VERIFYING: frozenset({Phase.VERIFIED}),
    Phase.VERIFIED: frozenset({Phase.HANDING_OVER, Phase.COMPLETED}),
    Phase.HANDING_OVER: frozenset({Phase.DEST_RUNNING, Phase.DEST_NOT_STARTED}),
    Phase.DEST_RUNNING: frozenset({Phase.COMPLETED}),
    Phase.DEST_NOT_STARTED: frozenset(),
    Phase.COMPLETED: frozenset(),
}

_END_SENT = frozenset(TRANSITIONS) - {Phase.CONNECTING, Phase.TRANSFER}


class Lifecycle:
    """The phase of one session. Moved by the main thread only; read by the control threads and `vmmig ctl`."""

    def __init__(self) -> None:
        self._phase = Phase.CONNECTING
        self._lock = threading.Lock()

    @property
    def phase(self) -> Phase:
        return self._phase

    def move(self, to: Phase) -> None:
        with self._lock:
            if to not in TRANSITIONS[self._phase]:
                raise AssertionError(f"sender lifecycle: no move from {self._phase.value} to {to.value}")
            self._phase = to

    @property
    def started(self) -> bool:
        """The receiver WELCOMEd this session: it keeps the session on a link fault, so do we (resumable)."""
        return self._phase is not Phase.CONNECTING

    @property
    def end_sent(self) -> bool:
        """The last pages and END are out: too late to cancel; the receiver may have published DEST."""
        return self._phase in _END_SENT

    @property
    def dest_may_run(self) -> bool:
        """The destination VM may be running: the source guest must never be resumed (outcome unknown)."""
        return self._phase in (Phase.HANDING_OVER, Phase.DEST_RUNNING)
