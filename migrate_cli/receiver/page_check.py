"""The receiver's check of every page it lands, the one check on page data (protocol 3).

What DEST holds at a page is fingerprinted right after the page is written, read back from DEST itself (the same
pass keeps the digest current: destination.py); that must equal the fingerprint the sender took of the page and
sent in the frame. A decoding error, a flipped bit in a raw page or a source that changed while it was sent all
end here, naming the first page that differs.
"""

from __future__ import annotations

import numpy as np

from ..errors import CorruptFrame


def check_landed(pages: np.ndarray, landed: np.ndarray, sent: np.ndarray) -> None:
    """``landed[i]`` is the fingerprint of what now holds page ``pages[i]``, ``sent[i]`` the sender's of it."""
    bad = np.flatnonzero(landed != sent)
    if bad.size:
        more = f" (and {bad.size - 1} more of its batch)" if bad.size > 1 else ""
        raise CorruptFrame(
            f"page {int(pages[bad[0]])}{more} does not match the fingerprint the sender took of it: "
            "damaged in transit, or the source changed while it was sent"
        )


def undecodable(frame_pages: np.ndarray, cause: Exception) -> CorruptFrame:
    """A batch whose data does not decode is damage too (its CRC no longer covers the data): resumable the same way."""
    return CorruptFrame(f"batch of pages {int(frame_pages[0])}..{int(frame_pages[-1])}: {cause}")
