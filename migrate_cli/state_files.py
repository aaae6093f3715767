"""What both ends' state files share: the JSON format, atomic writes, and the checks every field passes on load.

The sender's file is sender/state_file.py, the receiver's receiver/state_file.py; the RESUME_STATE exchange that
uses them is wire/resume.py. A tampered or truncated file is refused field by field, never half-trusted.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, TypeVar

from .errors import ResumeRefused
from .safefile import read_small, write_atomic
from .wire.frames import MAX_BATCH_BYTES, MAX_BATCH_PAGES, MAX_IMAGE_SIZE, MAX_PAGE_SIZE, check_page_size

T = TypeVar("T")

STATE_VERSION = 1
SESSION_BYTES = 16  # HELLO's session id


def write_json_atomically(path: str, data: dict[str, Any]) -> None:
    """A new file beside ``path`` under an unpredictable name, fsynced and renamed over it (safefile.py): a reader
    sees the old file or the new one, never a torn one, and nothing planted at a temporary name is written into."""
    write_atomic(path, (json.dumps(data, indent=1, sort_keys=True) + "\n").encode(), mode=0o600)


def read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(read_small(path))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
        raise ValueError(f"not a vmmig state file of version {STATE_VERSION}")
    return data


def whole(data: dict[str, Any], name: str, low: int, high: int) -> int:
    """Field ``name`` of a state file: a JSON integer (not a bool, a float or a string) in [low, high]."""
    value = field(data, name)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{name} {value!r} is not a whole number in {low}..{high}")
    return value


def text(data: dict[str, Any], name: str) -> str:
    value = field(data, name)
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} {value!r} is not a non-empty string")
    return value


def field(data: dict[str, Any], name: str) -> Any:
    if name not in data:
        raise ValueError(f"field {name!r} is missing")
    return data[name]


def check_session(data: dict[str, Any]) -> str:
    session = text(data, "session")
    if not re.fullmatch(f"[0-9a-f]{{{2 * SESSION_BYTES}}}", session):
        raise ValueError(f"session {session!r} is not {SESSION_BYTES} bytes in lowercase hex")
    return session


def check_geometry(data: dict[str, Any]) -> tuple[int, int, int]:
    """(image size, page size, batch pages), as HELLO would carry them: a state file is checked like a HELLO."""
    page_size = whole(data, "page_size", 0, MAX_PAGE_SIZE)
    try:
        check_page_size(page_size)
    except ValueError as exc:
        raise ValueError(f"page_size: {exc}") from None
    image_size = whole(data, "image_size", page_size, MAX_IMAGE_SIZE)
    if image_size % page_size:
        raise ValueError(f"image_size {image_size} is not a multiple of page_size {page_size}")
    batch_pages = whole(data, "batch_pages", 1, min(MAX_BATCH_PAGES, MAX_BATCH_BYTES // page_size))
    return image_size, page_size, batch_pages


# --- receiver --------------------------------------------------------------------------------------------------


def load_state(path: str, parse: Callable[[dict[str, Any]], T], missing: str, unreadable: Callable[[str], str]) -> T:
    """A state file parsed, or ResumeRefused: ``missing`` when there is none, ``unreadable(reason)`` when it cannot
    be read, is not JSON, or a field is not what vmmig writes."""
    try:
        return parse(read_json(path))
    except FileNotFoundError:
        raise ResumeRefused(missing) from None
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ResumeRefused(unreadable(reason)) from None
