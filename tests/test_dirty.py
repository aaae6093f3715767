"""Dirty tracking: every page that differs from what was sent is found, including writes made during a scan."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from migrate_cli.sender.dirty import (
    PAGEMAP_PRESENT,
    PAGEMAP_SOFT_DIRTY,
    FingerprintTracker,
    read_pagemap,
    soft_dirty_pages,
    soft_dirty_supported,
)
from migrate_cli.sender.pipeline import all_ranges, batch_ranges
from migrate_cli.wire.digest import fingerprint_image, fingerprint_pages, zero_fingerprint

PS = 4096


def image(pages: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=pages * PS, dtype=np.uint8)
    data[: 10 * PS] = 0
    return data


def test_a_fresh_tracker_reports_nothing_when_live_equals_sent() -> None:
    data = image(256)
    tracker = FingerprintTracker(data, PS, fingerprint_image(data, PS))
    assert tracker.scan().size == 0


def test_every_changed_page_is_found_and_nothing_else() -> None:
    data = image(512)
    sent = fingerprint_image(data, PS)
    tracker = FingerprintTracker(data, PS, sent, threads=2)
    changed = [0, 3, 4, 100, 511]
    for page in changed:
        data[page * PS + 17] ^= 0xFF  # one byte is enough
    data[200 * PS : 201 * PS] = 0  # a page that became zero
    assert tracker.scan().tolist() == sorted([*changed, 200])


def test_a_page_changed_back_to_what_was_sent_is_clean() -> None:
    data = image(64)
    sent = fingerprint_image(data, PS)
    original = data[5 * PS : 6 * PS].copy()
    data[5 * PS : 6 * PS] = 7
    tracker = FingerprintTracker(data, PS, sent)
    assert tracker.scan().tolist() == [5]
    data[5 * PS : 6 * PS] = original
    assert tracker.scan().size == 0


def test_writes_during_a_scan_are_caught_by_the_next_scan() -> None:
    """A writer races the scanner; after it stops, one more scan finds every page that differs from 'sent'."""
    data = image(4096, seed=3)
    sent = fingerprint_image(data, PS)
    tracker = FingerprintTracker(data, PS, sent, threads=2)
    stop = threading.Event()
    written: set[int] = set()

    def writer() -> None:
        rng = np.random.default_rng(9)
        while not stop.is_set():
            page = int(rng.integers(0, 4096))
            data[page * PS : (page + 1) * PS] = rng.integers(1, 255, dtype=np.uint8)
            written.add(page)

    thread = threading.Thread(target=writer)
    thread.start()
    for _ in range(3):
        tracker.scan()
    stop.set()
    thread.join()
    found = set(tracker.scan().tolist())
    assert found == written


def test_fingerprints_of_zero_pages_are_the_constant() -> None:
    out = np.empty(2, dtype=np.uint64)
    fingerprint_pages(bytes(2 * PS), PS, out)
    assert out.tolist() == [zero_fingerprint(PS)] * 2


def test_dirty_pages_travel_in_full_batches_contiguous_or_listed() -> None:
    pages = np.array([0, 1, 2, 3, 4, 10, 12, 13, 99])
    batches = batch_ranges(pages, 3)
    assert batches[0] == (0, 3)  # consecutive pages: a PAGES range
    assert [b.tolist() for b in batches[1:] if isinstance(b, np.ndarray)] == [[3, 4, 10], [12, 13, 99]]
    assert batch_ranges(np.array([], dtype=np.int64), 8) == []
    scattered = np.arange(0, 1000, 7)
    assert all(len(b) == 64 for b in batch_ranges(scattered, 64)[:-1]), "scattered pages fill whole batches"
    assert all_ranges(10, 4) == [(0, 4), (4, 4), (8, 2)]


def test_pagemap_reader_reads_entries_and_soft_dirty_bits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    entries = np.zeros(64, dtype="<u8")
    entries[:] = PAGEMAP_PRESENT | 0x1234
    entries[[3, 7, 40]] |= PAGEMAP_SOFT_DIRTY
    path = tmp_path / "pagemap"
    path.write_bytes(b"\x00" * 8 * 100 + entries.tobytes())  # the mapping starts at virtual page 100
    read = read_pagemap(path, 100, 64)
    assert read.tolist() == entries.tolist()
    assert soft_dirty_pages(read).tolist() == [3, 7, 40]
    with pytest.raises(OSError, match="short read"):
        read_pagemap(path, 150, 64)


def test_soft_dirty_probe_answers_without_raising() -> None:
    # This machine's kernel has no soft-dirty tracking (the probe says False); others may say True.
    assert soft_dirty_supported() in (True, False)
