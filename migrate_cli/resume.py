"""Resumable sessions: the state files that outlive a dropped link or a killed process, and the RESUME_STATE exchange.

Receiver: ``DEST.partial.state`` beside DEST.partial names the session (id, image size, page size, codec, batch).
It is written once, atomically, when the session starts. What DEST.partial *holds* is deliberately not recorded:
on a resume the receiver reads DEST.partial back and fingerprints every page (about 0.05 s per GiB here), so the
state can never disagree with the data, and a crash of the receiver loses nothing that reached the file (a torn
page simply hashes differently and is sent again).

Sender: a small JSON file, by default ``$XDG_STATE_HOME/vmmig/send-<key>.json`` (``~/.local/state`` without the
variable; ``<key>`` hashes the source's real path), or ``--state-file``. It holds the session
id and what identifies the source and the options, so that ``vmmig send --resume`` after a kill -9 continues the
same session and refuses another image or other options.

The exchange (docs/PROTOCOL.md): a resuming sender sets FEATURE_RESUME in HELLO with the old session id; after
WELCOME the receiver sends its fingerprints in RESUME_STATE frames; the sender takes them as "what was sent" and
its normal dirty scan then sends exactly the pages that are missing or differ. The end digest is unchanged.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import codec as codecs
from .destination import check_destination_name
from .errors import DestinationError, ProtocolError, ResumeRefused, UsageError
from .image import check_page_size
from .protocol import MAX_BATCH_BYTES, MAX_BATCH_PAGES, MAX_IMAGE_SIZE, MAX_PAGE_SIZE, RESUME_CHUNK_PAGES, ResumeState
from .safefile import read_small, write_atomic

STATE_VERSION = 1
SESSION_BYTES = 16  # HELLO's session id


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """A new file beside ``path`` under an unpredictable name, fsynced and renamed over it (safefile.py): a reader
    sees the old file or the new one, never a torn one, and nothing planted at a temporary name is written into."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


def _read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(read_small(path))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a vmmig state file of version {STATE_VERSION}")
    return data


def _whole(data: dict[str, Any], name: str, low: int, high: int) -> int:
    """Field ``name`` of a state file: a JSON integer (not a bool, a float or a string) in [low, high]."""
    value = _field(data, name)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {value!r} is not a whole number in {low}..{high}")
    return value


def _text(data: dict[str, Any], name: str) -> str:
    value = _field(data, name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} {value!r} is not a non-empty string")
    return value


def _field(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"field {name!r} is missing")
    return data[name]


def _check_session(data: dict[str, Any]) -> str:
    session = _text(data, "session")
    if not re.fullmatch(f"[0-9a-f]{{{2 * SESSION_BYTES}}}", session):
        raise ValueError(f"session {session!r} is not {SESSION_BYTES} bytes in lowercase hex")
    return session


