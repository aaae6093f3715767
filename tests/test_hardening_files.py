"""Hardening: the files vmmig creates, the options and inputs it accepts, the space DEST.partial takes.

- Every file vmmig creates is created new (O_EXCL, never through a symlink or a hard link planted at a temporary
  name); an existing name is never written through.
- Timeouts must be positive; sizes, rates and durations have upper bounds; each refusal is a usage error (exit 2)
  naming the option, never an internal error.
- A DEST that cannot work (empty, a directory, in a missing directory) is refused before listening.
- A tampered state file is refused (exit 16) naming the file, whatever field is wrong.
- DEST.partial's allocation stops with the destination, says whether it failed, and a too-large image is
  refused before WELCOME (check_fits).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from migrate_cli.errors import DestinationError, ExitCode
from migrate_cli.receiver import allocate
from migrate_cli.receiver.destination import DestinationImage
from migrate_cli.wire.frames import Encoding, Pages

from .conftest import Proc, Processes, last_line, make_image
from .encoded import fingerprinted

VICTIM = b"precious content that vmmig must never touch\n"
PAGE = 4096
HUGE = "9" * 400


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "source.img", 1 << 20)


def victim(tmp_path: Path, name: str = "victim") -> Path:
    path = tmp_path / name
    path.write_bytes(VICTIM)
    return path


def plant(at: Path, target: Path, kind: str) -> None:
    """What another user could put at a name vmmig will create: a hard link or a symlink to ``target``."""
    if kind == "hardlink":
        os.link(target, at)
    else:
        at.symlink_to(target)


def finished(proc: Proc, timeout: float = 20) -> tuple[int, str, str]:
    """The exit of a process that must stop by itself (a refusal before listening): a hang fails the test."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"vmmig was still running after {timeout}s: the input was not refused")


def start_recv(procs: Processes, dest: str | Path, *args: str) -> Proc:
    return procs.start("recv", "--listen", "127.0.0.1:0", *args, str(dest))


def wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


# --- files vmmig creates ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
def test_state_files_are_not_written_through_names_planted_at_their_old_temporary_names(
    procs: Processes, tmp_path: Path, image: Path, kind: str
) -> None:
    """Both ends' state files are written under unpredictable names and renamed: whatever sits at STATE.tmp (a
    hard link or a symlink to a victim) is neither written into nor an obstacle to the migration."""
    state = tmp_path / "send-state.json"
    dest = tmp_path / "dest.img"
    send_victim, recv_victim = victim(tmp_path, "send-victim"), victim(tmp_path, "recv-victim")
    plant(Path(f"{state}.tmp"), send_victim, kind)
    plant(Path(f"{dest}.partial.state.tmp"), recv_victim, kind)
    recv = procs.recv(dest)
    code, _, err = procs.send(image, recv.address, "--state-file", str(state)).wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert send_victim.read_bytes() == VICTIM and recv_victim.read_bytes() == VICTIM
    assert dest.read_bytes() == image.read_bytes()


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
def test_the_ready_file_is_not_written_through_a_name_planted_at_its_temporary_name(
    procs: Processes, tmp_path: Path, kind: str
) -> None:
    """--ready-file PATH: PATH.tmp planted as a link to a victim is not written through; PATH holds the address."""
    ready = tmp_path / "ready"
    target = victim(tmp_path)
    plant(Path(f"{ready}.tmp"), target, kind)
    proc = start_recv(procs, tmp_path / "dest.img", "--ready-file", str(ready))
    wait_for(ready)
    time.sleep(0.2)  # the old code wrote through the link, then renamed it over PATH
    assert target.read_bytes() == VICTIM
    assert ready.read_text().startswith("127.0.0.1:") and not ready.is_symlink()
    assert proc.popen.poll() is None, "recv keeps listening"


@pytest.mark.parametrize("force", [False, True])
def test_a_symlink_planted_at_dest_partial_is_never_followed(
    procs: Processes, tmp_path: Path, image: Path, force: bool
) -> None:
    """Without --force it is a leftover (refused before listening); with --force it is removed, not followed,
    and DEST.partial is created new (O_EXCL | O_NOFOLLOW)."""
    dest = tmp_path / "dest.img"
    target = victim(tmp_path)
    Path(f"{dest}.partial").symlink_to(target)
    if not force:
        code, _, err = finished(start_recv(procs, dest))
        assert code == ExitCode.DESTINATION and "leftover" in last_line(err)
    else:
        recv = procs.recv(dest, "--force")
        assert procs.send(image, recv.address).wait()[0] == 0 and recv.wait()[0] == 0
        assert dest.read_bytes() == image.read_bytes()
    assert target.read_bytes() == VICTIM


