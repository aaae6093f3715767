"""`vmmig send snapshot:FILE HOST:PORT` (docs/SNAPSHOT.md "Sending a snapshot"): a saved file is a source that an
ordinary `vmmig recv` cannot tell from a live one. Its frames go as stored (never recompressed), each checked first;
a damaged frame ends the run with exit 7 naming the file offset, and --retries does not retry it; a truncated file
is exit 3, a missing base exit 16; another --compress decompresses the file once and sends it as an image.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from migrate_cli.snapshot.reader import SnapshotReader
from migrate_cli.wire.frames import Pages

from .conftest import Processes, assert_no_destination, json_report, make_image, migrate_through_fault
from .guest import Guest, start_guest

SIZE = 8 << 20
NOWHERE = "127.0.0.1:9"  # the source is refused before any connection is tried


def save(procs: Processes, image: Path, file: Path, *args: str) -> None:
    code, _, err = procs.run("save", str(image), str(file), "--compress-threads", "2", *args)
    assert code == 0, err


def send_snapshot(procs: Processes, file: Path, dest: Path, *args: str) -> tuple[int, str, str]:
    """A real `vmmig recv` to ``dest`` and `vmmig send snapshot:FILE` to it; the sender's (code, stdout, stderr)."""
    recv = procs.recv(dest)
    result = procs.run("send", f"snapshot:{file}", recv.address, "--compress-threads", "2", *args)
    recv.wait(30)
    return result


def stored_frames(file: Path) -> list[tuple[int, int, Pages]]:
    """(offset, size, frame) of every PAGES frame the file holds, walked as restore walks it."""
    frames = []
    with SnapshotReader(str(file)) as reader:
        while True:
            at = reader.offset
            frame, size = reader.read_frame()
            if isinstance(frame, Pages):
                frames.append((at, size, frame))
            elif type(frame).__name__ == "End":
                return frames


def test_a_full_snapshot_arrives_byte_identical_with_its_frames_as_stored(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=5)
    snap, dest = tmp_path / "vm.snap", tmp_path / "dest.ram"
    save(procs, image, snap, "--compress", "zstd", "--level", "19")
    # --level 1 would change every frame if the pages were compressed again: the level is the file's.
    code, out, err = send_snapshot(procs, snap, dest, "--level", "1", "--json")
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()
    report = json.loads(out)
    assert (report["codec"], report["level"]) == ("zstd", 19)
    # Not recompressed: the compressed bytes sent are exactly the file's (the ratio is normal bytes / their sum).
    frames = [frame for _, _, frame in stored_frames(snap)]
    stored_ratio = sum(f.normal_count * 4096 for f in frames) / sum(len(f.data) for f in frames)
    assert report["compression-ratio"] == round(stored_ratio, 4)
    assert report["compressed-batches"] + report["raw-batches"] == len(frames)
    # And the same image compressed afresh at level 1 gives another ratio: the check above tells them apart.
    recompressed = tmp_path / "level1.snap"
    code, out, err = procs.run("save", str(image), str(recompressed), "--compress", "zstd", "--level", "1", "--json")
    assert code == 0, err
    frames = [frame for _, _, frame in stored_frames(recompressed)]
    assert round(sum(f.normal_count * 4096 for f in frames) / sum(len(f.data) for f in frames), 4) != round(
        stored_ratio, 4
    )


def test_a_live_snapshot_arrives_byte_identical_to_the_paused_guest(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=3)
    guest = start_guest(guests, image, tmp_path, "--rate", "4M")
    snap, dest = tmp_path / "vm.snap", tmp_path / "dest.ram"
    save(
        procs, image, snap, "--live", "--pause-pid", str(guest.pid), "--compress", "zlib", "--downtime-limit", "2s",
        "--on-no-converge", "switchover",
    )  # fmt: skip
    code, out, err = send_snapshot(procs, snap, dest, "--json")
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()  # the guest is left paused: the image is what was saved
    assert json.loads(out)["codec"] == "zlib"


def incremental_pair(procs: Processes, tmp_path: Path) -> tuple[Path, Path, Path]:
    """(base snapshot, incremental snapshot, the image the incremental one holds)."""
    first = make_image(tmp_path / "vm.ram", SIZE, seed=9)
    data = bytearray(first.read_bytes())
    for page in (1, 2, 3, 500, 1999):
        data[page * 4096 : (page + 1) * 4096] = os.urandom(4096)
    second = tmp_path / "vm-2.ram"
    second.write_bytes(bytes(data))
    base, new = tmp_path / "vm.snap", tmp_path / "vm-2.snap"
    save(procs, first, base, "--compress", "zstd")
    save(procs, second, new, "--base", str(base), "--compress", "zstd")
    return base, new, second


