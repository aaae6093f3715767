"""Sparse sources and special files as IMAGE.

- A page that lies entirely in a hole of a sparse image (lseek SEEK_DATA/SEEK_HOLE) is a zero page without being
  read: a 2 GiB image holding a few MiB neither fills the page cache nor (on tmpfs, a memfd) allocates its holes,
  while the frames on the wire, the statistics and the digest are exactly those of the same image read whole.
- A FIFO (or anything but a regular file, memfd or block device) is refused at once, exit 3, before any open that
  could block.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from migrate_cli.sender.dirty import FingerprintTracker
from migrate_cli.sender.holes import BYTES_PER_EXTENT, MIN_HOLE, HoleMap, data_extents
from migrate_cli.sender.pipeline import Batch
from migrate_cli.sender.source import SourceImage
from migrate_cli.wire.digest import fingerprint_image, zero_fingerprint

from .conftest import Processes, json_report, last_line
from .encoded import encode_batches

PAGE = 4096
MIB = 1 << 20


def write_extents(fd: int, extents: dict[int, bytes]) -> None:
    for offset, data in extents.items():
        os.pwrite(fd, data, offset)


def guest_data(size: int, seed: int) -> bytes:
    """Random pages with a zero page and a page of text inside: data extents hold zero pages too."""
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size, dtype=np.uint8)
    data[2 * PAGE : 3 * PAGE] = 0
    data[5 * PAGE : 6 * PAGE] = np.frombuffer((b"guest kernel text\n" * 228)[:PAGE], dtype=np.uint8)
    return data.tobytes()


def make_sparse(path: Path, size: int, extents: dict[int, bytes]) -> Path:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        write_extents(fd, extents)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def nonzero_pages(extents: dict[int, bytes]) -> int:
    return sum(
        int(np.count_nonzero(np.frombuffer(d, np.uint64).reshape(-1, PAGE // 8).any(axis=1))) for d in extents.values()
    )


def cached_bytes(path: Path) -> int:
    """How much of ``path`` is in the page cache (mincore(2) over a mapping that is never touched)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = path.stat().st_size
    vec = np.zeros(-(-size // mmap.PAGESIZE), dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            assert libc.mincore(address, size, vec.ctypes.data) == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(address, size)
    finally:
        os.close(fd)
    return int(np.count_nonzero(vec & 1)) * mmap.PAGESIZE


def evict(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# --- the hole map ---------------------------------------------------------------------------------------------------


def test_a_hole_map_gives_the_data_runs_of_any_range_and_a_mask_of_any_pages() -> None:
    holes = HoleMap(np.array([[10, 20], [30, 31]]))
    assert holes.sparse
    assert holes.runs(0, 10) == []
    assert holes.runs(0, 100) == [(10, 20), (30, 31)]
    assert holes.runs(15, 30) == [(15, 20)]
    assert holes.runs(12, 14) == [(12, 14)]
    assert holes.runs(19, 31) == [(19, 20), (30, 31)]
    assert holes.mask(np.array([9, 10, 19, 20, 30, 31])).tolist() == [False, True, True, False, True, False]
    assert holes.mask(np.array([11, 30])) is None  # all data: nothing to skip
    assert not HoleMap(None).sparse and HoleMap(None).runs(5, 9) == [(5, 9)]


def test_data_extents_name_the_pages_holding_data_and_nothing_for_a_file_without_holes(tmp_path: Path) -> None:
    sparse = make_sparse(tmp_path / "sparse.img", 64 * MIB, {PAGE * 3 + 100: b"x" * PAGE, 40 * MIB: b"y" * MIB})
    full = tmp_path / "full.img"
    full.write_bytes(b"z" * 4 * MIB)
    with open(sparse, "rb") as fh:
        extents = data_extents(fh.fileno(), 64 * MIB, PAGE)
    assert extents is not None
    # A write across two pages makes both data pages; the file system may round to its block size, never down.
    first = extents[0].tolist()
    assert first[0] <= 3 and first[1] >= 5 and first[1] <= 16
    assert [40 * MIB // PAGE, 41 * MIB // PAGE] in extents.tolist()
    with open(full, "rb") as fh:
        assert data_extents(fh.fileno(), 4 * MIB, PAGE) is None
    with open(tmp_path / "empty.img", "wb") as fh:
        fh.truncate(8 * MIB)
    with open(tmp_path / "empty.img", "rb") as fh:
        assert data_extents(fh.fileno(), 8 * MIB, PAGE).tolist() == []  # type: ignore[union-attr]


def test_small_holes_are_read_and_a_finely_fragmented_file_is_walked_only_so_far(tmp_path: Path) -> None:
    """A hole shorter than MIN_HOLE between two extents is not worth skipping; past one extent per BYTES_PER_EXTENT
    on average the walk stops and the rest of the file counts as data."""
    near = make_sparse(tmp_path / "near.img", 8 * MIB, {0: b"a" * PAGE, MIN_HOLE - PAGE: b"b" * PAGE})
    with open(near, "rb") as fh:
        assert data_extents(fh.fileno(), 8 * MIB, PAGE).tolist() == [[0, MIN_HOLE // PAGE]]  # type: ignore[union-attr]
    step = MIN_HOLE + PAGE
    size = 1100 * step
    fragmented = make_sparse(tmp_path / "fragmented.img", size, {i * step: b"c" * PAGE for i in range(1100)})
    assert size // BYTES_PER_EXTENT < 1024  # the walk's budget is its floor: 1024 extents
    with open(fragmented, "rb") as fh:
        extents = data_extents(fh.fileno(), size, PAGE)
    assert extents is not None and len(extents) == 1024
    assert extents[-1].tolist() == [1023 * step // PAGE, size // PAGE]


def encode(path: Path, batches: list[Batch], codec: str = "zstd") -> tuple[list[bytes], np.ndarray]:
    """Every frame's bytes (header and CRC included) and the pipeline's fingerprints after encoding ``batches``."""
    encoded, fingerprints = encode_batches(path, codec, batches, threads=2, batch_pages=64)
    return sorted(b"".join(batch.parts) for batch in encoded), fingerprints


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_the_frames_of_a_sparse_image_are_those_of_the_same_image_read_whole(tmp_path: Path, codec: str) -> None:
    """Batches entirely in a hole, partly in one, and wholly data; ranges and scattered pages: same bytes on the
    wire, same fingerprints, as from a copy of the image without holes."""
    extents = {
        0: guest_data(70 * PAGE, 1),
        200 * PAGE + 100: guest_data(20 * PAGE, 2),
        1000 * PAGE: guest_data(24 * PAGE, 3),
    }
    sparse = make_sparse(tmp_path / "sparse.img", 1024 * PAGE, extents)
    dense = tmp_path / "dense.img"
    dense.write_bytes(sparse.read_bytes())
    assert os.stat(sparse).st_blocks * 512 < 256 * PAGE and os.stat(dense).st_blocks * 512 >= 1024 * PAGE
    batches: list[Batch] = [(s, 64) for s in range(0, 1024, 64)]
    batches += [np.array([1, 2, 90, 201, 202, 500, 1001]), np.array([300, 301, 700]), np.array([1010, 1011])]
    sparse_frames, sparse_fps = encode(sparse, batches, codec)
    dense_frames, dense_fps = encode(dense, batches, codec)
    assert sparse_frames == dense_frames
    assert np.array_equal(sparse_fps, dense_fps)
    assert np.array_equal(sparse_fps, fingerprint_image(np.fromfile(dense, np.uint8), PAGE))


def test_a_dirty_scan_reads_only_data_and_sees_a_hole_filled_since_the_last_scan(tmp_path: Path) -> None:
    sparse = make_sparse(tmp_path / "sparse.img", 4096 * PAGE, {100 * PAGE: guest_data(8 * PAGE, 4)})
    with SourceImage(str(sparse)) as source:
        sent = fingerprint_image(source.array, PAGE)
        tracker = FingerprintTracker(source.array, PAGE, sent, 2, source.check_size, source.data_extents)
        assert tracker.scan().size == 0
        assert np.array_equal(tracker.live_fingerprints(), sent)
        assert tracker.live_fingerprints()[3000] == zero_fingerprint(PAGE)
        with open(sparse, "r+b") as fh:
            fh.seek(3000 * PAGE + 7)
            fh.write(b"\x01")
        assert tracker.scan().tolist() == [3000]


# --- real processes -----------------------------------------------------------------------------------------------


def test_a_sparse_image_on_disk_is_sent_without_reading_its_holes(procs: Processes, tmp_path: Path) -> None:
    """2 GiB holding 4 MiB in three extents (one unaligned to any batch): the copy verifies, holes count as zero
    pages, and the sender brings into the page cache about what holds data, not 2 GiB of zeros."""
    size = 2 << 30
    extents = {0: guest_data(MIB, 5), 700 * MIB + 3 * PAGE: guest_data(2 * MIB, 6), size - MIB: guest_data(MIB, 7)}
    source = make_sparse(tmp_path / "sparse.img", size, extents)
    with open(source, "rb") as fh:
        if data_extents(fh.fileno(), size, PAGE) is None:
            pytest.skip("the file system of tmp_path reports no holes")
    evict(source)
    assert cached_bytes(source) < 8 * MIB
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--sparse", "--json")
    code, out, err = procs.send(source, recv.address, "--json").wait(120)
    assert code == 0, err
    recv_code, recv_out, recv_err = recv.wait(120)
    assert recv_code == 0, recv_err
    sent, received = json_report(out), json_report(recv_out)
    assert sent["digest"] == received["digest"]
    normal = nonzero_pages(extents)
    assert sent["normal"] == normal and sent["duplicate"] == size // PAGE - normal
    # Data and the kernel's read-around of it: some MiB (the read-ahead window is 128 KiB to a few MiB), never 2 GiB.
    assert cached_bytes(source) < size // 8, "the sender read the holes of the image"
    assert dest.stat().st_size == size
    with open(dest, "rb") as fh:
        for offset, data in extents.items():
            fh.seek(offset)
            assert fh.read(len(data)) == data
        fh.seek(300 * MIB)
        assert fh.read(MIB) == bytes(MIB)


def test_a_sparse_memfd_stays_sparse(procs: Processes, tmp_path: Path) -> None:
    """tmpfs allocates a page for every hole page read through a mapping: sending a sparse memfd must not turn
    512 MiB of holes into 512 MiB of memory."""
    size = 512 * MIB
    extents = {4 * MIB: guest_data(MIB, 8), 300 * MIB + 5 * PAGE: guest_data(MIB, 9)}
    fd = os.memfd_create("sparse-guest-ram")
    try:
        os.ftruncate(fd, size)
        write_extents(fd, extents)
        allocated = os.fstat(fd).st_blocks * 512
        assert allocated < 8 * MIB
        recv = procs.recv(tmp_path / "dest.img", "--sparse", "--json")
        code, out, err = procs.send(Path(f"/proc/{os.getpid()}/fd/{fd}"), recv.address, "--json").wait(120)
        assert code == 0, err
        recv_code, recv_out, recv_err = recv.wait(120)
        assert recv_code == 0, recv_err
        assert json_report(out)["digest"] == json_report(recv_out)["digest"]
        assert os.fstat(fd).st_blocks * 512 == allocated, "the sender's reads allocated the memfd's holes"
    finally:
        os.close(fd)


def test_a_fifo_as_image_is_refused_at_once(procs: Processes, tmp_path: Path) -> None:
    """Opening a FIFO for reading waits for a writer forever: the sender must refuse it before opening."""
    fifo = tmp_path / "guest.fifo"
    os.mkfifo(fifo)
    code, out, err = procs.send(fifo, "127.0.0.1:9").wait(timeout=15)
    assert code == 3, err
    assert last_line(err) == f"vmmig send: source {fifo} is a FIFO: not a regular file, memfd or block device"
    assert len(err.strip().splitlines()) == 1 and out == ""
