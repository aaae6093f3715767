"""`vmmig save` and `vmmig restore` as an operator runs them: real processes, generated images (docs/SNAPSHOT.md).

A snapshot restores byte-identical with every codec and takes no room for zero pages; FILE and DEST appear only
complete (never a .partial left behind, an existing one kept without --force); a truncated file is exit 3 and a
corrupt one exit 7, each naming the frame and its file offset, and then nothing is published.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import Processes, make_image

SIZE = 4 << 20


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "vm.ram", SIZE, seed=7)


def save(procs: Processes, image: Path, file: Path, *args: str) -> tuple[int, str, str]:
    return procs.run("save", str(image), str(file), "--compress-threads", "2", *args)


def restore(procs: Processes, *args: str) -> tuple[int, str, str]:
    return procs.run("restore", "--decompress-threads", "2", *args)


def leftovers(path: Path) -> list[Path]:
    return [p for p in (path, path.with_name(path.name + ".partial")) if p.exists()]


@pytest.mark.parametrize("codec", ["none", "zlib", "zstd"])
def test_a_saved_image_restores_byte_identical_with_each_codec(
    procs: Processes, image: Path, tmp_path: Path, codec: str
) -> None:
    snap, dest = tmp_path / "vm.snap", tmp_path / "restored.ram"
    code, _, err = save(procs, image, snap, "--compress", codec)
    assert code == 0, err
    assert not leftovers(tmp_path / "vm.snap.partial")
    code, _, err = restore(procs, str(snap), str(dest))
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()
    assert not (tmp_path / "restored.ram.partial").exists()
    code, _, err = restore(procs, "--check", str(snap))
    assert code == 0 and "verified" in err, err


def test_zero_pages_take_no_room_in_the_snapshot(procs: Processes, image: Path, tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    code, out, err = save(procs, image, snap, "--compress", "none", "--json")
    assert code == 0, err
    zero_pages = int(re.search(r'"zero_pages": (\d+)', out).group(1))  # type: ignore[union-attr]
    assert zero_pages > 0
    # Uncompressed, the file holds the non-zero pages and their framing: every zero page's 4 KiB is saved.
    assert snap.stat().st_size < SIZE - zero_pages * 4096 + SIZE // 50


def test_an_existing_file_is_kept_without_force_and_replaced_with_it(
    procs: Processes, image: Path, tmp_path: Path
) -> None:
    snap = tmp_path / "vm.snap"
    snap.write_bytes(b"precious")
    code, _, err = save(procs, image, snap)
    assert code == 4 and "already exists" in err, err
    assert snap.read_bytes() == b"precious"
    assert not (tmp_path / "vm.snap.partial").exists()
    code, _, err = save(procs, image, snap, "--force")
    assert code == 0, err
    assert restore(procs, "--check", str(snap))[0] == 0


def test_a_failed_save_leaves_neither_file_nor_partial(procs: Processes, tmp_path: Path) -> None:
    odd = tmp_path / "odd.ram"
    odd.write_bytes(b"x" * 5000)  # not a whole number of pages
    snap = tmp_path / "vm.snap"
    code, _, err = save(procs, odd, snap)
    assert code == 3, err
    assert err.count("\n") == 1 and err.startswith("vmmig save: ")
    assert not leftovers(snap)


def test_a_leftover_partial_is_refused_without_force(procs: Processes, image: Path, tmp_path: Path) -> None:
    snap = tmp_path / "vm.snap"
    (tmp_path / "vm.snap.partial").write_bytes(b"earlier")
    code, _, err = save(procs, image, snap)
    assert code == 4 and "leftover" in err, err
    assert not snap.exists()
    code, _, err = save(procs, image, snap, "--force")
    assert code == 0, err
    assert not (tmp_path / "vm.snap.partial").exists()


@pytest.fixture
def snapshot(procs: Processes, image: Path, tmp_path: Path) -> Path:
    snap = tmp_path / "vm.snap"
    code, _, err = save(procs, image, snap, "--compress", "zstd")
    assert code == 0, err
    return snap


FRAME_AT = re.compile(r"frame \d+ at offset \d+")


def test_a_truncated_snapshot_is_exit_3_naming_the_frame_and_offset(
    procs: Processes, snapshot: Path, tmp_path: Path
) -> None:
    data = snapshot.read_bytes()
    snapshot.write_bytes(data[: len(data) // 2])
    dest = tmp_path / "restored.ram"
    code, _, err = restore(procs, str(snapshot), str(dest))
    assert code == 3, err
    assert "truncated" in err and FRAME_AT.search(err), err
    assert not leftovers(dest)
    assert restore(procs, "--check", str(snapshot))[0] == 3


def test_a_flipped_byte_is_exit_7_naming_the_frame_and_offset_and_nothing_is_published(
    procs: Processes, snapshot: Path, tmp_path: Path
) -> None:
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 3] ^= 0x10  # inside the compressed data of a frame
    snapshot.write_bytes(bytes(data))
    dest = tmp_path / "restored.ram"
    code, _, err = restore(procs, str(snapshot), str(dest))
    assert code == 7, err
    assert FRAME_AT.search(err), err
    assert err.count("\n") == 1 and err.startswith("vmmig restore: ")
    assert not leftovers(dest)
    code, _, err = restore(procs, "--check", str(snapshot))
    assert code == 7 and FRAME_AT.search(err), err


def test_a_file_that_is_not_a_snapshot_is_exit_3(procs: Processes, image: Path, tmp_path: Path) -> None:
    code, _, err = restore(procs, "--check", str(image))
    assert code == 3 and "not a vmmig snapshot" in err, err


def test_restore_keeps_an_existing_dest_without_force(procs: Processes, snapshot: Path, image: Path) -> None:
    dest = snapshot.with_name("existing.ram")
    dest.write_bytes(b"keep me")
    code, _, err = restore(procs, str(snapshot), str(dest))
    assert code == 4 and "already exists" in err, err
    assert dest.read_bytes() == b"keep me"
    code, _, err = restore(procs, str(snapshot), str(dest), "--force")
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()


def test_restore_in_place_and_sparse_give_the_same_image(procs: Processes, snapshot: Path, image: Path) -> None:
    in_place = snapshot.with_name("in-place.ram")
    in_place.write_bytes(b"\xff" * SIZE)  # old content everywhere, zero pages included, is overwritten
    assert restore(procs, str(snapshot), str(in_place), "--in-place")[0] == 0
    sparse = snapshot.with_name("sparse.ram")
    assert restore(procs, str(snapshot), str(sparse), "--sparse")[0] == 0
    assert in_place.read_bytes() == sparse.read_bytes() == image.read_bytes()


def test_restore_needs_dest_or_check_not_both(procs: Processes, snapshot: Path, tmp_path: Path) -> None:
    assert restore(procs, str(snapshot))[0] == 2
    assert restore(procs, "--check", str(snapshot), str(tmp_path / "x.ram"))[0] == 2
