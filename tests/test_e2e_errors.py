"""Every failure cause ends with one clear line, its documented exit code, and no DEST. DEST.partial is removed,
except after a link fault (lost connection, silence, corrupted frame), when it stays with its state file for
`vmmig recv --resume` (tests/test_e2e_resume.py).

Exit codes (migrate_cli/errors.py): 2 usage, 3 source, 4 destination, 5 network, 6 protocol, 7 integrity,
8 peer (relayed with a "peer:" prefix), 130/143 signals.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from migrate_cli.wire.digest import end_commitment, fingerprint_pages, image_digest
from migrate_cli.wire.frames import (
    PROTOCOL_VERSION,
    RESULT_DIGEST_MISMATCH,
    Abort,
    Encoding,
    End,
    Hello,
    Pages,
    Result,
    Welcome,
)
from migrate_cli.wire.protocol import encode

from .conftest import (
    Proc,
    Processes,
    assert_no_destination,
    assert_resumable,
    make_image,
    migrate_through_fault,
    sender_met_by,
    still_serves,
)
from .encoded import fingerprinted
from .fakepeer import FakePeer

PS = 4096


PROGRESS_LINE = re.compile(r"^vmmig (send|recv): (listening on |pass \d+: )")


def one_line(err: str) -> str:
    """The error output, less the ready line and the per-pass progress lines, is exactly one line."""
    lines = [line for line in err.splitlines() if line.strip() and not PROGRESS_LINE.match(line)]
    assert len(lines) == 1, f"expected exactly one error line, got: {err!r}"
    return lines[0]


def hello(pages: int = 2, codec: int = Encoding.ZLIB, version: int = PROTOCOL_VERSION) -> Hello:
    return Hello(PS, pages * PS, codec, 1, b"t" * 16, batch_pages=pages, version=version)


def welcomed_peer(procs: Processes, dest: Path, *recv_args: str) -> tuple[Proc, FakePeer]:
    """`vmmig recv` into ``dest`` and a scripted sender it has welcomed (HELLO for a 2-page image sent)."""
    recv = procs.recv(dest, *recv_args)
    peer = FakePeer.connect(recv.address)
    peer.send(hello())
    peer.read_until(Welcome)
    return recv, peer


def slow_migration(procs: Processes, tmp_path: Path) -> tuple[Path, Proc, Proc]:
    """A migration of 8 MiB of random pages at 2 MB/s, a second into it: (DEST, recv, send) both still running."""
    source = make_image(tmp_path / "random.img", 8 << 20, profile="random")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--resume-window", "0")
    send = procs.send(
        source, recv.address, "--max-bandwidth", "2M", "--batch-size", "256K", "--state-file", str(tmp_path / "s")
    )  # small batches: some are applied before the kill, so DEST.partial holds pages worth a resume
    time.sleep(1.0)
    return dest, recv, send


# --- integrity --------------------------------------------------------------------------------------------------


def test_a_corrupt_compressed_batch_is_a_decompression_error(procs: Processes, tmp_path: Path) -> None:
    """Protocol 3: the CRC no longer covers page data, so data that does not decode is damage on the link like a
    failed CRC: an integrity error naming the batch's pages, and resumable (it was, before, a final one). Nothing
    was applied, so with no resume window there is nothing to keep."""
    dest = tmp_path / "dest.img"
    recv, peer = welcomed_peer(procs, dest, "--resume-window", "0")
    peer.send(fingerprinted(Pages(0, 2, Encoding.ZLIB, b"\x00", b"this is not deflate data at all")))
    abort = peer.read_until(Abort)
    code, _, err = recv.wait()
    assert code == 7
    assert "batch of pages 0..1: zlib decompression failed" in one_line(err)
    assert abort.code == 7 and "batch of pages 0..1: zlib decompression failed" in abort.message
    assert abort.resumable
    assert_no_destination(dest)


def test_a_wrong_end_digest_is_a_digest_mismatch_and_dest_is_not_published(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    recv, peer = welcomed_peer(procs, dest)
    peer.send(fingerprinted(Pages(0, 2, Encoding.RAW, b"\x00", b"\x01" * 2 * PS)), End(2, 1, b"\x00" * 16))
    result = peer.read_until(Result)
    code, _, err = recv.wait()
    assert code == 7
    assert "digest mismatch" in one_line(err)
    assert result.status == RESULT_DIGEST_MISMATCH
    assert_no_destination(dest)


def test_a_matching_digest_from_a_scripted_sender_is_published(procs: Processes, tmp_path: Path) -> None:
    """Control for the test above: the same stream with the right digest succeeds, so the digest is what failed."""
    dest = tmp_path / "dest.img"
    data = b"\x01" * PS + bytes(PS)
    fps = __import__("numpy").empty(2, dtype="uint64")
    fingerprint_pages(data, PS, fps)
    recv, peer = welcomed_peer(procs, dest)
    batch = fingerprinted(Pages(0, 2, Encoding.RAW, b"\x02", b"\x01" * PS))
    peer.send(batch, End(2, 1, end_commitment(image_digest(fps))))
    assert peer.read_until(Result).status == 0
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == data


def test_sender_refuses_a_receiver_reporting_a_different_digest(
    procs: Processes, image_8m: Path, fake_receiver: socket.socket
) -> None:
    send, peer, _ = sender_met_by(fake_receiver, procs, image_8m)
    peer.send(Welcome())
    peer.read_until(End)
    peer.send(Result(0, b"\x42" * 16))
    code, _, err = send.wait()
    assert code == 7 and "digest mismatch" in one_line(err)


def test_a_flipped_bit_in_page_data_on_the_wire_names_the_page(
    procs: Processes, tmp_path: Path, image_8m: Path
) -> None:
    """A corrupted frame is a link fault, and DEST.partial (holding the batches before it) stays for a resume.

    Protocol 3: the CRC no longer covers page data; a flipped bit there is caught by the receiver's check of each
    page against the sender's fingerprint, which names the page (it was, before, a CRC mismatch of the frame)."""
    dest = tmp_path / "dest.img"
    send_args = ["--compress", "none", "--batch-size", "1M"]
    at = 1_500_000  # in page data, some way into the stream
    run = migrate_through_fault(procs, image_8m, dest, "flip", at, ["--resume-window", "0"], send_args)
    send_code, send_err, recv_code, recv_err = run.send_code, run.send_err, run.recv_code, run.recv_err
    mismatch = re.compile(r"page (\d+) does not match the fingerprint the sender took of it: damaged in transit")
    named = mismatch.search(one_line(recv_err))
    assert recv_code == 7 and named and "recv --resume" in one_line(recv_err), recv_err
    assert send_code == 8 and one_line(send_err).startswith(f"vmmig send: peer: page {named.group(1)} does not match")
    assert "vmmig send --resume" in one_line(send_err)
    assert_resumable(dest)
    # The page named is the one the flip landed in: DEST.partial holds it as it arrived, one bit off the source's.
    page = int(named.group(1))
    landed = Path(f"{dest}.partial").read_bytes()[page * PS : (page + 1) * PS]
    sent = image_8m.read_bytes()[page * PS : (page + 1) * PS]
    assert sum(bin(a ^ b).count("1") for a, b in zip(landed, sent, strict=True)) == 1


