"""The snapshot reader against hostile files: whatever a file holds, restore refuses it or restores it exactly.

Each case damages a small valid snapshot (or forges one whose CRCs are all right but whose numbers lie) and runs
the library's restore, in this process: it raises SnapshotTruncated or SourceError (exit 3) or SnapshotCorrupt
(exit 7), naming where, or restores a byte-identical image; nothing else escapes, and a refused restore leaves
neither DEST nor DEST.partial. The seeded damages are reproducible (the seed is in the test id).
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
from zlib_ng import zlib_ng

from migrate_cli.errors import ExitCode, MigrateError
from migrate_cli.snapshot import format as fmt
from migrate_cli.snapshot.restore import RestoreOptions, restore
from migrate_cli.snapshot.writer import SaveOptions, save
from migrate_cli.wire.frames import Hello
from migrate_cli.wire.protocol import encode

from .conftest import make_image

SIZE = 1 << 20


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, bytes]]:
    """(image, snapshot) per codec."""
    where = tmp_path_factory.mktemp("snapshots")
    image = make_image(where / "vm.ram", SIZE, seed=11)
    found = {}
    for codec in ("none", "zlib", "zstd"):
        snap = where / f"vm.{codec}"
        save(SaveOptions(str(image), str(snap), codec, threads=2))
        found[codec] = (image.read_bytes(), snap.read_bytes())
    return found


def outcome(tmp_path: Path, data: bytes, image: bytes) -> str:
    """'identical', or the exit code of the refusal; any other outcome fails the test."""
    snap, dest = tmp_path / "bad.snap", tmp_path / "dest.ram"
    snap.write_bytes(data)
    try:
        restore(RestoreOptions(str(snap), str(dest), threads=2))
    except MigrateError as exc:
        assert exc.exit_code in (ExitCode.SOURCE, ExitCode.INTEGRITY), exc
        assert not dest.exists() and not (tmp_path / "dest.ram.partial").exists()
        return str(int(exc.exit_code))
    published = dest.read_bytes()
    dest.unlink()
    assert published == image, "a damaged snapshot was published with other content"
    return "identical"


def damage(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    kind, at = rng.randrange(3), rng.randrange(len(buf))
    if kind == 0:
        buf[at] ^= 1 << rng.randrange(8)
    elif kind == 1:
        del buf[at:]
    else:
        buf[at:at] = bytes([rng.randrange(256)])
    return bytes(buf)


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
@pytest.mark.parametrize("seed", range(2))
def test_seeded_flips_truncations_and_insertions_are_refused_or_restore_identical(
    saved: dict[str, tuple[bytes, bytes]], tmp_path: Path, codec: str, seed: int
) -> None:
    image, snap = saved[codec]
    rng = random.Random(seed * 1000 + len(codec))
    seen = [outcome(tmp_path, damage(snap, rng), image) for _ in range(10)]
    assert set(seen) <= {"3", "7", "identical"}


def test_every_truncation_point_class_is_exit_3(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    image, snap = saved["zstd"]
    # in the header, in the first frame, at a frame boundary late in the body, in the trailer, in the footer
    for cut in (10, fmt.HEADER_SIZE + 5, len(snap) // 2, len(snap) - fmt.FOOTER_SIZE - 3, len(snap) - 1):
        assert outcome(tmp_path, snap[:cut], image) == "3", cut


def split(snap: bytes) -> tuple[bytes, fmt.Trailer, int]:
    """A snapshot's header and frames, its trailer and the trailer's offset."""
    footer = fmt.decode_footer(snap[-fmt.FOOTER_SIZE :], len(snap))
    assert footer is not None
    body = snap[: footer.trailer_offset]
    trailer = fmt.decode_trailer(snap[footer.trailer_offset : -fmt.FOOTER_SIZE], footer.trailer_offset, "t")
    return body, trailer, footer.trailer_offset


def rebuilt(body: bytes, trailer: bytes) -> bytes:
    """``body`` and ``trailer`` with a footer that is right for them: only the content lies."""
    return body + trailer + fmt.encode_footer(fmt.Footer(len(body), len(trailer), zlib_ng.crc32(trailer)))


def test_a_lying_index_is_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    image, snap = saved["zlib"]
    body, trailer, _ = split(snap)
    index = fmt.unpack_pages(trailer.index, SIZE // 4096, "index", "t")
    index[[0, -1]] = index[[-1, 0]]  # two pages pointing at each other's frames
    forged = fmt.encode_trailer(fmt.Trailer(trailer.frames, trailer.passes, fmt.pack_pages(index),
                                            trailer.fingerprints, trailer.digest))  # fmt: skip
    with pytest.raises(fmt.SnapshotCorrupt, match=r"trailer at offset \d+: the index"):
        restore(RestoreOptions(str(write(tmp_path, rebuilt(body, forged))), None))
    assert outcome(tmp_path, rebuilt(body, forged), image) == "7"


def test_lying_trailer_lengths_and_counts_are_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    image, snap = saved["zstd"]
    body, trailer, _ = split(snap)
    good = fmt.encode_trailer(trailer)
    longer = bytearray(good)
    struct.pack_into("!Q", longer, 24, len(trailer.index) + 1)  # index length one byte too long
    fewer = fmt.encode_trailer(fmt.Trailer(trailer.frames - 1, *(trailer.passes, trailer.index, trailer.fingerprints,
                                                                  trailer.digest)))  # fmt: skip
    huge = fmt.encode_trailer(fmt.Trailer(trailer.frames, trailer.passes, zlib_ng.compress(bytes(1 << 24), 9),
                                          trailer.fingerprints, trailer.digest))  # fmt: skip
    for forged in (bytes(longer), fewer, huge):
        assert outcome(tmp_path, rebuilt(body, forged), image) == "7"


def test_a_header_announcing_an_enormous_image_is_refused_before_allocating(tmp_path: Path) -> None:
    header = fmt.encode_header(fmt.Header(4096, 1 << 50, 16, 2, 1))
    with pytest.raises(fmt.SnapshotCorrupt, match=r"more than a \d+-byte file can describe"):
        restore(RestoreOptions(str(write(tmp_path, header + bytes(4096))), None))


def test_a_wire_frame_that_has_no_place_in_a_snapshot_is_refused(
    saved: dict[str, tuple[bytes, bytes]], tmp_path: Path
) -> None:
    snap = saved["zlib"][1]
    hello = encode(Hello(4096, SIZE, 1, 1, bytes(16), 16))
    forged = snap[: fmt.HEADER_SIZE] + hello + snap[fmt.HEADER_SIZE :]
    with pytest.raises(fmt.SnapshotCorrupt, match=f"frame 1 at offset {fmt.HEADER_SIZE}: a HELLO frame"):
        restore(RestoreOptions(str(write(tmp_path, forged)), None))


def test_a_frame_repeated_in_its_pass_is_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    image, snap = saved["none"]
    first = fmt.HEADER_SIZE
    length = struct.unpack_from("!I", snap, first + 4)[0] + 12
    forged = snap[: first + length] + snap[first : first + length] + snap[first + length :]
    assert outcome(tmp_path, forged, image) == "7"


def test_a_later_format_version_or_unknown_flags_are_foreign(
    saved: dict[str, tuple[bytes, bytes]], tmp_path: Path
) -> None:
    snap = saved["zstd"][1]
    for header in (fmt.Header(4096, SIZE, 256, 2, 1, version=2), fmt.Header(4096, SIZE, 256, 2, 1, flags=1)):
        forged = fmt.encode_header(header) + snap[fmt.HEADER_SIZE :]
        with pytest.raises(fmt.SnapshotForeign):
            restore(RestoreOptions(str(write(tmp_path, forged)), None))


def test_a_trailer_whose_fingerprints_lie_is_refused_even_with_a_matching_digest(
    saved: dict[str, tuple[bytes, bytes]], tmp_path: Path
) -> None:
    from migrate_cli.wire.digest import image_digest

    image, snap = saved["zstd"]
    body, trailer, _ = split(snap)
    fps = fmt.unpack_pages(trailer.fingerprints, SIZE // 4096, "fingerprints", "t")
    fps[3] ^= np.uint64(1)
    forged = fmt.encode_trailer(fmt.Trailer(trailer.frames, trailer.passes, trailer.index, fmt.pack_pages(fps),
                                            image_digest(fps)))  # fmt: skip
    assert outcome(tmp_path, rebuilt(body, forged), image) == "7"


def write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "forged.snap"
    path.write_bytes(data)
    return path


def as_incremental(snap: bytes, base: str, base_digest: bytes, sections: bytes | None = None) -> bytes:
    """``snap`` forged into an incremental snapshot naming ``base`` (every CRC right)."""
    from dataclasses import replace

    header = replace(
        fmt.decode_header(snap[: fmt.HEADER_SIZE], "t"), flags=fmt.FLAG_INCREMENTAL, base_digest=base_digest
    )
    body, trailer, _ = split(snap)
    if sections is None:
        sections = fmt.encode_sections({fmt.SECTION_BASE: base.encode()})
    forged = fmt.encode_trailer(replace(trailer, sections=sections))
    return rebuilt(fmt.encode_header(header) + body[fmt.HEADER_SIZE :], forged)


def chain_outcome(tmp_path: Path, top: Path) -> int:
    with pytest.raises(MigrateError) as refused:
        restore(RestoreOptions(str(top), str(tmp_path / "dest.ram"), threads=2))
    assert not (tmp_path / "dest.ram").exists() and not (tmp_path / "dest.ram.partial").exists()
    return int(refused.value.exit_code)


def test_a_snapshot_that_is_its_own_base_is_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    snap = saved["zstd"][1]
    digest = split(snap)[1].digest
    (tmp_path / "self.snap").write_bytes(as_incremental(snap, "self.snap", digest))
    assert chain_outcome(tmp_path, tmp_path / "self.snap") == ExitCode.RESUME_REFUSED


def test_two_snapshots_based_on_each_other_are_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    snap = saved["zlib"][1]
    digest = split(snap)[1].digest
    (tmp_path / "a.snap").write_bytes(as_incremental(snap, "b.snap", digest))
    (tmp_path / "b.snap").write_bytes(as_incremental(snap, "a.snap", digest))
    assert chain_outcome(tmp_path, tmp_path / "a.snap") == ExitCode.RESUME_REFUSED


def test_lying_base_sections_are_refused(saved: dict[str, tuple[bytes, bytes]], tmp_path: Path) -> None:
    snap = saved["none"][1]
    digest = split(snap)[1].digest
    lies = {
        "no base path": b"",
        "a length past the trailer": struct.pack("!4sI", b"BASE", 1000) + b"x",
        "a repeated base": fmt.encode_sections({fmt.SECTION_BASE: b"x"}) * 2,
        "a NUL in the path": fmt.encode_sections({fmt.SECTION_BASE: b"a\0b"}),
    }
    for lie, sections in lies.items():
        path = tmp_path / "lie.snap"
        path.write_bytes(as_incremental(snap, "", digest, sections))
        assert chain_outcome(tmp_path, path) == ExitCode.INTEGRITY, lie
    path.write_bytes(as_incremental(snap, "", digest, struct.pack("!4sI", b"DEVS", 0)))
    assert chain_outcome(tmp_path, path) == ExitCode.SOURCE  # a section of a later vmmig: foreign


def test_a_chain_is_only_followed_through_a_base_of_the_same_geometry(tmp_path: Path) -> None:
    small = make_image(tmp_path / "small.ram", SIZE // 2, seed=2)
    save(SaveOptions(str(small), str(tmp_path / "small.snap"), "zstd", threads=2))
    big = make_image(tmp_path / "big.ram", SIZE, seed=2)
    save(SaveOptions(str(big), str(tmp_path / "big.snap"), "zstd", threads=2))
    big_snap = (tmp_path / "big.snap").read_bytes()
    small_digest = split((tmp_path / "small.snap").read_bytes())[1].digest
    (tmp_path / "top.snap").write_bytes(as_incremental(big_snap, "small.snap", small_digest))
    assert chain_outcome(tmp_path, tmp_path / "top.snap") == ExitCode.RESUME_REFUSED
