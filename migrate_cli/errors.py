"""Every way vmmig can fail, and the exit code each one maps to.

This module is the only place exit codes are defined. Each error class carries its code; the CLI's one handler
prints ``vmmig <command>: <message>`` on stderr and exits with it. Codes are grouped by cause; later features add
rows and never reuse a number. The table is repeated in docs/CLI.md ("Exit codes").
"""

from __future__ import annotations

import traceback
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug: unexpected exception
    USAGE = 2  # bad options or arguments (click uses 2 as well)
    SOURCE = 3  # source image missing, unreadable, wrong size
    DESTINATION = 4  # destination exists, leftover .partial, no space, not writable
    NETWORK = 5  # refused / timed-out connection, address in use, connection lost, stream truncated, silence
    PROTOCOL = 6  # malformed frame, version mismatch, unknown codec, unexpected frame
    INTEGRITY = 7  # CRC mismatch, decompression error, page fingerprint or digest mismatch
    PEER = 8  # the other end failed and told us why (message prefixed "peer:")
    CANCELLED = 9  # cancelled by the operator (reserved for `vmmig ctl cancel`)
    NO_CONVERGENCE = 10  # reserved: live migration did not converge
    OUTCOME_UNKNOWN = 11  # reserved: the end state could not be established
    QEMU_STEP = 12  # a QEMU/QMP step failed (the message names it)
    DEST_MODIFIED = 13  # --in-place destination modified but unverified
    PAUSE = 14  # pausing, resuming or throttling the source guest failed
    AUTH = 15  # TLS: the peer failed authentication, or does not speak TLS when we do (or the reverse)
    RESUME_REFUSED = 16  # --resume: nothing to resume, or another image or options; restore: a missing/altered base
    STALLED = 17  # --progress-timeout: no progress for that long; resumable, never retried by --retries
    NO_SENDER = 18  # recv --accept-timeout: no sender completed a handshake within that time
    SIGINT = 130  # interrupted (Ctrl-C), after cleanup
    SIGTERM = 143  # terminated, after cleanup


class MigrateError(Exception):
    """Base of every error vmmig reports to the user as one line."""

    exit_code: ExitCode = ExitCode.INTERNAL
    # A fault of the link, not of the data or the ends: the session can continue with --resume (docs/RESUME.md).
    resumable: bool = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(MigrateError):
    exit_code = ExitCode.USAGE


class SourceError(MigrateError):
    exit_code = ExitCode.SOURCE


class DestinationError(MigrateError):
    exit_code = ExitCode.DESTINATION


class NetworkError(MigrateError):
    exit_code = ExitCode.NETWORK
    resumable = True


class ProtocolError(MigrateError):
    """The bytes on the wire do not follow docs/PROTOCOL.md."""

    exit_code = ExitCode.PROTOCOL


class IntegrityError(MigrateError):
    """Data arrived but is wrong: CRC, decompression, page fingerprint or digest failure."""

    exit_code = ExitCode.INTEGRITY


class CorruptFrame(IntegrityError):
    """The link damaged a frame: its CRC failed (nothing of it was applied), its data did not decode, or a page
    landed that does not match its fingerprint (DEST's fingerprints record what it holds, so a resume resends it).
    Either way the session can resume."""

    resumable = True


class PeerError(MigrateError):
    """The peer aborted and sent its reason; we relay it with a ``peer:`` prefix."""

    exit_code = ExitCode.PEER

    def __init__(self, message: str, peer_code: int = 0, resumable: bool = False) -> None:
        super().__init__(f"peer: {message}")
        self.peer_code = peer_code
        self.resumable = resumable  # the peer said it keeps the session (ABORT flag)


class CancelledError(MigrateError):
    """The operator cancelled the migration (`vmmig ctl PATH cancel`)."""

    exit_code = ExitCode.CANCELLED


class PeerCancelled(PeerError):
    """The other end was cancelled by its operator: this end exits with the cancelled code too."""

    exit_code = ExitCode.CANCELLED


class PeerResumeRefused(PeerError):
    """The receiver refused a resume: this end exits with the resume-refused code too."""

    exit_code = ExitCode.RESUME_REFUSED


class PeerAuthRefused(PeerError):
    """The peer refused our TLS certificate after the handshake (its --tls-peer-name): this end exits 15 too."""

    exit_code = ExitCode.AUTH


class PeerStalled(PeerError):
    """The peer gave up on a stalled run (its --progress-timeout): this end exits with the stalled code too."""

    exit_code = ExitCode.STALLED


def peer_abort(code: int, message: str, resumable: bool = False) -> PeerError:
    """The error for an ABORT frame received from the peer."""
    if code == ExitCode.STALLED:
        return PeerStalled(message, code, resumable)
    if code == ExitCode.CANCELLED:
        return PeerCancelled(message, code)
    if code == ExitCode.AUTH:
        return PeerAuthRefused(message, code)
    if code == ExitCode.RESUME_REFUSED:
        return PeerResumeRefused(message, code)
    return PeerError(message, code, resumable)


