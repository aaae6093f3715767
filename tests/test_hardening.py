"""Hardening regressions: each test is a way vmmig lost data or a host before, tried on real processes.

Items of the hardening issue covered here: a pause that does not stop the writer (2), a stranger on the
receiver's port (5), a HELLO that claims a huge image (6), a receiver that echoes instead of verifying (7), a second
signal during cleanup (8), and a sender whose first connection fails (12). TLS, the guest hooks, the control socket,
the files vmmig creates and sparse images have files of their own (test_hardening_*.py).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from migrate_cli.wire.frames import (
    FEATURE_PASS_LANDED,
    FEATURE_QEMU_HANDOFF,
    End,
    Hello,
    PassEnd,
    PassLanded,
    Result,
    Welcome,
)

from .conftest import (
    Processes,
    address_of,
    assert_no_destination,
    last_line,
    make_image,
    sender_met_by,
    still_serves,
)
from .fakepeer import FakePeer
from .guest import Guest, start_guest

# --- 2: stop-and-copy verifies that the pause held ---------------------------------------------------------------


@pytest.mark.parametrize(
    "pause",
    [
        pytest.param(["--pause-cmd", "true", "--unpause-cmd", "true"], id="hooks-that-do-nothing"),
        pytest.param(["--pause-pid", "OTHER"], id="pid-of-another-process"),
    ],
)
def test_stop_and_copy_fails_when_pages_change_while_paused(
    procs: Processes, guests: list[Guest], tmp_path: Path, pause: list[str]
) -> None:
    """A pause that does not stop the writer: exit 14 on the sender, nothing published, where before both ends
    exited 0 with an image that matched no moment of the source."""
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    start_guest(guests, image, tmp_path, "--rate", "20M")
    (tmp_path / "bystander").mkdir()
    other = make_image(tmp_path / "bystander" / "other.ram", 1 << 20)
    bystander = start_guest(guests, other, tmp_path / "bystander", "--rate", "1K")
    args = [str(bystander.pid) if a == "OTHER" else a for a in pause]
    dest = tmp_path / "dest.ram"
    recv = procs.recv(dest)
    code, _, err = procs.send(image, recv.address, "--max-bandwidth", "40M", *args).wait(120)
    recv_code, _, _ = recv.wait(30)
    assert code == 14, err
    assert "changed while the guest was paused" in last_line(err)
    assert recv_code != 0
    assert_no_destination(dest)


# --- 7: RESULT must prove the receiver computed the digest -----------------------------------------------------


def test_a_receiver_that_echoes_end_back_is_not_taken_for_a_verified_copy(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket
) -> None:
    """A receiver that stores nothing and answers with whatever END carries: the sender refuses (exit 7)."""
    send, peer, _ = sender_met_by(fake_receiver, procs, make_image(tmp_path / "vm.ram", 2 << 20))
    peer.send(Welcome())
    end = peer.read_until(End)
    echoed = dataclasses.astuple(end)[2]  # the 16 bytes END carries, whatever the field is called
    peer.send(Result(0, echoed))
    code, _, err = send.wait(30)
    peer.close()
    assert code == 7, err
    assert "digest mismatch" in last_line(err)


def test_a_welcome_with_features_the_sender_did_not_offer_is_refused(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket
) -> None:
    send, peer, hello = sender_met_by(fake_receiver, procs, make_image(tmp_path / "vm.ram", 1 << 20))
    assert not hello.features & FEATURE_QEMU_HANDOFF
    peer.send(Welcome(features=FEATURE_QEMU_HANDOFF))
    code, _, err = send.wait(30)
    peer.close()
    assert code == 6, err
    assert "offered only" in last_line(err)


def test_a_pass_landed_the_sender_did_not_ask_for_is_a_protocol_error(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket
) -> None:
    """A plain copy does not ask to hear of landed passes; a receiver that reports one anyway is refused (exit 6)."""
    send, peer, hello = sender_met_by(fake_receiver, procs, make_image(tmp_path / "vm.ram", 1 << 20))
    assert not hello.features & FEATURE_PASS_LANDED
    peer.send(Welcome(), PassLanded(1))
    code, _, err = send.wait(30)
    peer.close()
    assert code == 6, err
    assert "PASS_LANDED" in last_line(err)


def test_a_live_sender_asks_for_landed_passes_and_refuses_one_out_of_order(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket
) -> None:
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    send = procs.send(image, address_of(fake_receiver), "--live", "--pause-cmd", "true", "--unpause-cmd", "true")
    peer = FakePeer.accept(fake_receiver)
    hello = peer.read_until(Hello)
    assert isinstance(hello, Hello) and hello.features & FEATURE_PASS_LANDED
    peer.send(Welcome(features=FEATURE_PASS_LANDED))
    peer.read_until(PassEnd)
    peer.send(PassLanded(2))  # pass 1 is the one that ended
    code, _, err = send.wait(30)
    peer.close()
    assert code == 6, err
    assert "PASS_LANDED 2 after PASS_LANDED 0" in last_line(err)


# --- 5: a stranger on the port does not end a waiting receiver ----------------------------------------------------


def test_a_silent_stranger_does_not_delay_the_real_sender(procs: Processes, tmp_path: Path) -> None:
    """Handshakes run concurrently: a connection that never speaks is turned away at --handshake-timeout while the
    real sender, arriving a moment later, migrates at once (before, it failed after 9 s and the receiver exited 5)."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--handshake-timeout", "30s")
    host, port = recv.address.rsplit(":", 1)
    stranger = socket.create_connection((host, int(port)))
    try:
        image = make_image(tmp_path / "vm.ram", 4 << 20)
        code, _, err = procs.send(image, recv.address).wait(20)
        recv_code, _, recv_err = recv.wait(20)
    finally:
        stranger.close()
    assert (code, recv_code) == (0, 0), err + recv_err
    assert dest.read_bytes() == image.read_bytes()


