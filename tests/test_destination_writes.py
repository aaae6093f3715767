"""DestinationImage.write_batch on bytes: zero pages over old content become zeros, run by run."""

from pathlib import Path

import numpy as np

from migrate_cli.receiver.destination import ZERO_CHUNK, InPlaceDestination, run_bounds
from migrate_cli.wire.frames import Encoding, Pages

from .encoded import fingerprinted

PAGE = 4096


def test_run_bounds_splits_sorted_pages_into_consecutive_runs() -> None:
    assert run_bounds(np.array([1, 2, 3, 7, 9, 10])) == [(0, 3), (3, 4), (4, 6)]
    assert run_bounds(np.array([5])) == [(0, 1)]
    assert run_bounds(np.array([], dtype=np.int64)) == []


def test_zero_pages_over_old_content_are_zeroed_in_runs_longer_than_one_zero_chunk(tmp_path: Path) -> None:
    pages = 3 * ZERO_CHUNK // PAGE + 5  # a zero run that needs several writes
    path = tmp_path / "dest.ram"
    path.write_bytes(b"\xee" * (pages * PAGE))
    dest = InPlaceDestination(str(path), pages * PAGE, PAGE)
    try:
        data = np.full(PAGE, 7, dtype=np.uint8).tobytes()  # page 0 holds data, every other page is zero
        bitmap = np.packbits(np.arange(pages) != 0, bitorder="little").tobytes()
        dest.write_batch(fingerprinted(Pages(0, pages, Encoding.RAW, bitmap, data)), data)
        dest.flush()
    finally:
        dest.close()
    written = path.read_bytes()
    assert written[:PAGE] == data and written[PAGE:] == bytes((pages - 1) * PAGE)


def test_zero_pages_of_a_page_list_are_zeroed(tmp_path: Path) -> None:
    path = tmp_path / "dest.ram"
    path.write_bytes(b"\xee" * (16 * PAGE))
    dest = InPlaceDestination(str(path), 16 * PAGE, PAGE)
    try:
        ids = np.array([1, 2, 3, 8, 9, 15], dtype=">u8")
        zero = np.array([True, True, False, True, True, True])
        data = np.full(PAGE, 9, dtype=np.uint8).tobytes()
        bitmap = np.packbits(zero, bitorder="little").tobytes()
        dest.write_batch(fingerprinted(Pages(1, len(ids), Encoding.RAW, bitmap, data, ids.tobytes())), data)
        dest.flush()
    finally:
        dest.close()
    pages = np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(16, PAGE)
    assert not pages[[1, 2, 8, 9, 15]].any() and (pages[3] == 9).all()
    assert (pages[[0, 4, 5, 6, 7, 10, 11, 12, 13, 14]] == 0xEE).all()  # pages outside the list stay untouched