class ResumeRefused(MigrateError):
    """``--resume`` cannot continue: no interrupted session, or one for another image or other options."""

    exit_code = ExitCode.RESUME_REFUSED


class BaseRefused(MigrateError):
    """An incremental snapshot's base is missing, is not the snapshot it was saved against, or the chain loops."""

    exit_code = ExitCode.RESUME_REFUSED


class NoConvergence(MigrateError):
    """A live migration did not converge and --on-no-converge is abort: the guest keeps running on the source."""

    exit_code = ExitCode.NO_CONVERGENCE


class Stalled(MigrateError):
    """--progress-timeout: the remaining bytes did not shrink and no pass ended for that long. The session is kept
    for --resume as after a lost link, but --retries does not try again: a stall is not a fault a reconnect heals."""

    exit_code = ExitCode.STALLED
    resumable = True


class NoSender(MigrateError):
    """recv --accept-timeout: no sender completed a handshake (a HELLO this session can take) within that time."""

    exit_code = ExitCode.NO_SENDER


def is_stall(error: BaseException) -> bool:
    """A stall of this end or of the peer, possibly wrapped as a kept session (ResumableFailure.cause)."""
    return isinstance(getattr(error, "cause", error), Stalled | PeerStalled)


class OutcomeUnknown(MigrateError):
    """The end frame went out but no verdict came back: the guest stays paused so that two copies never run."""

    exit_code = ExitCode.OUTCOME_UNKNOWN


class AuthError(MigrateError):
    """TLS failed: the peer's certificate is expired, from another CA or for another name, or the peer is plaintext."""

    exit_code = ExitCode.AUTH


class DestinationModified(MigrateError):
    """An --in-place destination was written to and the migration then failed: it holds a mix of old and new."""

    exit_code = ExitCode.DEST_MODIFIED

    def __init__(self, dest: str, cause: MigrateError) -> None:
        super().__init__(f"{dest} was modified in place but not verified ({cause}): do not use its content")
        self.cause = cause


class QemuError(MigrateError):
    """A QEMU step over QMP failed: the message names the step."""

    exit_code = ExitCode.QEMU_STEP


class PauseError(MigrateError):
    """Pausing, resuming or throttling the source guest failed."""

    exit_code = ExitCode.PAUSE


class ClosedBetweenFrames(NetworkError):
    """The peer closed cleanly where a frame would start (before HELLO: a health check or a port scan)."""


class TlsHandshakeLost(AuthError):
    """The handshake ended without a verdict (closed, reset, timed out): a refusal or a link fault, which cannot
    be told apart, so --retries may try again (a real refusal fails the same way each time)."""

    resumable = True


class InternalError(MigrateError):
    """An unexpected exception in a thread, with its traceback kept for --debug."""

    def __init__(self, exc: BaseException) -> None:
        super().__init__(f"internal error: {type(exc).__name__}: {exc}")
        self.detail = "".join(traceback.format_exception(exc))


class VersionMismatch(ProtocolError):
    def __init__(self, ours: int, theirs: int) -> None:
        super().__init__(f"protocol version mismatch: peer speaks version {theirs}, this vmmig speaks {ours}")
        self.ours = ours
        self.theirs = theirs


class ControlError(UsageError):
    """A control request failed or could not be delivered; `vmmig ctl` exits with the usage code."""


class HookTimeout(PauseError):
    """A hook ran past --hook-timeout and was killed, with every process it started."""


class StateNotWritable(DestinationError):
    """DEST's file system takes no ordinary files (hugetlbfs refuses write(2)): the migration runs, not resumable."""


class ResumableFailure(MigrateError):
    """A link fault after the session started: the receiver keeps it, and so does our state file."""

    resumable = True

    def __init__(self, cause: MigrateError, state_path: str, end_sent: bool = False) -> None:
        verdict = (
            "the receiver may have verified and published DEST before the link dropped (check it); if it still waits, "
            if end_sent
            else ""
        )
        super().__init__(f"{cause}; {verdict}the session can continue: vmmig send --resume (state in {state_path})")
        self.exit_code = cause.exit_code
        self.cause = cause


class ResumeWindowExpired(NetworkError):
    """Nobody resumed the parked session within --resume-window."""


class ResumeKept(MigrateError):
    """The final error of a session left resumable on disk (its exit code is that of the cause)."""


class JoinTimeout(NetworkError):
    """A sender's other channels did not all connect in time: that sender is turned away."""


class Interrupted(MigrateError):
    """A signal asked us to stop; raised in the main thread so cleanup runs."""

    def __init__(self, signum: int, name: str) -> None:
        super().__init__(f"interrupted by {name}")
        self.exit_code = ExitCode.SIGINT if signum == 2 else ExitCode.SIGTERM
