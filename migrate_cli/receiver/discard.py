"""`recv --discard`: a destination that keeps nothing (measures the link and the pipeline, verifies all the same)."""

from __future__ import annotations

import numpy as np

from ..wire.digest import fingerprint_pages, image_digest, zero_fingerprint
from ..wire.frames import Pages
from .destination import fingerprint_array
from .page_check import check_landed


class DiscardSink:
    """`recv --discard`: decode and check everything, keep nothing but one fingerprint per page.

    Workers fingerprint each decoded page as they would write it; the digest is computed from those. Later passes
    overwrite earlier fingerprints (the PASS_END barrier orders them), exactly as they would overwrite pages.
    """

    dest = "(discarded)"

    def __init__(self, size: int, page_size: int) -> None:
        self.size = size
        self.page_size = page_size
        self.pages = size // page_size
        self.fingerprints = fingerprint_array(self.pages, zero_fingerprint(page_size), "(discard)")
        self._zero = zero_fingerprint(page_size)

    fd = -1

    def landing_runs(self, frame: Pages) -> None:
        """Nothing is landed: the data is read and fingerprinted."""
        return None

    def write_at(self, data: bytes, offset: int) -> None:
        raise AssertionError("a discarding receiver lands nothing")

    def write_batch(self, frame: Pages, data: bytes | memoryview, landed: bool = False) -> None:
        ids, count = frame.index_array(), frame.count
        zero = np.unpackbits(np.frombuffer(frame.zero_bitmap, np.uint8), count=count, bitorder="little").astype(bool)
        self.fingerprints[ids[zero]] = self._zero
        normal = int(count - np.count_nonzero(zero))
        if normal:
            out = np.empty(normal, dtype=np.uint64)
            fingerprint_pages(np.frombuffer(data, dtype=np.uint8), self.page_size, out)
            self.fingerprints[ids[~zero]] = out
            check_landed(ids[~zero], out, frame.fingerprint_array())

    def digest(self, threads: int) -> bytes:
        return image_digest(self.fingerprints)

    def flush(self) -> None:
        pass

    def publish(self, force: bool = False) -> None:
        pass

    def discard(self, keep_partial: bool = False) -> None:
        pass

    def close(self) -> None:
        pass
