"""The sender's state file: what ``vmmig send --resume`` needs to continue a session after a kill -9.

A small JSON file, by default ``$XDG_STATE_HOME/vmmig/send-<key>.json`` (``~/.local/state`` without the
variable; ``<key>`` hashes the source's real path), or ``--state-file``. It holds the session id and what
identifies the source and the options, so that a resume continues the same session and refuses another image or
other options.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import ResumeRefused, UsageError
from ..safefile import read_small, write_atomic
from ..state_files import (
    STATE_VERSION,
    check_geometry,
    check_session,
    load_state,
    text,
    whole,
    write_json_atomically,
)
from ..wire import codec as codecs


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
        return load_state(
            path,
            SenderState.from_json,
            missing=f"no interrupted migration of {source} to {destination} to resume (no state file {path}; "
            "run without --resume to start over)",
            unreadable=lambda reason: f"resume state file {path} is unreadable ({reason}): run without --resume",
        )

    @staticmethod
    def from_json(data: dict[str, Any]) -> SenderState:
        """The state a file holds; ValueError naming the first field that is not what vmmig writes."""
        unknown = set(data) - {"version", "created", *SenderState.__dataclass_fields__}
        if unknown:
            raise ValueError(f"unknown field {sorted(unknown)[0]!r}")
        image_size, page_size, batch_pages = check_geometry(data)
        codec = text(data, "codec")
        if codec not in (*codecs.names(), "auto"):
            raise ValueError(f"codec {codec!r} is not one of {', '.join(codecs.names())}, auto")
        return SenderState(
            session=check_session(data), source=text(data, "source"),
            device=whole(data, "device", 0, 2**64 - 1), inode=whole(data, "inode", 0, 2**64 - 1),
            image_size=image_size, page_size=page_size, codec=codec, level=whole(data, "level", 0, 255),
            batch_pages=batch_pages, destination=text(data, "destination"),
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
