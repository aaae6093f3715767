"""--progress-timeout: a run that stops moving is given up, on either end, with exit 17 (stalled).

Progress is a page sent (sender) or landed in DEST (receiver), or a pass ending; keepalives are not progress. A
stall keeps the session for --resume as a lost link does (the sender's state file, DEST.partial and its state
file), resumes a guest the sender paused, and is not retried by --retries. Without the option nothing changes
(the rest of the suite runs without it). Timings are generous: the machine is small and noisy.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.wire.frames import Abort, Encoding, Hello, Keepalive, Pages, Welcome

from .conftest import Proc, Processes, address_of, last_line, make_image, resume_files_kept
from .encoded import fingerprinted
from .fakepeer import FakePeer

MiB = 1 << 20
PS = 4096
STALLED = 17


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """96 MiB of random pages: at 8 MB/s, far more than loopback's socket buffers hold when the receiver stops
    (loopback autotuning may grow a receive buffer to net.ipv4.tcp_rmem's maximum, 32 MiB on Debian: 32 MiB of
    pages could all be buffered before a late stop, and the sender would never stall)."""
    return make_image(tmp_path / "vm.ram", 96 * MiB, profile="random", seed=5)


@pytest.fixture
def guest() -> Iterator[subprocess.Popen[bytes]]:
    """A process standing in for the guest: --pause-pid stops and continues it (it writes nothing)."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc
    proc.kill()
    proc.wait(5)


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def stopped_receiver_run(procs: Processes, source: Path, dest: Path, *send_args: str) -> tuple[Proc, int, str, float]:
    """`vmmig send --progress-timeout 2s` to a `vmmig recv` that is SIGSTOPped once the session started: the
    receiver (continued afterwards: it sees the link lost and waits --resume-window), the sender's exit code and
    stderr, and how long the sender ran after the stop."""
    recv = procs.recv(dest, "--resume-window", "60s")
    send = procs.send(
        source, recv.address, "--compress", "none", "--max-bandwidth", "8M", "--progress-timeout", "2s", *send_args
    )
    deadline = time.monotonic() + 30
    while not Path(f"{dest}.partial.state").exists():  # the receiver accepted the session (before WELCOME)
        assert time.monotonic() < deadline and send.popen.poll() is None, "the session never started"
        time.sleep(0.05)
    time.sleep(1.0)  # pages flow (about 8 MB of the 96 sent a second), then the receiver stops reading
    os.kill(recv.popen.pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        code, _, err = send.wait(60)
    finally:
        os.kill(recv.popen.pid, signal.SIGCONT)
    return recv, code, err, time.monotonic() - stopped


def test_a_sender_whose_receiver_stops_reading_gives_up_resumes_the_guest_and_resume_completes(
    procs: Processes, tmp_path: Path, source: Path, guest: subprocess.Popen[bytes]
) -> None:
    """Stop-and-copy pauses the guest for the copy; the stall resumes it; `send --resume` finishes the migration
    (pausing it again) into the receiver that kept DEST.partial."""
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    args = ("--pause-pid", str(guest.pid), "--state-file", str(state))
    recv, code, err, seconds = stopped_receiver_run(procs, source, dest, *args)
    line = last_line(err)
    assert code == STALLED, err
    assert line.startswith("vmmig send: stalled: no page sent and no pass ended for 2s (--progress-timeout)"), err
    assert "of pass 1 left" in line and "vmmig send --resume" in line
    assert seconds < 20, "given up long before --io-timeout (30s) would have"
    assert "guest resumed on the source" in err and process_state(guest.pid) not in "Tt"
    assert state.exists(), "the sender keeps its session for --resume"

    code, _, err = procs.send(source, recv.address, "--compress", "none", "--resume", *args).wait(60)
    recv_code, _, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    assert dest.read_bytes() == source.read_bytes()
    assert not state.exists() and not resume_files_kept(dest)


def test_retries_do_not_retry_a_stall(procs: Processes, tmp_path: Path, source: Path) -> None:
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    args = ("--retries", "3", "--retry-delay", "200ms", "--state-file", str(state))
    _, code, err, _ = stopped_receiver_run(procs, source, dest, *args)
    assert code == STALLED and "retry 1 of" not in err, err
    assert len([line for line in err.splitlines() if "stalled" in line]) == 1, "one stall, one error line"
    assert state.exists()


def test_a_receiver_fed_only_keepalives_gives_up_at_once_and_keeps_dest_partial(
    procs: Processes, tmp_path: Path
) -> None:
    """A sender that is alive (keepalives) but sends no page: the receiver tells it why (ABORT, exit 17, resumable)
    and exits without waiting --resume-window, keeping DEST.partial and its state file for `recv --resume`."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--progress-timeout", "2s", "--resume-window", "60s")
    peer = FakePeer.connect(recv.address)
    peer.send(Hello(PS, 4 * PS, Encoding.ZLIB, 1, b"s" * 16, batch_pages=2))
    peer.read_until(Welcome)
    started = time.monotonic()
    peer.send(fingerprinted(Pages(0, 2, Encoding.RAW, b"\x00", b"\x05" * 2 * PS)))  # half the image, then nothing
    quiet = threading.Event()

    def keep_alive() -> None:
        while not quiet.wait(0.25):
            try:
                peer.send(Keepalive())
            except OSError:
                return

    ticker = threading.Thread(target=keep_alive, daemon=True)
    ticker.start()
    try:
        abort = peer.read_until(Abort)
        code, _, err = recv.wait(30)
    finally:
        quiet.set()
        ticker.join(5)
        peer.close()
    assert isinstance(abort, Abort) and abort.code == STALLED and abort.resumable, abort
    assert code == STALLED, err
    line = last_line(err)
    assert line.startswith("vmmig recv: stalled: no page landed and no pass ended for 2s (--progress-timeout)"), err
    assert f"vmmig recv --resume {dest}" in line
    assert time.monotonic() - started < 20, "no --resume-window wait after its own stall"
    assert resume_files_kept(dest) and not dest.exists()
    assert Path(f"{dest}.partial").read_bytes()[: 2 * PS] == b"\x05" * 2 * PS


def drain(peer: FakePeer) -> None:
    try:
        while peer.sock.recv(1 << 16):
            pass
    except OSError:
        pass


def test_a_sender_whose_receiver_gave_up_on_a_stall_exits_stalled_without_retrying(
    procs: Processes, tmp_path: Path, fake_receiver: socket.socket, image_8m: Path
) -> None:
    state = tmp_path / "send.state"
    send = procs.send(
        image_8m, address_of(fake_receiver), "--retries", "3", "--retry-delay", "200ms", "--state-file", str(state)
    )
    peer = FakePeer.accept(fake_receiver)
    peer.read_until(Hello)
    peer.send(Welcome(), Abort(STALLED, "stalled: no page landed and no pass ended for 2s", resumable=True))
    drain(peer)  # take the pages already on their way, as a receiver does, until the sender closes
    code, _, err = send.wait(30)
    peer.close()
    assert code == STALLED, err
    assert last_line(err).startswith("vmmig send: peer: stalled: no page landed") and "retry 1 of" not in err, err
    assert state.exists(), "the receiver said it keeps the session: so does the sender"
