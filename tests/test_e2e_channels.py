"""Parallel channels (--channels N): one migration over N TCP connections joined by the session id."""

from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import pytest

from migrate_cli.wire.frames import Abort, Encoding, Hello

from .conftest import Processes, assert_no_destination, make_image, still_serves
from .fakepeer import FakePeer
from .guest import Guest, start_guest


@pytest.mark.parametrize(("channels", "codec"), list(itertools.product(["2", "3"], ["none", "zlib", "zstd"])))
def test_a_migration_over_several_channels_is_identical(
    procs: Processes, tmp_path: Path, image_8m: Path, codec: str, channels: str
) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--json")
    code, out, err = procs.send(image_8m, recv.address, "--channels", channels, "--compress", codec, "--json").wait()
    recv_code, recv_out, recv_err = recv.wait()
    assert (code, recv_code) == (0, 0), err + recv_err
    assert dest.read_bytes() == image_8m.read_bytes()
    assert json.loads(out)["transferred"] == json.loads(recv_out)["transferred"]


def test_one_cap_budgets_all_channels(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "random.img", 4 << 20, profile="random")
    recv = procs.recv(tmp_path / "dest.img")
    code, out, err = procs.send(image, recv.address, "--channels", "3", "--max-bandwidth", "4MB", "--json").wait()
    assert code == 0, err
    report = json.loads(out)
    assert report["transferred"] / (report["total-time"] / 1000) <= 4e6 * 1.1
    assert recv.wait()[0] == 0


def test_a_batch_that_waits_longer_than_the_io_timeout_for_its_bandwidth_keeps_the_link_alive(
    procs: Processes, tmp_path: Path
) -> None:
    # The second 256 KiB batch waits ~4 s for tokens at 64 KB/s: keepalives must cover that wait on both ends.
    image = make_image(tmp_path / "random.img", 512 << 10, profile="random")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--io-timeout", "1.5s")
    args = ("--max-bandwidth", "64K", "--batch-size", "256K", "--io-timeout", "1.5s", "--compress", "none")
    code, _, err = procs.send(image, recv.address, *args).wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == image.read_bytes()


def test_live_migration_over_two_channels(procs: Processes, guests: list[Guest], tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    dest = tmp_path / "dest.ram"
    recv = procs.recv(dest)
    guest = start_guest(guests, image, tmp_path, "--rate", "8M")
    send = procs.send(image, recv.address, "--live", "--pause-pid", str(guest.pid), "--channels", "2")
    code, _, err = send.wait(60)
    assert code == 0 and recv.wait()[0] == 0, err
    assert dest.read_bytes() == image.read_bytes()


def hello(index: int, session: bytes = b"s" * 16) -> Hello:
    return Hello(4096, 4 * 4096, Encoding.ZLIB, 1, session, 4, channels=2, channel_index=index)


def test_garbage_on_a_second_channel_fails_the_migration_cleanly(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    first, second = FakePeer.connect(recv.address), FakePeer.connect(recv.address)
    first.send(hello(0))
    second.send(hello(1))
    second.sock.sendall(b"\x00" * 64)
    code, _, err = recv.wait(20)
    assert code == 6 and "bad frame magic" in err
    assert_no_destination(dest)
    first.close()
    second.close()


def test_a_channel_from_another_session_is_refused(procs: Processes, tmp_path: Path) -> None:
    """A channel of another session is turned away alone; the session it tried to join goes on waiting.

    Each connection's HELLO is read by a handshake thread of its own, so either may reach the receiver first: the
    one that does starts a session, the other is "another session"; the first then waits for its missing channel
    until --handshake-timeout."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--handshake-timeout", "2s")
    first, second = FakePeer.connect(recv.address), FakePeer.connect(recv.address)
    first.send(hello(0))
    second.send(hello(1, session=b"x" * 16))
    aborts = [first.read_until(Abort), second.read_until(Abort)]
    assert all(isinstance(abort, Abort) for abort in aborts)
    messages = sorted(abort.message for abort in aborts if isinstance(abort, Abort))
    assert sum("another session" in message for message in messages) == 1, messages
    assert sum("did not connect within --handshake-timeout" in message for message in messages) == 1, messages
    assert not Path(f"{dest}.partial").exists()
    err = still_serves(procs, recv, tmp_path)
    assert "another session" in err and "did not connect within --handshake-timeout" in err


def test_channels_that_never_join_turn_the_sender_away_at_the_handshake_timeout(
    procs: Processes, tmp_path: Path
) -> None:
    """A sender whose other channels never come is told so; the receiver, which allocated nothing, waits on."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--handshake-timeout", "1s")
    first = FakePeer.connect(recv.address)
    first.send(hello(0))
    started = time.monotonic()
    abort = first.read_until(Abort)
    assert isinstance(abort, Abort) and "did not connect within --handshake-timeout" in abort.message
    assert time.monotonic() - started < 5
    assert recv.popen.poll() is None
    still_serves(procs, recv, tmp_path)
