"""Hardening regressions: each test is a way vmmig lost data or a host before, tried on real processes.

Items of the hardening issue covered here: a pause that does not stop the writer (2), a stranger on the
receiver's port (5), a HELLO that claims a huge image (6), a receiver that echoes instead of verifying (7), a second
signal during cleanup (8), and a sender whose first connection fails (12). TLS, the guest hooks, the control socket,
the files vmmig creates and sparse images have files of their own (test_hardening_*.py).
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.protocol import FEATURE_QEMU_HANDOFF, End, Hello, Result, Role, Welcome

from .conftest import Processes, assert_no_destination, last_line, make_image
from .fakepeer import FakePeer
from .test_e2e_live import Guest, start_guest


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for guest in started:
        guest.kill()


@pytest.fixture
def fake_receiver() -> Iterator[socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    yield listener
    listener.close()


def address_of(listener: socket.socket) -> str:
    return f"127.0.0.1:{listener.getsockname()[1]}"


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
    image = make_image(tmp_path / "vm.ram", 2 << 20)
    send = procs.send(image, address_of(fake_receiver))
    conn, _ = fake_receiver.accept()
    peer = FakePeer(conn, Role.RECEIVER)
    peer.read_until(Hello)
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
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    send = procs.send(image, address_of(fake_receiver))
    conn, _ = fake_receiver.accept()
    peer = FakePeer(conn, Role.RECEIVER)
    hello = peer.read_until(Hello)
    assert isinstance(hello, Hello) and not hello.features & FEATURE_QEMU_HANDOFF
    peer.send(Welcome(features=FEATURE_QEMU_HANDOFF))
    code, _, err = send.wait(30)
    peer.close()
    assert code == 6, err
    assert "offered only" in last_line(err)
