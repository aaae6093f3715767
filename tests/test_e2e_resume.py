"""Resume: a link fault or a killed vmmig does not send a migration back to zero.

The receiver keeps DEST.partial and DEST.partial.state when the link drops and waits --resume-window for the same
session; `recv --resume DEST` adopts them after a crash. The sender records its session in a state file; `send
--resume` (or --retries) reconnects, learns what DEST.partial holds, and sends only what is missing or changed.
The end-to-end digest is unchanged: every completion below is also compared byte for byte.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from .conftest import (
    Processes,
    json_report,
    last_line,
    make_image,
    migrate_through_fault,
    resume_files_kept,
    wait_until_landed,
)
from .faultproxy import FaultProxy
from .guest import Guest, start_guest

MiB = 1 << 20


def missing_bytes(source: Path, partial: Path, page: int = 4096) -> int:
    """Bytes of the pages DEST.partial does not hold yet, compared page by page with the source."""
    a, b = source.read_bytes(), partial.read_bytes()
    return sum(page for i in range(0, len(a), page) if a[i : i + page] != b[i : i + page])


def assert_clean_success(dest: Path, source: Path) -> None:
    assert dest.read_bytes() == source.read_bytes()
    assert not Path(f"{dest}.partial").exists() and not Path(f"{dest}.partial.state").exists()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return make_image(tmp_path / "vm.ram", 16 * MiB, profile="random", seed=7)


# --- link faults, healed by --retries -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fault", "at", "cause"),
    [
        ("cut", 6 * MiB, "connection"),
        ("flip", 5 * MiB, "does not match the fingerprint the sender took of it"),
        ("stall", 6 * MiB, "--io-timeout"),
    ],
)
def test_a_link_fault_is_resumed_by_retries_and_only_the_rest_is_sent(
    procs: Processes, tmp_path: Path, source: Path, fault: str, at: int, cause: str
) -> None:
    """A flipped bit lands in page data (protocol 3: caught by the page check, naming the page; it was a CRC
    mismatch before): resumed like any link fault, and the damaged page is sent again."""
    dest = tmp_path / "dest.img"
    run = migrate_through_fault(
        procs, source, dest, fault, at, ("--json", "--io-timeout", "2s"),
        ("--json", "--compress", "none", "--retries", "2", "--retry-delay", "200ms", "--io-timeout", "2s",
         "--state-file", str(tmp_path / "send.state")),
    )  # fmt: skip
    assert (run.send_code, run.recv_code) == (0, 0), run.send_err + run.recv_err
    assert run.proxy.fired.is_set() and run.proxy.connections == 2
    assert cause in run.send_err and "retry 1 of 2" in run.send_err
    sent, received = json_report(run.send_out), json_report(run.recv_out)
    assert sent["resumes"] == 1 and received["resumes"] == 1
    # The resumed connection carries about what the first one did not deliver, not the whole image again.
    assert sent["transferred"] < 16 * MiB - at + 4 * MiB, sent["transferred"]
    assert_clean_success(dest, source)
    assert not (tmp_path / "send.state").exists()


def test_a_multi_channel_migration_resumes_on_all_its_channels(procs: Processes, tmp_path: Path, source: Path) -> None:
    dest = tmp_path / "dest.img"
    run = migrate_through_fault(
        procs, source, dest, "cut", 4 * MiB, ("--json",),  # channel 0 is the first connection: it is cut
        ("--json", "--compress", "zstd", "--channels", "2", "--retries", "2", "--retry-delay", "200ms",
         "--batch-size", "256K", "--state-file", str(tmp_path / "send.state")),  # batches land before the cut
    )  # fmt: skip
    assert (run.send_code, run.recv_code) == (0, 0), run.send_err + run.recv_err
    assert run.proxy.connections == 4, "two channels, twice"
    assert json_report(run.send_out)["resumes"] == 1 and json_report(run.recv_out)["resumes"] == 1
    assert_clean_success(dest, source)


# --- killed processes ---------------------------------------------------------------------------------------------


def test_a_killed_sender_is_resumed_with_send_resume(procs: Processes, tmp_path: Path, source: Path) -> None:
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    recv = procs.recv(dest, "--json", "--resume-window", "30s")
    args = ("--compress", "none", "--state-file", str(state))
    first = procs.send(source, recv.address, "--max-bandwidth", "8M", *args)
    time.sleep(1.2)
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    assert state.exists() and resume_files_kept(dest), "a kill -9 leaves both ends' state for the resume"
    missing = missing_bytes(source, Path(f"{dest}.partial"))
    assert missing < 16 * MiB, "some pages had arrived before the kill"
    code, out, err = procs.send(source, recv.address, "--resume", "--json", *args).wait(60)
    recv_code, recv_out, recv_err = recv.wait(30)
    assert (code, recv_code) == (0, 0), err + recv_err
    assert "waiting up to 30s for the sender to resume" in recv_err
    resumed = json_report(out)
    assert resumed["resumes"] == 1 and json_report(recv_out)["resumes"] == 1
    # Only what was missing goes again (plus frame headers and the receiver's fingerprints): the 5%.
    assert resumed["transferred"] <= missing * 1.05 + 64 * 1024, (resumed["transferred"], missing)
    assert_clean_success(dest, source)
    assert not state.exists()


def test_a_killed_receiver_is_adopted_by_recv_resume(procs: Processes, tmp_path: Path, source: Path) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    send = procs.send(
        source, recv.address, "--json", "--compress", "none", "--max-bandwidth", "8M", "--retries", "20",
        "--retry-delay", "250ms", "--state-file", str(tmp_path / "send.state"),
    )  # fmt: skip
    time.sleep(1.2)
    os.kill(recv.popen.pid, signal.SIGKILL)
    recv.wait()
    assert resume_files_kept(dest)
    again = procs.recv(dest, "--resume", "--json", listen=recv.address)
    code, out, err = send.wait(60)
    again_code, again_out, again_err = again.wait(30)
    assert (code, again_code) == (0, 0), err + again_err
    assert json_report(out)["resumes"] == 1 and json_report(again_out)["resumes"] == 1
    assert_clean_success(dest, source)


def test_an_expired_resume_window_keeps_the_partial_for_recv_resume(
    procs: Processes, tmp_path: Path, source: Path
) -> None:
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    control = tmp_path / "recv.sock"
    recv = procs.recv(dest, "--resume-window", "500ms", "--control", str(control))
    args = ("--compress", "zlib", "--state-file", str(state))
    first = procs.send(source, recv.address, "--max-bandwidth", "8M", *args)
    wait_until_landed(control)
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    code, _, err = recv.wait(30)
    assert code == 5 and "no sender resumed within --resume-window 0.5s" in last_line(err)
    assert f"vmmig recv --resume {dest}" in last_line(err)
    assert resume_files_kept(dest) and not dest.exists()
    # A later receiver adopts what is there; the sender continues the same session.
    again = procs.recv(dest, "--resume")
    code, _, err = procs.send(source, again.address, "--resume", *args).wait(60)
    again_code, _, again_err = again.wait(30)
    assert (code, again_code) == (0, 0), err + again_err
    assert_clean_success(dest, source)


def test_a_leftover_resumable_partial_is_refused_naming_resume(procs: Processes, tmp_path: Path) -> None:
    dest = tmp_path / "dest.img"
    Path(f"{dest}.partial").write_bytes(bytes(4096))
    Path(f"{dest}.partial.state").write_text("{}")
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", str(dest))
    assert code == 4 and f"vmmig recv --resume {dest}" in last_line(err)


# --- refusals -----------------------------------------------------------------------------------------------------


def interrupted(procs: Processes, tmp_path: Path, source: Path, *args: str) -> tuple[Path, Path]:
    """A session cut short by a kill -9 of the sender; the receiver is left waiting (returned proc not needed)."""
    dest, state = tmp_path / "dest.img", tmp_path / "send.state"
    recv = procs.recv(dest, "--resume-window", "0")
    first = procs.send(
        source, recv.address, "--max-bandwidth", "8M", "--batch-size", "256K", "--state-file", str(state), *args
    )
    deadline = time.monotonic() + 30
    while not Path(f"{dest}.partial.state").exists():  # the session started (WELCOME), whatever the load
        assert time.monotonic() < deadline and first.popen.poll() is None, "the session never started"
        time.sleep(0.05)
    time.sleep(0.6)  # ~5 MB at the cap: batches of 256 KiB have landed, so DEST.partial holds pages to keep
    os.kill(first.popen.pid, signal.SIGKILL)
    first.wait()
    code, _, err = recv.wait(30)
    assert code == 5 and resume_files_kept(dest), err
    return dest, state


@pytest.mark.parametrize(
    ("change", "named"),
    [(("--compress", "zstd"), "--compress"), (("--page-size", "8KiB"), "--page-size"), (("other",), "source file")],
    ids=["codec", "page-size", "other-image"],
)
def test_a_resume_with_another_image_or_options_is_refused(
    procs: Processes, tmp_path: Path, source: Path, change: tuple[str, ...], named: str
) -> None:
    dest, state = interrupted(procs, tmp_path, source, "--compress", "none")
    again = procs.recv(dest, "--resume")
    image, options = source, ["--compress", "none"]
    if change == ("other",):
        image = make_image(tmp_path / "other.ram", 16 * MiB, profile="random", seed=8)
    else:
        options = list(change)
    code, _, err = procs.send(image, again.address, "--resume", "--state-file", str(state), *options).wait(30)
    assert code == 16 and named in last_line(err) and "cannot resume" in last_line(err)
    assert state.exists() and resume_files_kept(dest), "a refused resume destroys nothing"


def test_a_resume_without_batch_size_takes_the_interrupted_sessions_and_another_one_is_refused(
    procs: Processes, tmp_path: Path, source: Path
) -> None:
    dest, state = interrupted(procs, tmp_path, source, "--compress", "none", "--batch-size", "256KiB")
    again = procs.recv(dest, "--resume")
    args = ("--resume", "--compress", "none", "--state-file", str(state))
    code, _, err = procs.send(source, again.address, *args, "--batch-size", "1MiB").wait(30)
    assert code == 16 and "--batch-size" in last_line(err), err  # refused before it connects
    code, _, err = procs.send(source, again.address, *args).wait(60)
    assert code == 0 and again.wait(30)[0] == 0, err
    assert_clean_success(dest, source)


def test_a_receiver_refuses_a_resume_of_another_session(procs: Processes, tmp_path: Path, source: Path) -> None:
    dest, state = interrupted(procs, tmp_path, source, "--compress", "none")
    data = json.loads(state.read_text())
    data["session"] = "00" * 16
    state.write_text(json.dumps(data))
    again = procs.recv(dest, "--resume")
    code, _, err = procs.send(source, again.address, "--resume", "--compress", "none", "--state-file", str(state)).wait(
        30
    )
    assert code == 16 and "is not the interrupted session" in last_line(err)
    assert again.popen.poll() is None, "the receiver turns that sender away and keeps waiting for its own"
    again.popen.terminate()
    again_code, _, again_err = again.wait(30)
    assert again_code == 143 and resume_files_kept(dest), again_err
    assert "refused a connection from 127.0.0.1:" in again_err


def test_a_fresh_receiver_starts_a_resuming_sender_afresh(procs: Processes, tmp_path: Path, source: Path) -> None:
    """The receiver kept nothing (another host, or its files were removed): everything is missing, so everything
    is sent, under the same session; the sender says so."""
    _, state = interrupted(procs, tmp_path, source, "--compress", "none")
    fresh = procs.recv(tmp_path / "elsewhere.img")
    resume = ("--resume", "--json", "--compress", "none", "--state-file", str(state))
    code, out, err = procs.send(source, fresh.address, *resume).wait(30)
    fresh_code, _, fresh_err = fresh.wait(30)
    assert (code, fresh_code) == (0, 0), err + fresh_err
    assert "the receiver holds nothing of this session: sending everything" in err
    assert json_report(out)["resumes"] == 0 and json_report(out)["transferred"] > 16 * MiB
    assert_clean_success(tmp_path / "elsewhere.img", source)


def test_a_parked_receiver_refuses_a_fresh_sender(procs: Processes, tmp_path: Path, source: Path) -> None:
    """A new session must not overwrite one that waits to be resumed, and the refused run gives the sender's state
    file back to the interrupted session, so that `send --resume` still continues it."""
    dest, state = interrupted(procs, tmp_path, source, "--compress", "none")
    before = state.read_text()
    again = procs.recv(dest, "--resume")
    code, _, err = procs.send(source, again.address, "--compress", "none", "--state-file", str(state)).wait(30)
    assert code == 16 and "start the sender with --resume" in last_line(err)
    assert again.popen.poll() is None and resume_files_kept(dest), "turned away: the receiver waits on for its own"
    assert state.read_text() == before
    code, _, err = procs.send(source, again.address, "--resume", "--compress", "none", "--state-file", str(state)).wait(
        60
    )
    assert (code, again.wait(30)[0]) == (0, 0), err
    assert_clean_success(dest, source)


def test_resume_with_nothing_to_resume_is_refused_on_both_ends(procs: Processes, tmp_path: Path, source: Path) -> None:
    code, _, err = procs.run("send", str(source), "127.0.0.1:9", "--resume", "--state-file", str(tmp_path / "none"))
    assert code == 16 and "no interrupted migration" in last_line(err)
    code, _, err = procs.run("recv", "--resume", "--listen", "127.0.0.1:0", str(tmp_path / "dest.img"))
    assert code == 16 and "nothing to resume" in last_line(err)


def test_a_cancel_is_not_resumable_and_removes_everything(procs: Processes, tmp_path: Path, source: Path) -> None:
    """An operator's cancel is not a link fault: no retry, no state files, no partial."""
    dest, state, ctl = tmp_path / "dest.img", tmp_path / "send.state", tmp_path / "ctl"
    recv = procs.recv(dest)
    send = procs.send(
        source, recv.address, "--retries", "3", "--state-file", str(state), "--control", str(ctl),
        "--max-bandwidth", "8M",
    )  # fmt: skip
    time.sleep(1.0)
    assert procs.run("ctl", str(ctl), "cancel")[0] == 0
    code, _, err = send.wait(30)
    recv_code, _, _ = recv.wait(30)
    assert (code, recv_code) == (9, 9) and "retry" not in err
    assert not state.exists() and not Path(f"{dest}.partial").exists() and not Path(f"{dest}.partial.state").exists()