def write_receiver_state(dest: Path, **fields: object) -> None:
    state = {"version": 1, "created": 0.0, "session": "ab" * 16, "image_size": 8 * PAGE, "page_size": PAGE}
    state.update({"codec": 1, "batch_pages": 64, **fields})
    Path(f"{dest}.partial.state").write_text(json.dumps(state))


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
def test_recv_resume_refuses_a_dest_partial_that_is_a_link_to_another_file(
    procs: Processes, tmp_path: Path, kind: str
) -> None:
    """Adopting DEST.partial for a resume opens an existing file: only a regular file of ours with one name.
    A hard link planted there (with a state file) would have pages written into its target."""
    dest = tmp_path / "dest.img"
    target = tmp_path / "victim"
    target.write_bytes(VICTIM.ljust(8 * PAGE, b"."))
    plant(Path(f"{dest}.partial"), target, kind)
    write_receiver_state(dest)
    code, _, err = finished(start_recv(procs, dest, "--resume"))
    assert code == ExitCode.DESTINATION, err
    assert ("hard links" if kind == "hardlink" else "symbolic link") in last_line(err)
    assert target.read_bytes() == VICTIM.ljust(8 * PAGE, b".")


@pytest.mark.parametrize("kind", ["hardlink", "symlink"])
def test_the_stats_file_is_never_written_through_a_link(procs: Processes, tmp_path: Path, kind: str) -> None:
    """--stats FILE: a symlink at FILE is not followed and a file with another hard link is not truncated; both
    are refused before anything starts (exit 2, naming --stats)."""
    stats = tmp_path / "stats.ndjson"
    target = victim(tmp_path)
    plant(stats, target, kind)
    code, _, err = finished(start_recv(procs, tmp_path / "dest.img", "--stats", str(stats)))
    assert code == ExitCode.USAGE, err
    assert last_line(err).startswith(f"vmmig recv: --stats {stats}: ")
    assert target.read_bytes() == VICTIM


def test_an_existing_stats_file_of_ours_is_rewritten(procs: Processes, tmp_path: Path, image: Path) -> None:
    stats = tmp_path / "stats.ndjson"
    stats.write_text("an older run\n")
    recv = procs.recv(tmp_path / "dest.img")
    assert procs.send(image, recv.address, "--stats", str(stats)).wait()[0] == 0 and recv.wait()[0] == 0
    lines = stats.read_text().splitlines()
    assert lines and all(json.loads(line)["event"] for line in lines)


# --- options: timeouts positive, every value bounded ------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "option", "value"),
    [
        ("send", "--io-timeout", "0"),
        ("send", "--io-timeout", "0ms"),
        ("send", "--handshake-timeout", "0s"),
        ("send", "--connect-timeout", "0"),
        ("send", "--hook-timeout", "0"),
        ("recv", "--io-timeout", "0"),
        ("recv", "--handshake-timeout", "0"),
        ("send", "--io-timeout", "99999999999999h"),
        ("send", "--retry-delay", "9999999h"),
        ("send", "--max-bandwidth", HUGE),
        ("send", "--max-bandwidth", "9223372036854775808"),
        ("send", "--page-size", HUGE),
        ("send", "--batch-size", "1" + "0" * 30),
        ("recv", "--resume-window", "99999999999999h"),
        ("recv", "--io-timeout", HUGE + "s"),
    ],
)
def test_zero_timeouts_and_huge_values_are_usage_errors_naming_the_option(
    procs: Processes, tmp_path: Path, image: Path, command: str, option: str, value: str
) -> None:
    if command == "send":
        proc = procs.send(image, "127.0.0.1:1", option, value, "--connect-timeout", "1s")
        if option == "--connect-timeout":
            proc = procs.send(image, "127.0.0.1:1", option, value)
    else:
        proc = start_recv(procs, tmp_path / "dest.img", option, value)
    code, _, err = finished(proc)
    assert code == ExitCode.USAGE, err
    assert f"Invalid value for '{option}'" in err and "internal error" not in err
    assert len(last_line(err)) < 200, "the value is not echoed whole"


def test_the_largest_values_are_accepted(procs: Processes, tmp_path: Path, image: Path) -> None:
    """The bounds are the documented ones, not lower: 2**63-1 bytes a second and a year of waiting."""
    recv = procs.recv(tmp_path / "dest.img", "--io-timeout", "8760h", "--resume-window", "8760h")
    code, _, err = procs.send(image, recv.address, "--max-bandwidth", str(2**63 - 1), "--io-timeout", "8760h").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0