def test_an_incremental_snapshot_is_sent_with_its_base(procs: Processes, tmp_path: Path) -> None:
    _, new, second = incremental_pair(procs, tmp_path)
    dest = tmp_path / "dest.ram"
    code, _, err = send_snapshot(procs, new, dest)
    assert code == 0, err
    assert dest.read_bytes() == second.read_bytes()


def test_a_missing_base_is_refused_with_exit_16(procs: Processes, tmp_path: Path) -> None:
    base, new, _ = incremental_pair(procs, tmp_path)
    base.unlink()
    code, _, err = procs.run("send", f"snapshot:{new}", NOWHERE)
    assert code == 16 and "missing" in err, err


@pytest.mark.parametrize("retries", ["0", "3"])
def test_a_flipped_byte_in_a_page_is_final_exit_7_naming_the_offset(
    procs: Processes, tmp_path: Path, retries: str
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=5)
    snap, dest = tmp_path / "vm.snap", tmp_path / "dest.ram"
    save(procs, image, snap, "--compress", "zstd")
    at, size, frame = [each for each in stored_frames(snap) if len(each[2].data)][-1]
    damaged = bytearray(snap.read_bytes())
    damaged[at + size - len(frame.data) // 2] ^= 0x40  # inside the frame's page data
    snap.write_bytes(bytes(damaged))
    code, _, err = send_snapshot(procs, snap, dest, "--retries", retries, "--retry-delay", "0s")
    assert code == 7, err
    lines = [line for line in err.splitlines() if line.startswith("vmmig send: ")]
    assert f"snapshot {snap}" in lines[-1] and f"offset {at}" in lines[-1], err
    assert "retry" not in err, err  # never taken for a link fault
    assert_no_destination(dest)


def test_a_truncated_snapshot_is_exit_3(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=5)
    snap = tmp_path / "vm.snap"
    save(procs, image, snap)
    os.truncate(snap, snap.stat().st_size // 2)
    code, _, err = procs.run("send", f"snapshot:{snap}", NOWHERE)
    assert code == 3 and "truncated" in err, err


def test_another_compress_decompresses_the_snapshot_once_and_sends_it_as_an_image(
    procs: Processes, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE, seed=5)
    snap, dest = tmp_path / "vm.snap", tmp_path / "dest.ram"
    save(procs, image, snap, "--compress", "zlib")
    code, out, err = send_snapshot(procs, snap, dest, "--compress", "zstd", "--json")
    assert code == 0, err
    assert dest.read_bytes() == image.read_bytes()
    assert json.loads(out)["codec"] == "zstd"


@pytest.mark.parametrize("option", [["--live", "--pause-pid", "1"], ["--pause-cmd", "true", "--unpause-cmd", "true"]])
def test_options_for_a_running_guest_are_refused_with_a_snapshot_source(
    procs: Processes, tmp_path: Path, option: list[str]
) -> None:
    snap = tmp_path / "vm.snap"
    save(procs, make_image(tmp_path / "vm.ram", 1 << 20), snap)
    code, _, err = procs.run("send", f"snapshot:{snap}", NOWHERE, *option)
    assert code == 2 and option[0] in err and "snapshot" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize(("fault", "cause"), [("cut", "connection"), ("flip", "does not match the fingerprint")])
def test_a_link_fault_is_resumed_by_retries_sending_only_what_the_receiver_lacks(
    procs: Processes, tmp_path: Path, fault: str, cause: str
) -> None:
    """Damage on the link (not in the file) is a link fault as for an image: retried, and resumed."""
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random", seed=7)
    snap, dest = tmp_path / "vm.snap", tmp_path / "dest.ram"
    save(procs, image, snap, "--compress", "none")
    at = 6 << 20
    run = migrate_through_fault(
        procs, Path(f"snapshot:{snap}"), dest, fault, at, ("--json", "--io-timeout", "2s"),
        ("--json", "--retries", "2", "--retry-delay", "200ms", "--io-timeout", "2s",
         "--state-file", str(tmp_path / "send.state")),
    )  # fmt: skip
    assert (run.send_code, run.recv_code) == (0, 0), run.send_err + run.recv_err
    assert cause in run.send_err and "retry 1 of 2" in run.send_err, run.send_err
    sent = json_report(run.send_out)
    assert sent["resumes"] == 1
    assert sent["transferred"] < (16 << 20) - at + (4 << 20), sent["transferred"]  # not the whole file again
    assert dest.read_bytes() == image.read_bytes()