# --- live ---------------------------------------------------------------------------------------------------------


def test_a_link_lost_while_paused_resumes_the_guest_and_precopy(
    procs: Processes,
    guests: list[Guest],
    tmp_path: Path,
) -> None:
    image = make_image(tmp_path / "vm.ram", 16 * MiB, seed=3)
    guest = start_guest(guests, image, tmp_path, "--rate", "4M")
    dest, log, flag = tmp_path / "dest.ram", tmp_path / "hooks.log", tmp_path / "paused"
    recv = procs.recv(dest)
    proxy = FaultProxy(recv.address, "none", at=-1)

    def cut_at_first_pause() -> None:
        while not flag.exists():
            time.sleep(0.01)
        proxy.cut_now()

    threading.Thread(target=cut_at_first_pause, daemon=True).start()
    # The pause hook lingers, so the cut lands while the guest is paused, before the last pages went out.
    pause = f"kill -STOP {guest.pid}; echo pause >> {log}; touch {flag}; sleep 0.5"
    unpause = f"kill -CONT {guest.pid}; echo unpause >> {log}"
    try:
        send = procs.send(
            image, proxy.address, "--json", "--live", "--pause-cmd", pause, "--unpause-cmd", unpause,
            "--max-bandwidth", "40M", "--retries", "2", "--retry-delay", "200ms",
            "--state-file", str(tmp_path / "send.state"),
        )  # fmt: skip
        code, out, err = send.wait(90)
        recv_code, _, recv_err = recv.wait(30)
    finally:
        proxy.close()
    assert (code, recv_code) == (0, 0), err + recv_err
    assert log.read_text().split() == ["pause", "unpause", "pause"], "the guest ran again between the attempts"
    assert "guest resumed on the source" in err
    result = json_report(out)
    assert result["resumes"] == 1 and result["mode"] == "live"
    assert guest.is_paused() and dest.read_bytes() == image.read_bytes()
