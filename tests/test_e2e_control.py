"""Live control and statistics with real processes: `vmmig ctl` status/set/cancel, NDJSON --stats, --discard."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest

from .conftest import Processes, assert_no_destination, make_image

# Every field docs/STATS.md documents for progress records (QEMU's names first, then ours).
STATS_FIELDS = {
    "status", "total-time", "setup-time", "expected-downtime", "downtime", "transferred", "remaining", "total",
    "duplicate", "normal", "normal-bytes", "dirty-pages-rate", "mbps", "dirty-sync-count", "pages-per-second",
    "cpu-throttle-percentage", "image-bytes", "image-bytes-per-second", "image-mbytes-per-second",
    "compression-ratio", "raw-batches", "compressed-batches", "page-size", "pass", "cap", "role", "threads",
}  # fmt: skip


def ctl(procs: Processes, socket: Path, *args: str) -> tuple[int, object, str]:
    code, out, err = procs.run("ctl", str(socket), *args, timeout=20)
    return code, (json.loads(out) if code == 0 else None), err


def wait_for(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.fixture
def random_image(tmp_path: Path) -> Path:
    return make_image(tmp_path / "random.img", 8 << 20, profile="random")


def test_status_reports_live_statistics_and_the_socket_is_private(
    procs: Processes, tmp_path: Path, random_image: Path
) -> None:
    sock = tmp_path / "send.sock"
    recv_sock = tmp_path / "recv.sock"
    recv = procs.recv(tmp_path / "dest.img", "--control", str(recv_sock))
    send = procs.send(random_image, recv.address, "--max-bandwidth", "4M", "--control", str(sock))
    wait_for(sock)
    assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
    time.sleep(1.0)
    code, status, err = ctl(procs, sock, "status")
    assert code == 0, err
    assert isinstance(status, dict) and status["status"] == "active" and status["role"] == "send"
    assert 0 < status["transferred"] < 8 << 20 and status["total"] == 8 << 20 and status["cap"] == 4_000_000
    code, recv_status, err = ctl(procs, recv_sock, "status")
    assert code == 0 and isinstance(recv_status, dict) and recv_status["role"] == "recv", err
    assert send.wait()[0] == 0 and recv.wait()[0] == 0
    assert not sock.exists() and not recv_sock.exists(), "control sockets are removed at exit"


def test_set_max_bandwidth_takes_effect_on_the_running_migration(
    procs: Processes, tmp_path: Path, random_image: Path
) -> None:
    sock = tmp_path / "send.sock"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(random_image, recv.address, "--max-bandwidth", "1M", "--compress", "none", "--control", str(sock))
    wait_for(sock)
    time.sleep(0.5)
    code, reply, err = ctl(procs, sock, "set", "max-bandwidth", "0")
    assert code == 0 and reply == {"max-bandwidth": 0}, err
    started = time.monotonic()
    assert send.wait()[0] == 0
    # At 1 MB/s the 8 MiB image would need ~8 s more; lifting the cap must finish it far sooner.
    assert time.monotonic() - started < 4
    assert recv.wait()[0] == 0


def test_set_rejects_unknown_names_and_bad_values(procs: Processes, tmp_path: Path, random_image: Path) -> None:
    sock = tmp_path / "send.sock"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(random_image, recv.address, "--max-bandwidth", "2M", "--control", str(sock))
    wait_for(sock)
    code, _, err = ctl(procs, sock, "set", "colour", "blue")
    assert code == 2 and "cannot set 'colour'" in err
    code, _, err = ctl(procs, sock, "set", "downtime-limit", "300")
    assert code == 2 and "unit is required" in err
    code, reply, _ = ctl(procs, sock, "set", "downtime-limit", "500ms")
    assert code == 0 and reply == {"downtime-limit": 500.0}
    ctl(procs, sock, "set", "max-bandwidth", "0")
    assert send.wait()[0] == 0 and recv.wait()[0] == 0


@pytest.mark.parametrize("side", ["send", "recv"])
def test_cancel_stops_both_ends_with_the_cancelled_code(
    procs: Processes, tmp_path: Path, random_image: Path, side: str
) -> None:
    sock = tmp_path / f"{side}.sock"
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, *(["--control", str(sock)] if side == "recv" else []))
    send = procs.send(
        random_image, recv.address, "--max-bandwidth", "2M", *(["--control", str(sock)] if side == "send" else [])
    )
    wait_for(sock)
    time.sleep(0.5)
    code, reply, err = ctl(procs, sock, "cancel")
    assert code == 0 and reply == "cancelling", err
    send_code, _, send_err = send.wait()
    recv_code, _, recv_err = recv.wait()
    assert (send_code, recv_code) == (9, 9), send_err + recv_err
    assert "cancelled by vmmig ctl" in (send_err if side == "send" else recv_err)
    assert "peer: cancelled by vmmig ctl" in (recv_err if side == "send" else send_err)
    assert_no_destination(dest)


def test_ctl_without_a_migration_says_so(procs: Processes, tmp_path: Path) -> None:
    code, _, err = ctl(procs, tmp_path / "nothing.sock", "status")
    assert code == 2 and "is a vmmig with --control running?" in err


def test_ndjson_stats_carry_the_documented_fields_and_never_run_backwards(
    procs: Processes, tmp_path: Path, random_image: Path
) -> None:
    log = tmp_path / "stats.ndjson"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(random_image, recv.address, "--max-bandwidth", "3M", "--stats", str(log))
    assert send.wait()[0] == 0 and recv.wait()[0] == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    progress = [r for r in records if r["event"] == "progress"]
    assert len(progress) >= 2, "one progress object a second over a ~3 s migration"
    for record in progress:
        assert record.keys() >= STATS_FIELDS, STATS_FIELDS - record.keys()
    for key in ("transferred", "total-time", "duplicate", "normal"):
        values = [r[key] for r in progress]
        assert values == sorted(values), f"{key} ran backwards: {values}"
    passes = [r for r in records if r["event"] == "pass"]
    assert [p["pass"] for p in passes] == [1]
    assert records[-1]["event"] == "completed" and records[-1]["digest"]


def test_stats_to_stdout_mixes_with_the_json_report_as_ndjson(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img")
    code, out, _ = procs.send(image_8m, recv.address, "--stats", "-", "--json").wait()
    assert code == 0
    lines = [json.loads(line) for line in out.splitlines()]
    assert lines[-2]["event"] == "completed" and lines[-1]["status"] == "completed"


def test_without_a_terminal_there_is_no_animation(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img")
    code, _, err = procs.send(image_8m, recv.address).wait()
    assert code == 0
    assert "\x1b[" not in err and "━" not in err, "no escape codes or bars when stderr is a pipe"
    assert [line.split(":")[1].strip().split()[0] for line in err.splitlines()] == ["pass", "verified"]
    _, _, recv_err = recv.wait()
    assert "\x1b[" not in recv_err


def test_verbose_adds_phase_lines(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img", "--verbose")
    code, _, err = procs.send(image_8m, recv.address, "--verbose").wait()
    assert code == 0 and "connected to" in err and "destination allocated" in err
    assert "sender connected" in recv.wait()[2]


def test_discard_receiver_verifies_without_keeping_anything(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    before = set(tmp_path.iterdir())
    recv = procs.start(
        "recv", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "ready"), "--discard", "--json"
    )
    wait_for(tmp_path / "ready")
    address = (tmp_path / "ready").read_text().strip()
    code, out, _ = procs.send(image_8m, address, "--json").wait()
    recv_code, recv_out, _ = recv.wait()
    assert (code, recv_code) == (0, 0)
    assert json.loads(out)["digest"] == json.loads(recv_out)["digest"]
    assert json.loads(recv_out)["discard"] is True
    assert set(tmp_path.iterdir()) - before == {tmp_path / "ready"}


def test_discard_receiver_still_catches_a_wrong_digest(procs: Processes, tmp_path: Path) -> None:
    from migrate_cli.wire.frames import Encoding, End, Hello, Pages, Result, Welcome

    from .encoded import fingerprinted
    from .fakepeer import FakePeer

    recv = procs.start("recv", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "ready"), "--discard")
    wait_for(tmp_path / "ready")
    peer = FakePeer.connect((tmp_path / "ready").read_text().strip())
    peer.send(Hello(4096, 8192, Encoding.ZLIB, 1, b"d" * 16, 2))
    peer.read_until(Welcome)
    peer.send(fingerprinted(Pages(0, 2, Encoding.RAW, b"\x00", b"\x05" * 8192)), End(2, 1, b"\x00" * 16))
    assert peer.read_until(Result).status == 1
    code, _, err = recv.wait()
    assert code == 7 and "digest mismatch" in err


def test_recv_needs_dest_or_discard(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0")
    assert code == 2 and "--discard" in err
