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
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DestinationError, ProtocolError, ResumeRefused, UsageError
from .protocol import RESUME_CHUNK_PAGES, ResumeState

STATE_VERSION = 1


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """Temp file, fsync, rename, fsync the directory: a reader sees the old file or the new one, never a torn one."""
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode())
        os.fsync(fd)
    except OSError:
        os.unlink(tmp)
        raise
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _read_json(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a vmmig state file of version {STATE_VERSION}")
    return data


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
        """The state of an interrupted migration to DEST (for ``recv --resume``), with a clear error if none."""
        path = receiver_state_path(dest)
        partial = dest + ".partial"
        if not os.path.lexists(partial):
            raise ResumeRefused(f"nothing to resume: no {partial} (start a new migration without --resume)")
        try:
            data = _read_json(path)
            return ReceiverState(
                str(data["session"]), int(data["image_size"]), int(data["page_size"]), int(data["codec"]),
                int(data["batch_pages"]),
            )  # fmt: skip
        except FileNotFoundError:
            raise ResumeRefused(
                f"{partial} has no state file {path}: it cannot be resumed (remove it, or use --force to start over)"
            ) from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ResumeRefused(f"{path} is unreadable ({exc}): remove it and DEST.partial to start over") from None

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
            data = _read_json(path)
            data.pop("version", None)
            data.pop("created", None)
            return SenderState(**data)
        except FileNotFoundError:
            raise ResumeRefused(
                f"no interrupted migration of {source} to {destination} to resume (no state file {path}; "
                "run without --resume to start over)"
            ) from None
        except (OSError, ValueError, TypeError) as exc:
            raise ResumeRefused(f"resume state file {path} is unreadable ({exc}): run without --resume") from None

    @staticmethod
    def remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    @staticmethod
    def read_raw(path: str) -> bytes | None:
        try:
            with open(path, "rb") as fh:
                return fh.read()
        except OSError:
            return None

    @staticmethod
    def write_raw(path: str, data: bytes) -> None:
        with contextlib.suppress(OSError):
            write_json_atomically(path, json.loads(data))

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
