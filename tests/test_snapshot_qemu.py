"""Whole QEMU guests in snapshots (docs/SNAPSHOT.md, docs/QEMU.md): `save --qmp --qemu-handoff` stores QEMU's device
state in a QDEV trailer section, `restore --in-place --qmp` puts the RAM into a QEMU started with -incoming defer,
feeds it the device state and runs the guest on.

The end-to-end test needs qemu-system-x86_64 and the guest from examples/qemu/build_guest.sh (skipped otherwise, as
in test_e2e_qemu.py); the refusals and the hostile QDEV sections need neither.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
from zlib_ng import zlib_ng

from migrate_cli.errors import ExitCode, MigrateError
from migrate_cli.snapshot import format as fmt
from migrate_cli.snapshot.restore import RestoreOptions, restore
from migrate_cli.snapshot.writer import SaveOptions, save

from .conftest import Processes, make_image
from .test_e2e_qemu import guest_available, rg

SIZE = 1 << 20


@pytest.mark.skipif(guest_available() is not None, reason=str(guest_available()))
def test_a_live_saved_qemu_guest_restored_into_a_fresh_qemu_runs_on_from_where_it_was_saved(
    procs: Processes, qemus: list, tmp_path: Path, shm: Path
) -> None:
    source = rg.start_guest(tmp_path / "src", shm / "src.ram", role="source", write_mb=4)
    qemus.append(source)
    rg.wait_for_line(source.serial_log, r"^HEARTBEAT 3 ", timeout=120, proc=source)
    snap = tmp_path / "vm.snap"
    code, out, err = procs.run(
        "save", str(shm / "src.ram"), str(snap), "--live", "--qmp", str(source.qmp_path), "--qemu-handoff",
        "--compress", "zstd", "--compress-threads", "2", "--on-no-converge", "switchover", "--json", timeout=180,
    )  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert report["paused"] and report["passes"] >= 2 and report["device_state_bytes"] > 0, report
    with source.qmp() as qmp:
        assert qmp.execute("query-status")["status"] == "postmigrate", "the guest stays paused after save"
        qmp.execute("quit")
    source.kill()
    saved_tick = max(rg.heartbeats(source.serial_log))

    dest = rg.start_guest(tmp_path / "dst", shm / "dst.ram", role="dest")
    qemus.append(dest)
    dest.qmp().close()  # its monitor is up
    code, out, err = procs.run(
        "restore", str(snap), str(shm / "dst.ram"), "--in-place", "--qmp", str(dest.qmp_path), "--json", timeout=120
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["outcome"] == "running" and report["device_state_bytes"] > 0, report
    rg.wait_for_line(dest.serial_log, rf"^HEARTBEAT {saved_tick + 2} ", timeout=60, proc=dest)
    assert rg.heartbeats(dest.serial_log)[0] == saved_tick + 1, "the guest continued, it did not reboot"
    deadline = time.monotonic() + 60
    while len(rg.data_checks(dest.serial_log)) < 2:  # the guest re-checksums its data every ~3 s
        assert time.monotonic() < deadline, "no data checks on the restored guest"
        rg.wait_for_line(dest.serial_log, r"^DATA ", timeout=60, proc=dest)
        time.sleep(0.5)
    checks = rg.data_checks(dest.serial_log)
    assert all(kind == "OK" for kind, _ in checks), checks


def test_qemu_handoff_without_qmp_and_restore_qmp_without_in_place_are_usage_errors(
    procs: Processes, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE)
    code, _, err = procs.run("save", str(image), str(tmp_path / "vm.snap"), "--qemu-handoff")
    assert code == ExitCode.USAGE and "--qemu-handoff needs --qmp" in err, err
    code, _, err = procs.run("restore", str(tmp_path / "vm.snap"), str(tmp_path / "out.ram"), "--qmp", "/nowhere")
    assert code == ExitCode.USAGE and "--in-place" in err, err


def test_restoring_a_snapshot_without_device_state_into_qemu_is_refused_before_dest_is_touched(
    procs: Processes, tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", SIZE)
    assert procs.run("save", str(image), str(tmp_path / "vm.snap"))[0] == 0
    dest = tmp_path / "dest.ram"
    dest.write_bytes(bytes(SIZE))
    code, _, err = procs.run("restore", str(tmp_path / "vm.snap"), str(dest), "--in-place", "--qmp", "/nowhere")
    assert code == ExitCode.QEMU_STEP and "holds no QEMU device state" in err, err
    assert dest.read_bytes() == bytes(SIZE)


def forged(snapshot: bytes, flags: int, sections: bytes) -> bytes:
    """``snapshot`` with other header flags and trailer sections, every CRC made right again: only the lie is left."""
    footer = fmt.decode_footer(snapshot[-fmt.FOOTER_SIZE :], len(snapshot))
    assert footer is not None
    at = footer.trailer_offset
    trailer = fmt.decode_trailer(snapshot[at : at + footer.trailer_length], at, "test")
    head = bytearray(snapshot[: fmt.HEADER_SIZE])
    struct.pack_into("!H", head, 10, flags)
    struct.pack_into("!I", head, 60, zlib_ng.crc32(bytes(head[:60])))
    new_trailer = fmt.encode_trailer(
        fmt.Trailer(trailer.frames, trailer.passes, trailer.index, trailer.fingerprints, trailer.digest, sections)
    )
    new_footer = fmt.encode_footer(fmt.Footer(at, len(new_trailer), zlib_ng.crc32(new_trailer)))
    return bytes(head) + snapshot[fmt.HEADER_SIZE : at] + new_trailer + new_footer


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    where = tmp_path_factory.mktemp("qdev")
    image = make_image(where / "vm.ram", SIZE, seed=5)
    save(SaveOptions(str(image), str(where / "vm.snap"), "zstd", threads=2))
    return image.read_bytes(), (where / "vm.snap").read_bytes()


def restored(tmp_path: Path, data: bytes, qmp: str | None = None) -> bytes | int:
    """The image restored from ``data``, or the exit code of its refusal: with ``qmp`` (in place) DEST untouched,
    without (a new DEST) nothing published."""
    snap, dest = tmp_path / "forged.snap", tmp_path / ("qemu.ram" if qmp is not None else "dest.ram")
    snap.write_bytes(data)
    if qmp is not None:
        dest.write_bytes(bytes(SIZE))
    try:
        restore(RestoreOptions(str(snap), str(dest), threads=2, in_place=qmp is not None, qmp=qmp))
    except MigrateError as exc:
        if qmp is not None:
            assert dest.read_bytes() == bytes(SIZE), "a refused snapshot wrote into DEST"
        else:
            assert not dest.exists() and not (tmp_path / "dest.ram.partial").exists()
        return int(exc.exit_code)
    image = dest.read_bytes()
    dest.unlink()
    return image


QDEV = fmt.SECTION_QDEV
LIES = {
    "a QDEV length past the trailer's end": (fmt.FLAG_DEVICE_STATE, fmt.SECTION.pack(QDEV, 1000) + b"x" * 10),
    "a QDEV length over the bound": (fmt.FLAG_DEVICE_STATE, fmt.SECTION.pack(QDEV, fmt.MAX_DEVICE_STATE + 1) + b"x"),
    "a QDEV section cut inside its head": (fmt.FLAG_DEVICE_STATE, fmt.SECTION.pack(QDEV, 4)[:6]),
    "the device-state flag without its section": (fmt.FLAG_DEVICE_STATE, b""),
    "a QDEV section without the flag": (0, fmt.SECTION.pack(QDEV, 4) + b"QEVM"),
    "an empty QDEV section": (fmt.FLAG_DEVICE_STATE, fmt.SECTION.pack(QDEV, 0)),
    "two QDEV sections": (fmt.FLAG_DEVICE_STATE, (fmt.SECTION.pack(QDEV, 4) + b"QEVM") * 2),
}


@pytest.mark.parametrize("lie", list(LIES))
def test_a_lying_device_state_section_is_refused_as_corrupt_before_qemu_or_dest_is_touched(
    plain: tuple[bytes, bytes], tmp_path: Path, lie: str
) -> None:
    flags, sections = LIES[lie]
    data = forged(plain[1], flags, sections)
    # /nowhere is no QMP socket: a refusal that got as far as QEMU would be exit 12, not 7.
    assert restored(tmp_path, data, qmp="/nowhere") == ExitCode.INTEGRITY
    assert restored(tmp_path, data) == ExitCode.INTEGRITY


def test_a_well_formed_device_state_section_restores_the_ram_without_qmp(
    plain: tuple[bytes, bytes], tmp_path: Path
) -> None:
    data = forged(plain[1], fmt.FLAG_DEVICE_STATE, fmt.SECTION.pack(QDEV, 4) + b"QEVM")
    assert restored(tmp_path, data) == plain[0]
