"""What the receiver holds, as the sender knows it: per page, the fingerprint of the copy that went on the wire.

One owner for the array (digest.py fingerprints). The pipeline's workers record each batch's pages (disjoint
slices, so no lock), a resumed session replaces it whole with what the receiver reported (RESUME_STATE), the dirty
trackers compare the live image against it, and the end digest is taken from it (or from the tracker's live
fingerprints when a live migration ended with a paused scan). It is the hot path: ``record`` writes in place, no
copy, no lock.
"""

from __future__ import annotations

import numpy as np

from ..wire.digest import image_digest


class ReceiverCopy:
    def __init__(self, pages: int) -> None:
        self._fps = np.empty(pages, dtype=np.uint64)
        # The pages recorded since the pass began: what a receiver's failed page check may be about (blame_source).
        self._this_pass = np.zeros(pages, dtype=bool)

    def __len__(self) -> int:
        return self._fps.size

    def record(self, pages: np.ndarray | slice, fingerprints: np.ndarray | np.uint64) -> None:
        """Pages just encoded for the wire (a worker's own batch: disjoint from every other worker's)."""
        self._fps[pages] = fingerprints
        self._this_pass[pages] = True

    def begin_pass(self) -> None:
        self._this_pass[:] = False

    def recorded_this_pass(self) -> np.ndarray:
        """Page numbers recorded since ``begin_pass`` (sorted)."""
        return np.flatnonzero(self._this_pass)

    def replace_from(self, reported: np.ndarray) -> None:
        """A resumed session: the receiver's RESUME_STATE says what DEST.partial holds."""
        self._fps[:] = reported

    def as_array(self) -> np.ndarray:
        """The array itself, for the dirty trackers to compare against (read only: never written through)."""
        return self._fps

    def differing(self, live: np.ndarray) -> int:
        """How many pages of ``live`` (one fingerprint per page) differ from what the receiver holds."""
        return int(np.count_nonzero(live != self._fps))

    def digest(self) -> bytes:
        return image_digest(self._fps)
