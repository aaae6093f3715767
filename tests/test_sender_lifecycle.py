"""The sender's lifecycle and its single owners: the phase table, the guest hold, the bandwidth cap (one rate for the
bucket, the auto policy, the statistics and the report, also after `vmmig ctl set`), what the receiver holds, and
option combinations checked in one place."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest

from migrate_cli.errors import NetworkError, UsageError
from migrate_cli.ratelimit import BandwidthCap, TokenBucket
from migrate_cli.sender.adaptive import AutoPolicy
from migrate_cli.sender.failure_rules import ResumableFailure, conclude
from migrate_cli.sender.guest_hold import GuestHold
from migrate_cli.sender.handshake import SessionRecord
from migrate_cli.sender.lifecycle import TRANSITIONS, Lifecycle, Phase
from migrate_cli.sender.options import SendOptions
from migrate_cli.sender.receiver_copy import ReceiverCopy
from migrate_cli.stats import Stats
from migrate_cli.wire.digest import image_digest

from .conftest import Processes, make_image
from .test_e2e_control import ctl, wait_for

# -- the phases --------------------------------------------------------------------------------------------------


def test_the_lifecycle_moves_only_along_its_table() -> None:
    life = Lifecycle()
    assert life.phase is Phase.CONNECTING and not life.started and not life.end_sent
    with pytest.raises(AssertionError, match="connecting to verifying"):
        life.move(Phase.VERIFYING)  # END before WELCOME: a bug, refused
    for phase in (Phase.TRANSFER, Phase.VERIFYING, Phase.VERIFIED, Phase.HANDING_OVER):
        life.move(phase)
    assert life.started and life.end_sent and life.dest_may_run
    with pytest.raises(AssertionError):
        life.move(Phase.TRANSFER)
    assert all(phase in TRANSITIONS for phase in Phase), "every phase has its row"


def test_what_a_failure_means_reads_off_the_phase(tmp_path: Path) -> None:
    """Before WELCOME nothing is resumable; after it a link fault is; after END the message says DEST may be out."""
    opts = SendOptions(source=str(tmp_path / "img"), destination="127.0.0.1:1", state_file=str(tmp_path / "state"))
    record = SessionRecord(opts, resuming=False)
    life = Lifecycle()
    link = NetworkError("connection reset")
    assert conclude(link, life, record, handoff=False) is link
    life.move(Phase.TRANSFER)
    assert isinstance(conclude(link, life, record, handoff=False), ResumableFailure)
    assert conclude(link, life, record, handoff=True) is link, "a QEMU handoff cannot be resumed"
    life.move(Phase.VERIFYING)
    assert "may have verified and published DEST" in str(conclude(link, life, record, handoff=False))


class FakePauser:
    description = "fake"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pause(self) -> None:
        self.calls.append("pause")

    def resume(self) -> None:
        self.calls.append("resume")


def test_a_paused_guest_is_resumed_after_a_failure_unless_it_must_stay_stopped() -> None:
    pauser = FakePauser()
    hold = GuestHold(pauser, lambda _m: None)
    hold.settle_after_failure(keep_stopped=False)
    assert pauser.calls == [], "never paused: nothing to resume"
    hold.pause()
    hold.settle_after_failure(keep_stopped=True)
    assert hold.paused and pauser.calls == ["pause"]
    hold.settle_after_failure(keep_stopped=False)
    assert not hold.paused and pauser.calls == ["pause", "resume"]


# -- one owner for the cap ---------------------------------------------------------------------------------------


def test_one_cap_is_read_by_the_bucket_the_auto_policy_and_the_statistics() -> None:
    cap = BandwidthCap(5_000_000)
    bucket, auto, stats = TokenBucket(cap), AutoPolicy(2, cap=cap), Stats(bandwidth=cap)
    cap.set(20_000_000)
    assert bucket.rate == auto.cap == stats.snapshot().cap == 20_000_000
    cap.set(0)
    assert bucket.rate is None and auto.cap is None and stats.snapshot().cap == 0


def test_ctl_set_max_bandwidth_is_what_the_final_report_says(procs: Processes, tmp_path: Path) -> None:
    """The report's max-bandwidth is the rate in force at the end, not the command line's (it was stale)."""
    image = make_image(tmp_path / "random.img", 8 << 20, profile="random")
    sock = tmp_path / "send.sock"
    recv = procs.recv(tmp_path / "dest.img")
    send = procs.send(
        image, recv.address, "--max-bandwidth", "5M", "--compress", "none", "--json", "--control", str(sock)
    )
    wait_for(sock)
    time.sleep(0.3)
    code, reply, err = ctl(procs, sock, "set", "max-bandwidth", "20M")
    assert code == 0 and reply == {"max-bandwidth": 20_000_000}, err
    code, out, err = send.wait()
    assert code == 0, err
    report = json.loads(out)
    assert report["max-bandwidth"] == 20_000_000 and report["cap"] == 20_000_000
    assert recv.wait()[0] == 0


# -- one owner for what the receiver holds -------------------------------------------------------------------------


def test_the_receiver_copy_records_in_place_and_digests_what_it_holds() -> None:
    held = ReceiverCopy(8)
    array = held.as_array()
    held.record(slice(0, 4), np.uint64(7))
    held.record(np.arange(4, 8), np.arange(4, 8, dtype=np.uint64))
    assert held.as_array() is array, "no copy: the trackers compare against the array the workers write"
    assert held.digest() == image_digest(np.array([7, 7, 7, 7, 4, 5, 6, 7], dtype=np.uint64))
    held.replace_from(np.zeros(8, dtype=np.uint64))
    assert held.as_array() is array and held.differing(np.ones(8, dtype=np.uint64)) == 8


# -- option combinations, checked in one place ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [512, 32 << 20])
def test_the_batch_size_limit_is_an_option_check(size: int) -> None:
    with pytest.raises(UsageError, match="between the page size and 16MiB"):
        SendOptions(source="img", destination="127.0.0.1:1", batch_size=size).check()


def test_a_batch_size_out_of_range_is_a_usage_error(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "img", 1 << 20)
    code, _, err = procs.run("send", str(image), "127.0.0.1:9", "--batch-size", "32MiB")
    assert code == 2 and "must be between the page size and 16MiB" in err
