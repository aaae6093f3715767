"""Live migration end to end: a real writing guest (examples/guest_workload.py), real vmmig processes on 127.0.0.1.

After a successful live migration the source guest stays paused, so DEST must equal the paused source byte for
byte: a single stale page is a critical bug.
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest

from .conftest import Processes, assert_no_destination, make_image
from .fakeqmp import FakeQmp
from .guest import Guest, start_guest


def migrate(procs: Processes, image: Path, dest: Path, *send_args: str) -> tuple[int, dict, str, int, str]:
    recv = procs.recv(dest)
    send = procs.send(image, recv.address, "--json", *send_args)
    code, out, err = send.wait(timeout=120)
    recv_code, _, recv_err = recv.wait(timeout=30)
    return code, (json.loads(out) if out.strip() else {}), err, recv_code, recv_err


@pytest.mark.parametrize("round_", range(3))
@pytest.mark.parametrize("codec", ["zlib", "zstd", "none"])
def test_live_migration_of_a_writing_guest_is_byte_identical_to_the_paused_source(
    procs: Processes, guests: list[Guest], tmp_path: Path, codec: str, round_: int
) -> None:
    image = make_image(tmp_path / "vm.ram", 32 << 20, seed=round_ + 1)
    guest = start_guest(guests, image, tmp_path, "--threads", "4", "--rate", "8M", "--seed", str(round_ + 1))
    dest = tmp_path / "dest.ram"
    code, report, err, recv_code, recv_err = migrate(
        procs, image, dest, "--live", "--pause-pid", str(guest.pid), "--compress", codec, "--max-bandwidth", "40M"
    )
    assert (code, recv_code) == (0, 0), err + recv_err
    assert guest.is_paused(), "after a successful switchover the source guest stays paused"
    assert dest.read_bytes() == image.read_bytes()
    assert report["mode"] == "live" and report["converged"] is True
    assert len(report["passes"]) >= 2 and report["passes"][-1]["paused"] is True
    assert report["passes"][1]["dirty-pages"] > 0, "the guest wrote during pass 1: pass 2 must resend pages"
    assert report["downtime"] is not None and report["downtime"] > 0
    assert report["dirty-sync-count"] >= 2


@pytest.mark.parametrize(
    "workload",
    [
        ("--pattern", "uniform", "--zero-fraction", "0.5"),  # pages that become zero must be zeroed at DEST
        ("--pattern", "hotset", "--restore-fraction", "0.5"),  # pages that change back to what was sent
        ("--pattern", "sweep", "--threads", "8"),
    ],
    ids=["zeroing", "restoring", "sweep"],
)
def test_pages_that_change_back_or_become_zero_arrive_right(
    procs: Processes, guests: list[Guest], tmp_path: Path, workload: tuple[str, ...]
) -> None:
    image = make_image(tmp_path / "vm.ram", 32 << 20, seed=5)
    guest = start_guest(guests, image, tmp_path, "--rate", "8M", *workload)
    dest = tmp_path / "dest.ram"
    code, report, err, recv_code, _ = migrate(
        procs, image, dest, "--live", "--pause-pid", str(guest.pid), "--max-bandwidth", "40M"
    )
    assert (code, recv_code) == (0, 0), err
    assert dest.read_bytes() == image.read_bytes()
    assert sum(p["pages"] for p in report["passes"][1:]) > 0, "the guest's writes must have been re-sent"


def outwritten_migration(
    procs: Processes, guests: list[Guest], tmp_path: Path, *send_args: str
) -> tuple[Guest, Path, Path, tuple[int, dict, str, int, str]]:
    """A live migration that cannot converge: a guest writing random pages at 20 MB/s over a 4 MB/s link, with a
    50 ms downtime limit. Returns (guest, image, DEST, what migrate() returns)."""
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random")
    guest = start_guest(guests, image, tmp_path, "--threads", "2", "--rate", "20M")
    dest = tmp_path / "dest.ram"
    result = migrate(
        procs, image, dest, "--live", "--pause-pid", str(guest.pid), "--compress", "none",
        "--max-bandwidth", "4M", "--downtime-limit", "50ms", *send_args,
    )  # fmt: skip
    return guest, image, dest, result


def test_no_convergence_with_abort_leaves_the_guest_running_and_dest_absent(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    guest, _, dest, (code, _, err, recv_code, recv_err) = outwritten_migration(
        procs, guests, tmp_path, "--max-passes", "3"
    )
    assert code == 10 and "did not converge after 3 passes" in err
    assert recv_code == 8 and "peer: did not converge" in recv_err
    assert not guest.is_paused(), "with --on-no-converge abort the guest keeps running"
    assert_no_destination(dest)


def test_no_convergence_with_switchover_is_correct_and_reports_the_long_downtime(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    _, image, dest, (code, report, err, recv_code, _) = outwritten_migration(
        procs, guests, tmp_path, "--max-passes", "2", "--on-no-converge", "switchover"
    )
    assert (code, recv_code) == (0, 0), err
    assert "switching over anyway" in err
    assert report["converged"] is False and report["downtime"] > 50
    assert dest.read_bytes() == image.read_bytes()


def test_a_failure_after_the_pause_resumes_the_guest(procs: Processes, guests: list[Guest], tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    guest = start_guest(guests, image, tmp_path, "--rate", "4M")
    dest = tmp_path / "dest.ram"
    recv = procs.recv(dest)
    # The pause hook stops the guest and kills the receiver (and gives the kernel a moment to report the closed
    # connection): the failure lands right after the pause, before the last pages could go out.
    pause = f"kill -STOP {guest.pid}; kill -9 {recv.popen.pid}; sleep 0.5"
    send = procs.send(image, recv.address, "--live", "--pause-cmd", pause, "--unpause-cmd", f"kill -CONT {guest.pid}")
    code, _, err = send.wait(60)
    assert code == 5, err
    assert "guest resumed on the source" in err
    time.sleep(0.2)
    assert not guest.is_paused()
    assert not dest.exists()


def test_a_verdict_lost_after_the_end_frame_leaves_the_guest_paused_outcome_unknown(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    from migrate_cli.wire.conversation import Role
    from migrate_cli.wire.frames import End, Hello, Welcome

    from .fakepeer import FakePeer

    image = make_image(tmp_path / "vm.ram", 8 << 20)
    guest = start_guest(guests, image, tmp_path, "--rate", "2M")
    listener = socket.create_server(("127.0.0.1", 0))
    send = procs.send(image, f"127.0.0.1:{listener.getsockname()[1]}", "--live", "--pause-pid", str(guest.pid))
    conn, _ = listener.accept()
    peer = FakePeer(conn, Role.RECEIVER)
    peer.read_until(Hello)
    peer.send(Welcome())
    peer.read_until(End)
    peer.close()  # the link dies with the verdict unsent
    listener.close()
    code, _, err = send.wait(30)
    assert code == 11 and "the guest stays paused" in err
    assert guest.is_paused(), "never resume a guest whose destination may already be running"


def test_stop_and_copy_pauses_first_and_copies_once(procs: Processes, guests: list[Guest], tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    guest = start_guest(guests, image, tmp_path, "--rate", "20M")
    dest = tmp_path / "dest.ram"
    code, report, err, recv_code, _ = migrate(procs, image, dest, "--pause-pid", str(guest.pid))
    assert (code, recv_code) == (0, 0), err
    assert report["mode"] == "stop-and-copy"
    assert guest.is_paused()
    assert dest.read_bytes() == image.read_bytes()


def test_a_changing_source_without_live_or_pause_fails_and_suggests_live(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    start_guest(guests, image, tmp_path, "--rate", "20M")
    dest = tmp_path / "dest.ram"
    code, _, err, recv_code, recv_err = migrate(procs, image, dest)
    assert code == 3 and "changed while it was sent" in err and "--live" in err
    assert recv_code == 8 and "peer: source" in recv_err
    assert_no_destination(dest)


def test_live_over_qmp_pauses_with_stop_and_confirms_with_query_status(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    guest = start_guest(guests, image, tmp_path, "--rate", "8M")
    qmp = FakeQmp(str(tmp_path / "qmp.sock"), guest.pid)
    try:
        dest = tmp_path / "dest.ram"
        code, _, err, recv_code, _ = migrate(procs, image, dest, "--live", "--qmp", qmp.path)
    finally:
        qmp.close()
    assert (code, recv_code) == (0, 0), err
    assert qmp.commands[:3] == ["qmp_capabilities", "stop", "query-status"]
    assert "cont" not in qmp.commands
    assert dest.read_bytes() == image.read_bytes()


def test_auto_converge_throttles_a_guest_that_outruns_the_link(
    procs: Processes, guests: list[Guest], tmp_path: Path
) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20, profile="random")
    guest = start_guest(guests, image, tmp_path, "--threads", "2", "--rate", "12M", "--pattern", "hotset",
                        "--hot-fraction", "0.5")  # fmt: skip
    dest = tmp_path / "dest.ram"
    code, report, err, recv_code, _ = migrate(
        procs, image, dest, "--live", "--pause-pid", str(guest.pid), "--compress", "none",
        "--max-bandwidth", "8M", "--auto-converge", "--max-passes", "30",
    )  # fmt: skip
    assert (code, recv_code) == (0, 0), err
    assert report["cpu-throttle-percentage"] >= 20
    assert dest.read_bytes() == image.read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--live"], "--live needs a way to pause"),
        (["--auto-converge", "--live", "--pause-cmd", "true", "--unpause-cmd", "true"], "--auto-converge needs"),
        (["--pause-cmd", "true"], "--pause-cmd and --unpause-cmd go together"),
        (["--pause-pid", "1", "--qmp", "/x"], "choose one of"),
    ],
)
def test_live_option_conflicts_are_usage_errors(
    procs: Processes, tmp_path: Path, args: list[str], message: str
) -> None:
    image = make_image(tmp_path / "vm.ram", 1 << 20)
    code, _, err = procs.send(image, "127.0.0.1:9", *args).wait()
    assert code == 2 and message in err