def test_ctl_set_refuses_a_huge_rate_as_a_bad_value(procs: Processes, tmp_path: Path) -> None:
    """`vmmig ctl SOCKET set max-bandwidth <400 digits>` is refused like any bad value; the migration goes on."""
    source = make_image(tmp_path / "random.img", 4 << 20, profile="random")
    sock = tmp_path / "send.sock"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(source, recv.address, "--max-bandwidth", "1M", "--compress", "none", "--control", str(sock))
    wait_for(sock)
    code, _, err = procs.run("ctl", str(sock), "set", "max-bandwidth", HUGE, timeout=20)
    assert code == 2 and "invalid size" in last_line(err) and "Overflow" not in err, err
    code, _, err = procs.run("ctl", str(sock), "set", "max-bandwidth", "0", timeout=20)
    assert code == 0, err
    assert send.wait()[0] == 0 and recv.wait()[0] == 0


# --- DEST checked before listening -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dest", "args", "code", "says"),
    [
        ("", (), ExitCode.USAGE, "DEST is empty"),
        ("{tmp}", (), ExitCode.DESTINATION, "is a directory"),
        ("{tmp}/", (), ExitCode.DESTINATION, "names a directory"),
        ("{tmp}/missing/", (), ExitCode.DESTINATION, "names a directory"),
        ("{tmp}/missing/dest.img", (), ExitCode.DESTINATION, "missing does not exist"),
        ("{tmp}/file/dest.img", (), ExitCode.DESTINATION, "file is not a directory"),
        ("{tmp}", ("--in-place",), ExitCode.DESTINATION, "is a directory"),
        ("{tmp}/fifo", ("--in-place",), ExitCode.DESTINATION, "not a regular file, memfd or block device"),
        ("", ("--resume",), ExitCode.USAGE, "DEST is empty"),
        ("{tmp}/", ("--resume",), ExitCode.DESTINATION, "names a directory"),
    ],
)
def test_a_dest_that_cannot_work_is_refused_before_listening(
    procs: Processes, tmp_path: Path, dest: str, args: tuple[str, ...], code: int, says: str
) -> None:
    (tmp_path / "file").write_bytes(b"")
    os.mkfifo(tmp_path / "fifo")
    exit_code, _, err = finished(start_recv(procs, dest.format(tmp=tmp_path), *args))
    assert exit_code == code and says in last_line(err), err
    assert "listening" not in err and "device or memfd" not in err
    assert not Path(".partial").exists() and not (tmp_path / ".partial").exists()


# --- state files validated on load -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("page_size", 0),
        ("page_size", 3),
        ("page_size", 1 << 30),
        ("page_size", "4096"),
        ("image_size", 8 * PAGE + 1),
        ("image_size", -PAGE),
        ("image_size", 0),
        ("batch_pages", 0),
        ("batch_pages", 10**9),
        ("codec", 99),
        ("session", "zz" * 16),
        ("session", "ab"),
        ("session", None),
        ("batch_pages", True),
    ],
)
def test_a_tampered_receiver_state_file_is_refused_naming_it(
    procs: Processes, tmp_path: Path, field: str, value: object
) -> None:
    dest = tmp_path / "dest.img"
    Path(f"{dest}.partial").write_bytes(bytes(8 * PAGE))
    write_receiver_state(dest, **{field: value})
    code, _, err = finished(start_recv(procs, dest, "--resume"))
    assert code == ExitCode.RESUME_REFUSED, err
    assert f"{dest}.partial.state is unreadable" in last_line(err) and field in last_line(err)


