"""Runs of consecutive pages: one system call, one hash call or one buffer per run instead of per page."""

from __future__ import annotations

import itertools

import numpy as np


def run_bounds(pages: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) index bounds of each run of consecutive numbers in sorted ``pages``."""
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    return list(itertools.pairwise([0, *breaks.tolist(), pages.size])) if pages.size else []


def true_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[lo, hi) bounds of each run of True in a bool array."""
    edges = np.flatnonzero(np.diff(np.concatenate(([False], mask, [False])).view(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
