"""The RESUME_STATE exchange, sans-IO (docs/PROTOCOL.md, Resume).

A resuming sender sets FEATURE_RESUME in HELLO with the old session id; after WELCOME the receiver sends its
fingerprints in RESUME_STATE frames; the sender takes them as "what was sent" and its normal dirty scan then sends
exactly the pages that are missing or differ. The end digest is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..errors import ProtocolError
from .frames import RESUME_CHUNK_PAGES, ResumeState


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
