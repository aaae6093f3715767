"""Which pages of a batch would not compress, told from a sample of their bytes instead of by compressing them.

Why: zlib-ng level 1 spends ~85 MB/s of a core on random or already-compressed pages for a ratio of 0.95, and a
batch that mixes them with text or code used to be compressed whole. On the benchmark's mixed image that was
~75 MB of 1 GiB: 0.9 core-seconds, 40% of all compression work, for nothing.

The test counts the distinct byte values in 128 bytes sampled from each page (4 slices of 32 bytes spread over
it), like btrfs's compression heuristic: uniform random data shows ~101 of 256 (never below ~85 in 40,000 random
pages of the benchmark image); text, x86 code, page tables and zero-padded structures show far fewer (at most 69
there). A page at or above ``THRESHOLD`` is sent raw. A wrong guess costs ratio or time, never correctness: the
receiver decodes each frame by its own encoding byte.
"""

from __future__ import annotations

import itertools

import numpy as np

SLICES = 4  # sampled slices per page
SLICE_BYTES = 32
THRESHOLD = 80  # distinct byte values among the 128 sampled: at or above, the page is taken as incompressible
MIN_RUN = 8  # pages: a shorter run of one kind joins its neighbours (a frame per handful of pages is not worth it)
PROBE_SPACING = 16  # pages between two probes: every 16th page of a batch is tested first (incompressible_batch)


def incompressible(pages: np.ndarray) -> np.ndarray:
    """One bool per row of ``pages`` (uint8, shape (n, page_size)): does the page look incompressible?"""
    count, page_size = pages.shape
    if count == 0:
        return np.zeros(0, dtype=bool)
    stride = page_size // SLICES
    sample = pages.reshape(count, SLICES, stride)[:, :, :SLICE_BYTES].reshape(count, SLICES * SLICE_BYTES)
    # One histogram for the whole batch: page i's byte b lands in bucket i * 256 + b.
    offsets = (np.arange(count, dtype=np.int32) * 256)[:, None]
    histogram = np.bincount((sample + offsets).ravel(), minlength=count * 256).reshape(count, 256)
    return np.count_nonzero(histogram, axis=1) >= THRESHOLD


def incompressible_batch(pages: np.ndarray, spacing: int = PROBE_SPACING) -> np.ndarray:
    """``incompressible`` for a batch, probing every ``spacing``-th page first: when they agree, the batch is taken
    as uniform (most batches are: all text, all code, all random), at a sixteenth of the cost. A run of the other
    kind that slips between two probes is shorter than the spacing, whatever the batch size."""
    count = pages.shape[0]
    verdicts = incompressible(pages[::spacing])
    if verdicts.all() or not verdicts.any():
        return np.full(count, bool(verdicts[0]) if verdicts.size else False)
    return incompressible(pages)


def runs(raw: np.ndarray, min_run: int = MIN_RUN) -> list[tuple[int, int, bool]]:
    """Split pages into runs ``(first, end, raw)`` covering ``0..len(raw)`` in order, adjacent runs of unlike kind.

    A raw run shorter than ``min_run`` is compressed with its neighbours (a few random pages cost less than a
    frame); then a compressible run shorter than ``min_run`` goes raw with its neighbours.
    """
    kinds = np.asarray(raw, dtype=bool).copy()
    for kind in (True, False):
        for first, end, is_raw in _runs(kinds):
            if is_raw == kind and end - first < min_run and end - first < kinds.size:  # a lone run keeps its kind
                kinds[first:end] = not kind
    return _runs(kinds)


def _runs(kinds: np.ndarray) -> list[tuple[int, int, bool]]:
    if kinds.size == 0:
        return []
    edges = [0, *(np.flatnonzero(kinds[1:] != kinds[:-1]) + 1).tolist(), kinds.size]
    return [(first, end, bool(kinds[first])) for first, end in itertools.pairwise(edges)]