# --- network ----------------------------------------------------------------------------------------------------


def test_a_truncated_stream_fails_both_ends(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    dest = tmp_path / "dest.img"
    run = migrate_through_fault(procs, image_8m, dest, "cut", 200_000, ["--resume-window", "0"], [])
    send_code, send_err, recv_code, recv_err = run.send_code, run.send_err, run.recv_code, run.recv_err
    assert recv_code == 5 and ("truncated" in one_line(recv_err) or "closed by peer" in recv_err)
    assert send_code == 5, send_err
    one_line(send_err)
    assert_resumable(dest)


@pytest.mark.parametrize("victim", ["send", "recv"])
def test_a_peer_killed_mid_transfer_is_a_network_error(procs: Processes, tmp_path: Path, victim: str) -> None:
    dest, recv, send = slow_migration(procs, tmp_path)
    killed, survivor = (send, recv) if victim == "send" else (recv, send)
    os.kill(killed.popen.pid, signal.SIGKILL)
    code, _, err = survivor.wait()
    assert code == 5, err
    assert any(word in one_line(err) for word in ("closed", "truncated", "lost", "reset"))
    assert_resumable(dest)


def test_connection_refused_gives_up_after_the_connect_timeout(
    procs: Processes, tmp_path: Path, image_8m: Path
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    code, _, err = procs.send(image_8m, f"127.0.0.1:{port}", "--connect-timeout", "1s").wait()
    assert code == 5
    assert "connection refused" in one_line(err) and "--connect-timeout" in err
    assert time.monotonic() - started < 8


def test_a_silent_receiver_trips_the_io_timeout(procs: Processes, image_8m: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))  # accepts in the kernel, never answers
    try:
        code, _, err = procs.send(image_8m, f"127.0.0.1:{listener.getsockname()[1]}", "--io-timeout", "1s").wait()
    finally:
        listener.close()
    assert code == 5 and "no data from peer for 1s" in one_line(err)


def test_a_silent_connection_is_turned_away_and_the_receiver_keeps_waiting(procs: Processes, tmp_path: Path) -> None:
    """Silence before HELLO is a failed handshake (--handshake-timeout), not the end of the receiver."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--handshake-timeout", "1s")
    peer = FakePeer.connect(recv.address)
    with pytest.raises(EOFError):
        peer.read_until(Abort)  # closed after the handshake timeout: nothing to explain to a silent peer
    peer.close()
    assert recv.popen.poll() is None
    assert not Path(f"{dest}.partial").exists()
    err = still_serves(procs, recv, tmp_path)
    assert "refused a connection from 127.0.0.1:" in err and "handshake not completed within" in err


def test_a_listen_address_in_use_is_a_network_error(procs: Processes, tmp_path: Path) -> None:
    first = procs.recv(tmp_path / "a.img")
    code, _, err = procs.run("recv", "--listen", first.address, str(tmp_path / "b.img"))
    assert code == 5 and "address already in use" in one_line(err)


def test_non_loopback_listen_needs_insecure(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.run("recv", "--listen", "0.0.0.0:0", str(tmp_path / "dest.img"))
    assert code == 2 and "--insecure" in one_line(err)


# --- protocol ---------------------------------------------------------------------------------------------------


def test_a_sender_of_another_protocol_version_is_refused_naming_both(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    peer = FakePeer.connect(recv.address)
    peer.send(hello(version=1))  # a vmmig of protocol 1, whose END carries the bare digest
    abort = peer.read_until(Abort)
    assert "peer speaks version 1, this vmmig speaks 3" in abort.message and abort.code == 6
    assert not Path(f"{dest}.partial").exists()
    err = still_serves(procs, recv, tmp_path)  # turned away, logged, and the receiver waits on
    assert "refused a connection from 127.0.0.1:" in err and "peer speaks version 1" in err


def test_a_receiver_of_another_protocol_version_is_refused(
    procs: Processes, image_8m: Path, fake_receiver: socket.socket
) -> None:
    send, peer, _ = sender_met_by(fake_receiver, procs, image_8m)
    peer.send(encode(Welcome(version=7)))
    code, _, err = send.wait()
    assert code == 6 and "peer speaks version 7, this vmmig speaks 3" in one_line(err)


def test_an_unknown_codec_id_is_refused(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    peer = FakePeer.connect(recv.address)
    peer.send(hello(codec=77))
    abort = peer.read_until(Abort)
    assert abort.code == 6 and "unknown codec id 77" in abort.message and "zlib=1" in abort.message
    assert not Path(f"{dest}.partial").exists()
    assert "unknown codec id 77" in still_serves(procs, recv, tmp_path)


def test_pages_past_the_image_end_are_refused_before_writing(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    recv, peer = welcomed_peer(procs, dest)
    peer.send(fingerprinted(Pages(1, 2, Encoding.RAW, b"\x00", b"\x01" * 2 * PS)))
    peer.read_until(Abort)
    code, _, err = recv.wait()
    assert code == 6 and "past the image end" in one_line(err)
    assert_no_destination(dest)


# --- source and destination -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "no such file"), (b"x" * 4097, "size 4097 bytes is not a whole number of 4096-byte pages"), (b"", "empty")],
)
def test_bad_sources_are_refused_naming_the_problem(
    procs: Processes, tmp_path: Path, content: bytes | None, message: str
) -> None:
    source = tmp_path / "source.img"
    if content is not None:
        source.write_bytes(content)
    code, _, err = procs.send(source, "127.0.0.1:9").wait()
    assert code == 3 and message in one_line(err)


def test_a_directory_is_not_a_source(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.send(tmp_path, "127.0.0.1:9").wait()
    assert code == 3 and "not a regular file" in one_line(err)


def test_an_existing_destination_is_refused_without_force(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"precious")
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", str(dest))
    assert code == 4 and "already exists" in one_line(err) and "--force" in err
    assert dest.read_bytes() == b"precious"


def test_a_leftover_partial_is_refused_naming_force(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    Path(str(dest) + ".partial").write_bytes(b"half")
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", str(dest))
    assert code == 4 and "leftover" in one_line(err) and "--force" in err


def test_a_missing_destination_directory_is_refused(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", str(tmp_path / "nope" / "dest.img"))
    assert code == 4 and "does not exist" in one_line(err)


def mount_tmpfs(mount: Path, size: str) -> Path:
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {result.stderr.decode().strip()}")
    return mount


@pytest.fixture
def small_tmpfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    yield mount_tmpfs(tmp_path / "small", "1m")
    subprocess.run(["umount", "-l", str(tmp_path / "small")], check=False)


@pytest.fixture
def tmpfs_24m(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Room for what is allocated before WELCOME (16 MiB), not for a 64 MiB image: the disk fills mid-migration."""
    yield mount_tmpfs(tmp_path / "24m", "24m")
    subprocess.run(["umount", "-l", str(tmp_path / "24m")], check=False)


def migrate_onto_a_full_disk(procs: Processes, source: Path, mount: Path, *send_args: str, timeout: float = 60) -> None:
    """What a full disk must give, wherever it is found: exit 4 with the reason on the receiver, exit 8 naming the
    destination on the sender, and nothing left on the disk (no DEST, no DEST.partial)."""
    dest = mount / "dest.img"
    recv = procs.recv(dest, "--sparse")  # --sparse: not refused up front, the disk fills while pages are written
    send_code, _, send_err = procs.send(source, recv.address, *send_args).wait(timeout)
    recv_code, _, recv_err = recv.wait(timeout)
    assert recv_code == 4 and "no space left on device" in one_line(recv_err)
    assert send_code == 8 and "peer: destination" in one_line(send_err) and "no space" in send_err
    assert_no_destination(dest)
    assert list(mount.iterdir()) == []


def test_an_image_that_does_not_fit_is_refused_before_welcome(
    procs: Processes, small_tmpfs: Path, image_8m: Path, tmp_path: Path
) -> None:
    """A HELLO is 56 bytes: the image it announces must not be allocated when it cannot fit. The sender is told
    (exit 8, naming the space), nothing is written, and the receiver keeps waiting for a sender it can take."""
    dest = small_tmpfs / "dest.img"
    recv = procs.recv(dest)
    send_code, _, send_err = procs.send(image_8m, recv.address).wait(60)
    assert send_code == 8 and "peer: destination" in one_line(send_err) and "free" in send_err
    assert list(small_tmpfs.iterdir()) == []
    assert recv.popen.poll() is None, "a HELLO the receiver cannot take does not end it"
    err = still_serves(procs, recv, tmp_path, size=256 << 10)  # a 256 KiB image fits
    assert "refused a connection from 127.0.0.1:" in err


def test_a_disk_that_fills_during_the_migration_fails_it(procs: Processes, tmpfs_24m: Path, tmp_path: Path) -> None:
    """A --sparse DEST is not allocated up front: a write reaches the full disk."""
    source = make_image(tmp_path / "random.img", 64 << 20, profile="random")
    migrate_onto_a_full_disk(procs, source, tmpfs_24m, "--json")


@pytest.fixture
def hugetlbfs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A hugetlbfs mount with 16 huge pages reserved for the test (and the old reservation restored after)."""
    knob = Path("/proc/sys/vm/nr_hugepages")
    try:
        before = knob.read_text()
        knob.write_text(str(int(before) + 16))
    except OSError as exc:
        pytest.skip(f"cannot reserve huge pages here: {exc}")
    mount = tmp_path / "huge"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "hugetlbfs", "none", str(mount)], capture_output=True)
    if result.returncode != 0:
        knob.write_text(before)
        pytest.skip(f"cannot mount hugetlbfs here: {result.stderr.decode().strip()}")
    yield mount
    for leftover in mount.iterdir():
        leftover.unlink()
    subprocess.run(["umount", "-l", str(mount)], check=False)
    knob.write_text(before)


def test_a_hugetlbfs_destination_has_no_write_call_and_is_written_through_a_mapping(
    procs: Processes, hugetlbfs: Path, image_8m: Path
) -> None:
    """hugetlbfs refuses write(2) (EINVAL) where tmpfs takes pwrite: the receiver stores through a mapping there."""
    dest = hugetlbfs / "dest.img"
    recv = procs.recv(dest)
    send = procs.send(image_8m, recv.address)
    send_code, _, send_err = send.wait()
    recv_code, _, recv_err = recv.wait()
    assert (send_code, recv_code) == (0, 0), send_err + recv_err
    assert dest.read_bytes() == image_8m.read_bytes()
    assert "this migration cannot be resumed" in recv_err, "no state file on hugetlbfs: said, not failed"
    assert sorted(p.name for p in hugetlbfs.iterdir()) == ["dest.img"]


# --- signals and usage ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("victim", "signum", "expected"), [("recv", signal.SIGTERM, 143), ("send", signal.SIGINT, 130)]
)
def test_a_signal_cancels_with_its_exit_code_and_tells_the_peer(
    procs: Processes, tmp_path: Path, victim: str, signum: int, expected: int
) -> None:
    dest, recv, send = slow_migration(procs, tmp_path)
    target, other = (recv, send) if victim == "recv" else (send, recv)
    os.kill(target.popen.pid, signum)
    code, _, err = target.wait()
    other_code, _, other_err = other.wait()
    assert code == expected and "interrupted by" in one_line(err)
    assert other_code == 8 and "peer: interrupted by" in one_line(other_err)
    assert_no_destination(dest)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-bandwidth", "fast"], "invalid size 'fast'"),
        (["--compress", "lz77"], "lz77"),
        (["--level", "12"], "zlib takes levels 1-9"),
        (["--page-size", "3000"], "not a power of two"),
        (["--connect-timeout", "5"], "unit is required"),
    ],
)
def test_usage_errors_exit_2_naming_the_option(procs: Processes, image_8m: Path, args: list[str], message: str) -> None:
    code, _, err = procs.send(image_8m, "127.0.0.1:9", *args).wait()
    assert code == 2 and message in err
