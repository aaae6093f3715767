"""What the receiver says during and after the copy: a ``control`` thread per channel reads its frames (keepalives,
an ABORT, the final RESULT, QEMU's handoff address and outcome); the main thread waits here for the verdict and, in
QEMU mode, hands the VM over.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import IntegrityError, NetworkError, OutcomeUnknown, ProtocolError, QemuError, peer_abort
from ..failure import Failure, Stopped
from ..guest.qemu import SourceHandoff
from ..net.transport import Channel
from ..wire.frames import HANDOFF_RUNNING, RESULT_VERIFIED, Abort, Handoff, HandoffDone, PassLanded, Result
from .guest_hold import GuestHold
from .lifecycle import Lifecycle, Phase


@dataclass(eq=False)
class Verdict:
    failure: Failure
    lifecycle: Lifecycle
    guest: GuestHold
    handoff: SourceHandoff | None
    verbose: Callable[[str], None]

    def __post_init__(self) -> None:
        self.channels: list[Channel] = []
        self.result: Result | None = None
        self.result_event = threading.Event()
        self.handoff_uri: str | None = None
        self.handoff_done: HandoffDone | None = None
        self.handoff_event = threading.Event()
        self.landing_reported = False  # the receiver accepted FEATURE_PASS_LANDED
        self.landed = 0  # the latest pass the receiver reported in DEST
        self._landed_cond = threading.Condition()

    def read(self, channel: Channel) -> None:
        """The control thread of ``channel``: read the receiver's frames until its RESULT; an ABORT or a lost
        connection fails the migration.

        Keeps reading after a local network error too: the peer's ABORT explaining it may still be in flight.
        """
        while not (self.failure.is_set() and not isinstance(self.failure.error, NetworkError)):
            try:
                frame, _ = channel.read_frame()
            except NetworkError:
                if self.failure.is_set() or (self.result_event.is_set() and not self.lifecycle.dest_may_run):
                    raise Stopped from None  # latched already, or the migration is over and channels close
                if self.lifecycle.end_sent and channel is not self.channels[0]:
                    # A receiver that verified closes every channel, and this one's EOF can come before channel 0
                    # delivers RESULT: channel 0 has the verdict (and fails on its own if the receiver died).
                    raise Stopped from None
                raise
            if isinstance(frame, Abort):
                raise peer_abort(frame.code, frame.message, frame.resumable)
            if isinstance(frame, PassLanded):
                with self._landed_cond:
                    if not self.landing_reported:
                        raise ProtocolError("PASS_LANDED frame from a receiver that was not asked for it")
                    if frame.number != self.landed + 1:
                        raise ProtocolError(f"PASS_LANDED {frame.number} after PASS_LANDED {self.landed}")
                    self.landed = frame.number
                    self._landed_cond.notify_all()
            elif isinstance(frame, Handoff):
                self.handoff_uri = frame.uri
            elif isinstance(frame, HandoffDone):
                self.handoff_done = frame
                self.handoff_event.set()
                return
            elif isinstance(frame, Result):
                self.result = frame
                self.result_event.set()
                if self.handoff is None or channel is not self.channels[0]:
                    return

    def await_landed(self, number: int) -> float:
        """Wait until the receiver reports pass ``number`` in DEST (nothing to wait for from a receiver that does not
        report it); returns the seconds waited. A failure (a lost link, --progress-timeout) ends the wait."""
        if not self.landing_reported:
            return 0.0
        started = time.monotonic()
        with self._landed_cond:
            while self.landed < number:
                self.failure.raise_if_set()
                self._landed_cond.wait(0.1)
        return time.monotonic() - started

    def await_result(self, digest: bytes) -> None:
        """END is out: wait for RESULT. A lost link while the guest is paused leaves the outcome unknown."""
        while not self.result_event.wait(0.2):
            error = self.failure.error
            if error is not None and isinstance(error, NetworkError) and self.guest.paused:
                raise OutcomeUnknown(
                    f"connection lost after the last pages were sent and before the receiver's verdict ({error}); "
                    "the guest stays paused: check the destination before resuming either copy"
                )
            self.failure.raise_if_set()
        result = self.result
        assert result is not None
        if result.status != RESULT_VERIFIED or result.digest != digest:
            raise IntegrityError(
                f"digest mismatch: sent image digest {digest.hex()}, receiver computed {result.digest.hex()}"
            )
        self.lifecycle.move(Phase.VERIFIED)

    def hand_over(self) -> None:
        """QEMU mode, RAM verified: send the device state with QEMU's migration and let the receiver start the VM."""
        assert self.handoff is not None
        if self.handoff_uri is None:
            raise ProtocolError("the receiver announced no QEMU handoff address")
        self.handoff.migrate(self.handoff_uri)  # a failure here: the destination has no device state, cannot run
        self.lifecycle.move(Phase.HANDING_OVER)  # from here on, never resume the source unless its VM failed
        while not self.handoff_event.wait(0.05):
            error = self.failure.error
            if error is not None:
                raise OutcomeUnknown(
                    f"lost the receiver while QEMU handed the VM over ({error}); the source stays stopped: "
                    "check whether the destination VM runs before resuming either"
                )
        done = self.handoff_done
        assert done is not None
        if done.status != HANDOFF_RUNNING:
            self.lifecycle.move(Phase.DEST_NOT_STARTED)  # resuming the source is safe
            raise QemuError(f"the destination QEMU did not start: {done.message}")
        self.lifecycle.move(Phase.DEST_RUNNING)
        self.verbose("destination VM running")
