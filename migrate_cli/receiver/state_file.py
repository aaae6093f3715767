"""The receiver's state file: DEST.partial.state names the session that DEST.partial belongs to.

It is written once, atomically, when the session starts. What DEST.partial *holds* is deliberately not recorded:
on a resume the receiver reads DEST.partial back and fingerprints every page (about 0.05 s per GiB here), so the
state can never disagree with the data, and a crash of the receiver loses nothing that reached the file (a torn
page simply hashes differently and is sent again).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import DestinationError, ResumeRefused, StateNotWritable
from ..state_files import (
    STATE_VERSION,
    check_geometry,
    check_session,
    load_state,
    whole,
    write_json_atomically,
)
from ..wire import codec as codecs
from .dest_checks import check_destination_name
from .options import RecvOptions


def receiver_state_path(dest: str) -> str:
    return dest + ".partial.state"


@dataclass(frozen=True)
class ReceiverState:
    session: str  # hex
    image_size: int
    page_size: int
    codec: int
    batch_pages: int

    def save(self, dest: str) -> None:
        try:
            write_json_atomically(
                receiver_state_path(dest), {"version": STATE_VERSION, "created": time.time(), **asdict(self)}
            )
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise StateNotWritable(f"{receiver_state_path(dest)}: {exc.strerror}") from None
            raise DestinationError(f"cannot write {receiver_state_path(dest)}: {exc.strerror}") from None

    @staticmethod
    def load(dest: str) -> ReceiverState:
        """The state of an interrupted migration to DEST (for ``recv --resume``), with a clear error if none.

        Every field is checked as HELLO's are (a tampered file must not reach the destination's arithmetic)."""
        check_destination_name(dest)
        path = receiver_state_path(dest)
        partial = dest + ".partial"
        if not os.path.lexists(partial):
            raise ResumeRefused(f"nothing to resume: no {partial} (start a new migration without --resume)")
        return load_state(
            path,
            ReceiverState.from_json,
            missing=f"{partial} has no state file {path}: it cannot be resumed "
            "(remove it, or use --force to start over)",
            unreadable=lambda reason: f"{path} is unreadable ({reason}): remove it and {partial} to start over",
        )

    @staticmethod
    def from_json(data: dict[str, Any]) -> ReceiverState:
        """The state a file holds; ValueError naming the first field that is not what vmmig writes."""
        image_size, page_size, batch_pages = check_geometry(data)
        codec = whole(data, "codec", 0, 255)
        if codecs.by_wire_id(codec) is None:
            raise ValueError(f"codec id {codec} is not one this receiver knows")
        return ReceiverState(check_session(data), image_size, page_size, codec, batch_pages)

    @staticmethod
    def remove(dest: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(receiver_state_path(dest))

    def mismatch(self, session: bytes, image_size: int, page_size: int, codec: int, batch_pages: int) -> str | None:
        """Why a resuming HELLO does not continue this session, or None when it does."""
        if session.hex() != self.session:
            return f"session {session.hex()[:12]} is not the interrupted session {self.session[:12]} kept here"
        for name, ours, theirs in (
            ("image size", self.image_size, image_size),
            ("page size", self.page_size, page_size),
            ("codec id", self.codec, codec),
            ("batch size (pages)", self.batch_pages, batch_pages),
        ):
            if ours != theirs:
                return f"{name} {theirs} differs from the interrupted session's {ours}"
        return None


def kept_for_stdio(opts: RecvOptions) -> bool:
    """--stdio finds an interrupted session of DEST (DEST.partial and its state): it adopts it, and takes only a
    sender that resumes that very session (handshake.check_resume); --force starts over instead."""
    if not opts.stdio or opts.force or opts.discard or opts.in_place or not opts.destination:
        return False
    return os.path.lexists(opts.destination + ".partial") and os.path.lexists(receiver_state_path(opts.destination))


def hold_state(dest: str, wait: float) -> int:
    """Lock DEST.partial.state for as long as this process lives: two receivers never hold one session (a `recv
    --stdio` a sender's retry started while the one before it still exits waits up to ``wait`` seconds for it)."""
    path = receiver_state_path(dest)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise DestinationError(f"cannot open {path}: {exc.strerror}") from None
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise DestinationError(
                    f"{path} is held by another vmmig recv (still running after {wait:g}s): one receiver per session"
                ) from None
            time.sleep(0.05)


# --- sender ----------------------------------------------------------------------------------------------------