def _check_geometry(data: dict[str, Any]) -> tuple[int, int, int]:
    """(image size, page size, batch pages), as HELLO would carry them: a state file is checked like a HELLO."""
    page_size = _whole(data, "page_size", 0, MAX_PAGE_SIZE)
    try:
        check_page_size(page_size)
    except ValueError as exc:
        raise ValueError(f"page_size: {exc}") from None
    image_size = _whole(data, "image_size", page_size, MAX_IMAGE_SIZE)
    if image_size % page_size:
        raise ValueError(f"image_size {image_size} is not a multiple of page_size {page_size}")
    batch_pages = _whole(data, "batch_pages", 1, min(MAX_BATCH_PAGES, MAX_BATCH_BYTES // page_size))
    return image_size, page_size, batch_pages


# --- receiver --------------------------------------------------------------------------------------------------


class StateNotWritable(DestinationError):
    """DEST's file system takes no ordinary files (hugetlbfs refuses write(2)): the migration runs, not resumable."""


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
        try:
            return ReceiverState.from_json(_read_json(path))
        except FileNotFoundError:
            raise ResumeRefused(
                f"{partial} has no state file {path}: it cannot be resumed (remove it, or use --force to start over)"
            ) from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ResumeRefused(f"{path} is unreadable ({reason}): remove it and {partial} to start over") from None

    @staticmethod
    def from_json(data: dict[str, Any]) -> ReceiverState:
        """The state a file holds; ValueError naming the first field that is not what vmmig writes."""
        image_size, page_size, batch_pages = _check_geometry(data)
        codec = _whole(data, "codec", 0, 255)
        if codecs.by_wire_id(codec) is None:
            raise ValueError(f"codec id {codec} is not one this receiver knows")
        return ReceiverState(_check_session(data), image_size, page_size, codec, batch_pages)

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


# --- sender ----------------------------------------------------------------------------------------------------


def default_sender_state_path(source: str) -> str:
    """One state file per source image: the receiver may come back on another address."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(Path.home(), ".local", "state")
    key = hashlib.sha256(os.path.realpath(source).encode()).hexdigest()[:16]
    return os.path.join(base, "vmmig", f"send-{key}.json")


@dataclass(frozen=True)
class SenderState:
    session: str  # hex
    source: str  # the path as given
    device: int
    inode: int
    image_size: int
    page_size: int
    codec: str  # as given: zlib, zstd, none or auto
    level: int
    batch_pages: int
    destination: str

    def save(self, path: str) -> None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(path)), mode=0o700, exist_ok=True)
            write_json_atomically(path, {"version": STATE_VERSION, "created": time.time(), **asdict(self)})
        except OSError as exc:
            raise UsageError(f"cannot write the resume state file {path}: {exc.strerror} (see --state-file)") from None

    @staticmethod
    def load(path: str, source: str, destination: str) -> SenderState:
        try:
            return SenderState.from_json(_read_json(path))
        except FileNotFoundError:
            raise ResumeRefused(
                f"no interrupted migration of {source} to {destination} to resume (no state file {path}; "
                "run without --resume to start over)"
            ) from None
        except (OSError, ValueError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else str(exc)
            raise ResumeRefused(f"resume state file {path} is unreadable ({reason}): run without --resume") from None

    @staticmethod
    def from_json(data: dict[str, Any]) -> SenderState:
        """The state a file holds; ValueError naming the first field that is not what vmmig writes."""
        unknown = set(data) - {"version", "created", *SenderState.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        image_size, page_size, batch_pages = _check_geometry(data)
        codec = _text(data, "codec")
        if codec not in (*codecs.names(), "auto"):
            raise ValueError(f"codec {codec!r} is not one of {', '.join(codecs.names())}, auto")
        return SenderState(
            session=_check_session(data), source=_text(data, "source"),
            device=_whole(data, "device", 0, 2**64 - 1), inode=_whole(data, "inode", 0, 2**64 - 1),
            image_size=image_size, page_size=page_size, codec=codec, level=_whole(data, "level", 0, 255),
            batch_pages=batch_pages, destination=_text(data, "destination"),
        )  # fmt: skip

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    @staticmethod
    def read_raw(path: str) -> bytes | None:
        try:
            return read_small(path)
        except OSError:
            return None

    @staticmethod
    def write_raw(path: str, data: bytes) -> None:
        """Put back the state file a new session replaced (as it was, byte for byte)."""
        with contextlib.suppress(OSError):
            write_atomic(path, data, mode=0o600)

    def check_same(self, other: SenderState) -> None:
        """Refuse to resume with another image or other options than the interrupted session had."""
        for name, ours, theirs in (
            ("source file", (self.device, self.inode), (other.device, other.inode)),
            ("image size", self.image_size, other.image_size),
            ("--page-size", self.page_size, other.page_size),
            ("--compress", self.codec, other.codec),
            ("--level", self.level, other.level),
            ("--batch-size (pages)", self.batch_pages, other.batch_pages),
        ):
            if ours != theirs:
                raise ResumeRefused(
                    f"cannot resume: the interrupted migration had {name} {ours}, this one {theirs} "
                    "(resume with the same source and options, or run without --resume to start over)"
                )


# --- the RESUME_STATE exchange (sans-IO) -------------------------------------------------------------------------


def resume_frames(fingerprints: np.ndarray) -> Iterator[ResumeState]:
    """The receiver's fingerprints as RESUME_STATE frames, in page order, the last one flagged."""
    pages = len(fingerprints)
    for first in range(0, pages, RESUME_CHUNK_PAGES):
        chunk = fingerprints[first : first + RESUME_CHUNK_PAGES]
        yield ResumeState(first, chunk, first + len(chunk) >= pages)


class ResumeCollector:
    """Assembles RESUME_STATE frames into the receiver's fingerprint array, refusing gaps, overlaps and overruns."""

    def __init__(self, pages: int) -> None:
        self.fingerprints = np.zeros(pages, dtype=np.uint64)
        self._next = 0
        self.done = False

    def add(self, frame: ResumeState) -> bool:
        count = len(frame.fingerprints)
        if self.done or frame.first != self._next or count > len(self.fingerprints) - frame.first:
            raise ProtocolError(
                f"RESUME_STATE for pages {frame.first}..{frame.first + count - 1} out of order "
                f"(expected page {self._next} of {len(self.fingerprints)})"
            )
        self.fingerprints[frame.first : frame.first + count] = frame.fingerprints
        self._next += count
        if frame.last != (self._next == len(self.fingerprints)):
            raise ProtocolError("RESUME_STATE frames end before or after the last page")
        self.done = frame.last
        return self.done