@pytest.mark.parametrize(
    "probe",
    [
        pytest.param(b"abc", id="three-bytes"),
        pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", id="http-probe"),
        pytest.param(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32), id="tls-client-hello"),
    ],
)
def test_garbage_from_a_stranger_is_logged_and_the_receiver_waits_on(
    procs: Processes, tmp_path: Path, probe: bytes
) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    host, port = recv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as stranger:
        stranger.sendall(probe)
        stranger.shutdown(socket.SHUT_WR)
        stranger.settimeout(10)
        while stranger.recv(4096):  # the receiver answers (ABORT) and closes: the stranger's handshake is over
            pass
    assert recv.popen.poll() is None
    err = still_serves(procs, recv, tmp_path)
    assert len([line for line in err.splitlines() if "refused a connection from 127.0.0.1:" in line]) == 1, err


def test_garbage_during_the_resume_window_does_not_end_the_parked_session(procs: Processes, tmp_path: Path) -> None:
    """A parked session waits for its sender: a stranger's bytes are turned away, and send --resume still finds it."""
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random")
    recv = procs.recv(dest, "--resume-window", "60s")
    args = ("--compress", "none", "--batch-size", "256K", "--state-file", str(state))
    first = procs.send(image, recv.address, "--max-bandwidth", "4M", *args)
    deadline = time.monotonic() + 20
    while not Path(f"{dest}.partial.state").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # some batches land
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    time.sleep(0.5)  # the receiver notices and parks
    host, port = recv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as stranger:
        stranger.sendall(b"\x00\x01garbage" * 10)
        stranger.shutdown(socket.SHUT_WR)
        stranger.settimeout(10)
        while stranger.recv(4096):
            pass
    assert recv.popen.poll() is None, "the parked receiver must survive the stranger"
    code, _, err = procs.send(image, recv.address, "--resume", *args).wait(60)
    recv_code, _, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    assert dest.read_bytes() == image.read_bytes()


# --- 6: a HELLO that claims a huge image and hangs up ---------------------------------------------------------------


def test_a_hello_that_hangs_up_after_welcome_leaves_nothing_behind(procs: Processes, tmp_path: Path) -> None:
    """56 bytes claiming 1 GiB, then gone: no DEST.partial parked (nothing was received), no allocation left running,
    and the receiver waits for a real sender (before: a 1 GiB partial parked, blocking the next plain recv)."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    peer = FakePeer.connect(recv.address)
    peer.send(Hello(4096, 1 << 30, 1, 1, b"s" * 16, batch_pages=256))
    peer.read_until(Welcome)
    peer.close()
    deadline = time.monotonic() + 10
    while Path(f"{dest}.partial").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"{dest}.partial").exists(), "a partial nothing reached is not kept"
    assert not Path(f"{dest}.partial.state").exists()
    assert recv.popen.poll() is None
    err = still_serves(procs, recv, tmp_path)
    assert "nothing was received" in err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("dest")) == ["dest.img"]


# --- 8: a second signal during cleanup ---------------------------------------------------------------------------


@pytest.mark.parametrize("signals", [(signal.SIGTERM, signal.SIGINT), (signal.SIGINT, signal.SIGINT, signal.SIGTERM)])
def test_a_second_signal_during_cleanup_still_resumes_the_guest(
    procs: Processes, guests: list[Guest], tmp_path: Path, signals: tuple[int, ...]
) -> None:
    image = make_image(tmp_path / "vm.ram", 32 << 20, profile="random")
    guest = start_guest(guests, image, tmp_path, "--rate", "1M")
    dest = tmp_path / "dest.ram"
    recv = procs.recv(dest)
    send = procs.send(image, recv.address, "--pause-pid", str(guest.pid), "--max-bandwidth", "4M")
    deadline = time.monotonic() + 20
    while not guest.is_paused() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert guest.is_paused(), "stop-and-copy pauses first"
    time.sleep(0.5)
    for signum in signals:
        os.kill(send.popen.pid, signum)
        time.sleep(0.05)  # inside the first signal's cleanup (the abort drain lingers ~0.5 s)
    code, _, err = send.wait(30)
    recv.wait(30)
    assert code == (143 if signals[0] == signal.SIGTERM else 130), err
    assert not guest.is_paused(), "whatever signals arrive, the guest is resumed as after one"
    assert "Traceback" not in err


# --- 12: a sender whose first connection fails ---------------------------------------------------------------------


def test_a_session_that_never_started_leaves_no_state_file(procs: Processes, tmp_path: Path) -> None:
    state = tmp_path / "send.state"
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, _, err = procs.send(image, f"127.0.0.1:{port}", "--connect-timeout", "1s", "--state-file", str(state)).wait()
    assert code == 5, err
    assert not state.exists(), "no receiver ever saw this session: nothing to resume"