def test_a_receiver_state_file_that_is_not_a_small_regular_file_is_refused(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    Path(f"{dest}.partial").write_bytes(bytes(8 * PAGE))
    Path(f"{dest}.partial.state").symlink_to("/dev/zero")
    code, _, err = finished(start_recv(procs, dest, "--resume"))
    assert code == ExitCode.RESUME_REFUSED and "symbolic link" in last_line(err), err


@pytest.mark.parametrize(
    ("field", "value"),
    [("session", "zz" * 16), ("session", "abc"), ("page_size", 0), ("codec", "lz4"), ("inode", "1"), ("extra", 1)],
)
def test_a_tampered_sender_state_file_is_refused_naming_it(
    procs: Processes, tmp_path: Path, image: Path, field: str, value: object
) -> None:
    state = tmp_path / "send-state.json"
    st = image.stat()
    saved = {
        "version": 1, "created": 0.0, "session": "cd" * 16, "source": str(image), "device": st.st_dev,
        "inode": st.st_ino, "image_size": st.st_size, "page_size": PAGE, "codec": "zlib", "level": 1,
        "batch_pages": 256, "destination": "127.0.0.1:1",
    }  # fmt: skip
    state.write_text(json.dumps({**saved, field: value}))
    code, _, err = procs.run("send", str(image), "127.0.0.1:1", "--resume", "--state-file", str(state))
    assert code == ExitCode.RESUME_REFUSED, err
    assert f"resume state file {state} is unreadable" in last_line(err) and field in last_line(err)


# --- DEST.partial's allocation (library side of "a HELLO must not fill the disk") -------------------------------


@pytest.fixture
def slow_fallocate(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """fallocate on the allocation thread takes 0.2 s a chunk: long enough to catch it running."""
    real = allocate.fallocate
    started = threading.Event()

    def slow(fd: int, offset: int, length: int) -> None:
        if threading.current_thread().name == "allocate":
            started.set()
            time.sleep(0.2)
        real(fd, offset, length)

    monkeypatch.setattr(allocate, "fallocate", slow)
    return started


def allocating_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "allocate"]


@pytest.mark.parametrize("how", ["close", "discard"])
def test_closing_or_discarding_the_destination_stops_its_allocation_thread(
    tmp_path: Path, slow_fallocate: threading.Event, how: str
) -> None:
    size = 64 << 20  # 24 chunks after the first 16 MiB: ~5 s at 0.2 s a chunk
    dest = DestinationImage(str(tmp_path / "dest.img"), size, PAGE)
    dest.allocate_rest()
    assert slow_fallocate.wait(10)
    started = time.monotonic()
    dest.close() if how == "close" else dest.discard()
    assert time.monotonic() - started < 3, "stopped within a chunk, not after the whole file"
    assert not allocating_threads()
    assert Path(dest.partial).exists() == (how == "close")


def test_a_stopped_allocation_can_be_finished_later(tmp_path: Path, slow_fallocate: threading.Event) -> None:
    """A session parked for a resume stops allocating (stop_allocation); publishing it still allocates it all."""
    size = 32 << 20
    dest = DestinationImage(str(tmp_path / "dest.img"), size, PAGE)
    try:
        dest.allocate_rest()
        assert slow_fallocate.wait(10)
        dest.stop_allocation()
        assert not allocating_threads() and not dest.allocation_failed
        dest.finish_allocation()
        assert os.stat(dest.partial).st_blocks * 512 >= size
    finally:
        dest.discard()


def test_pages_written_tells_whether_any_batch_reached_the_file(tmp_path: Path) -> None:
    dest = DestinationImage(str(tmp_path / "dest.img"), 8 * PAGE, PAGE)
    try:
        assert dest.pages_written is False
        bitmap = np.packbits(np.zeros(2, dtype=bool), bitorder="little").tobytes()
        data = bytes(range(256)) * (2 * PAGE // 256)
        dest.write_batch(fingerprinted(Pages(0, 2, Encoding.RAW, bitmap, data), PAGE), data)
        assert dest.pages_written is True
    finally:
        dest.discard()


def test_a_failed_allocation_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = allocate.fallocate

    def full_after_first(fd: int, offset: int, length: int) -> None:
        if offset >= allocate.FIRST:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, offset, length)

    monkeypatch.setattr(allocate, "fallocate", full_after_first)
    dest = DestinationImage(str(tmp_path / "dest.img"), 32 << 20, PAGE)
    try:
        assert not dest.allocation_failed
        dest.allocate_rest()
        deadline = time.monotonic() + 10
        while not dest.allocation_failed:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(DestinationError, match="no space left"):
            dest.check_allocation()
    finally:
        dest.discard()


def test_check_fits_refuses_an_image_larger_than_the_free_space(tmp_path: Path) -> None:
    from migrate_cli.receiver.dest_checks import check_fits

    vfs = os.statvfs(tmp_path)
    if vfs.f_blocks == 0:
        pytest.skip("this file system reports no size")
    free = (vfs.f_bavail if os.geteuid() else vfs.f_bfree) * vfs.f_frsize
    dest = str(tmp_path / "dest.img")
    with pytest.raises(DestinationError, match=r"needs [\d,]+ bytes .*, its file system has only [\d,]+ free") as info:
        check_fits(dest, free + (1 << 30))
    assert info.value.exit_code == ExitCode.DESTINATION
    check_fits(dest, 1 << 20)
    existing = tmp_path / "in-place.img"
    existing.write_bytes(b"\1" * (1 << 20))  # allocated already: in place it needs nothing more
    check_fits(str(existing), 1 << 20, in_place=True)
