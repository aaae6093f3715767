"""Live and incremental snapshots (docs/SNAPSHOT.md): `vmmig save --live` of a writing guest, stop-and-copy,
`--leave-running`, and `save --base` chains that `restore` follows, refusing a missing, altered or looping base."""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

from .conftest import Processes, make_image
from .guest import Guest, start_guest

SIZE = 8 << 20


def save(procs: Processes, image: Path, file: Path, *args: str) -> tuple[int, str, str]:
    return procs.run("save", str(image), str(file), "--compress-threads", "2", *args)


def restore(procs: Processes, *args: str) -> tuple[int, str, str]:
    return procs.run("restore", "--decompress-threads", "2", *args)


def test_a_live_save_of_a_writing_guest_restores_byte_identical_to_the_paused_source(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=3)
    guest = start_guest(guests, image, tmp_path, "--rate", "4M")
    snap, dest = tmp_path / "vm.snap", tmp_path / "restored.ram"
    code, out, err = save(
        procs, image, snap, "--live", "--pause-pid", str(guest.pid), "--compress", "zstd", "--downtime-limit", "2s",
        "--on-no-converge", "switchover", "--json",
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["paused"] and report["passes"] >= 2
    assert guest.is_paused()  # left paused, as after a migration or `virsh save`
    code, _, err = restore(procs, str(snap), str(dest))
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()


def test_leave_running_resumes_the_guest_once_the_snapshot_is_published(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=4)
    guest = start_guest(guests, image, tmp_path, "--rate", "2M")
    snap = tmp_path / "vm.snap"
    code, _, err = save(
        procs, image, snap, "--live", "--pause-pid", str(guest.pid), "--leave-running", "--downtime-limit", "2s",
        "--on-no-converge", "switchover",
    )  # fmt: skip
    assert code == 0, err
    assert snap.exists() and not guest.is_paused()
    code, _, err = restore(procs, "--check", str(snap))
    assert code == 0, err


def test_stop_and_copy_saves_the_paused_guest_and_leaves_it_paused(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=5)
    guest = start_guest(guests, image, tmp_path, "--rate", "4M")
    snap, dest = tmp_path / "vm.snap", tmp_path / "restored.ram"
    code, _, err = save(procs, image, snap, "--pause-pid", str(guest.pid))
    assert code == 0, err
    assert guest.is_paused()
    code, _, err = restore(procs, str(snap), str(dest))
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()
    os.kill(guest.pid, signal.SIGCONT)


def test_live_and_leave_running_need_a_pause_option(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 1 << 20, seed=1)
    for flag in ("--live", "--leave-running"):
        code, _, err = save(procs, image, tmp_path / "vm.snap", flag)
        assert code == 2 and "--pause-pid" in err, err


def changed_copy(image: Path, target: Path, pages: list[int]) -> Path:
    """A copy of ``image`` with the given 4 KiB pages rewritten."""
    data = bytearray(image.read_bytes())
    for page in pages:
        data[page * 4096 : (page + 1) * 4096] = os.urandom(4096)
    target.write_bytes(bytes(data))
    return target


def incremental_pair(procs: Processes, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base snapshot, incremental snapshot, the image the incremental one holds)."""
    first = make_image(tmp_path / "vm.ram", SIZE, seed=9)
    second = changed_copy(first, tmp_path / "vm-2.ram", [1, 2, 3, 500, 1999])
    base, new = tmp_path / "vm.snap", tmp_path / "vm-2.snap"
    assert save(procs, first, base, "--compress", "zstd")[0] == 0
    code, out, err = save(procs, second, new, "--base", str(base), "--json")
    assert code == 0, err
    assert json.loads(out)["pages_stored"] == 5
    return base, new, second


def test_an_incremental_snapshot_stores_only_changed_pages_and_restores_through_its_base(
    procs: Processes, tmp_path: Path
) -> None:
    base, new, second = incremental_pair(procs, tmp_path)
    assert new.stat().st_size < base.stat().st_size // 10
    dest = tmp_path / "restored.ram"
    code, _, err = restore(procs, str(new), str(dest))
    assert code == 0, err
    assert dest.read_bytes() == second.read_bytes()
    assert restore(procs, "--check", str(new))[0] == 0


def test_a_moved_chain_restores_with_base_dir(procs: Processes, tmp_path: Path) -> None:
    base, new, second = incremental_pair(procs, tmp_path)
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.move(base, moved / base.name)
    code, _, err = restore(procs, str(new), str(tmp_path / "a.ram"))
    assert code == 16 and "missing" in err and "--base-dir" in err, err
    assert not (tmp_path / "a.ram").exists()
    code, _, err = restore(procs, "--base-dir", str(moved), str(new), str(tmp_path / "b.ram"))
    assert code == 0, err
    assert (tmp_path / "b.ram").read_bytes() == second.read_bytes()


def test_a_base_that_is_not_the_one_saved_against_is_refused(procs: Processes, tmp_path: Path) -> None:
    base, new, _ = incremental_pair(procs, tmp_path)
    other = changed_copy(tmp_path / "vm.ram", tmp_path / "other.ram", [7])
    assert save(procs, other, base, "--force")[0] == 0  # the base re-saved from another image
    code, _, err = restore(procs, str(new), str(tmp_path / "r.ram"))
    assert code == 16 and "not the snapshot it was saved against" in err, err
    assert not list(tmp_path.glob("r.ram*"))


def test_a_missing_base_is_refused(procs: Processes, tmp_path: Path) -> None:
    base, new, _ = incremental_pair(procs, tmp_path)
    base.unlink()
    code, _, err = restore(procs, "--check", str(new))
    assert code == 16 and "missing" in err, err
