"""End to end: real `vmmig recv` and `vmmig send` processes over 127.0.0.1 move an image byte for byte."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from .conftest import Processes, make_image


@pytest.mark.parametrize("codec", ["zlib", "zstd", "none"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_each_codec_and_thread_count_delivers_an_identical_image(
    procs: Processes, tmp_path: Path, image_8m: Path, codec: str, threads: str
) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--json", "--decompress-threads", threads)
    send = procs.send(image_8m, recv.address, "--compress", codec, "--compress-threads", threads, "--json")
    send_code, send_out, send_err = send.wait()
    recv_code, recv_out, recv_err = recv.wait()
    assert (send_code, recv_code) == (0, 0), send_err + recv_err
    assert dest.read_bytes() == image_8m.read_bytes()
    sent, received = json.loads(send_out), json.loads(recv_out)
    assert sent["digest"] == received["digest"]
    assert sent["codec"] == codec and sent["threads"] == int(threads)
    assert sent["image-bytes"] == 8 << 20
    assert sent["duplicate"] + sent["normal"] == (8 << 20) // 4096
    assert sent["duplicate"] > 0, "the mixed image has zero pages and they must be counted"
    assert sent["transferred"] == received["transferred"]
    assert sent["pass"] == received["pass"] == 1, "one pass, reported as such on both ends"
    if codec == "none":
        assert sent["transferred"] > sent["normal-bytes"]
    else:
        assert sent["transferred"] < sent["normal-bytes"], "compression must shrink the text and code pages"
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600


def test_zlib_sends_the_random_runs_of_a_batch_raw_and_compresses_the_rest(procs: Processes, tmp_path: Path) -> None:
    """A batch of the mixed image often holds a run of random pages among text or code: it is cut into a frame per
    run (raw, compressed, raw...). tests/test_sender_frames.py checks the frames byte by byte."""
    image = make_image(tmp_path / "mixed.img", 32 << 20, profile="mixed", seed=3)
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--json")
    args = ("--compress", "zlib", "--batch-size", "1MiB", "--json")
    send_code, send_out, send_err = procs.send(image, recv.address, *args).wait()
    assert send_code == 0 and recv.wait()[0] == 0, send_err
    assert dest.read_bytes() == image.read_bytes()
    sent = json.loads(send_out)
    batches = -(-(32 << 20) // (1 << 20))
    assert sent["raw-batches"] > 0 and sent["compressed-batches"] > 0
    assert sent["raw-batches"] + sent["compressed-batches"] > batches, "some batches must have been split"


def test_stdout_is_empty_without_json_and_the_summary_goes_to_stderr(
    procs: Processes, tmp_path: Path, image_8m: Path
) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    code, out, err = procs.send(image_8m, recv.address).wait()
    assert code == 0 and out == ""
    assert "vmmig send: verified 8.0 MiB sent" in err
    assert recv.wait()[0] == 0


def test_quiet_silences_the_summary(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img", "--quiet")
    code, out, err = procs.send(image_8m, recv.address, "--quiet").wait()
    assert (code, out, err) == (0, "", "")
    assert recv.wait()[2].strip() == f"vmmig recv: listening on {recv.address}"


def test_page_size_and_batch_size_options(procs: Processes, tmp_path: Path) -> None:
    source = make_image(tmp_path / "big-pages.img", 4 << 20, seed=7, page_size=65536)
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest)
    code, _, err = procs.send(source, recv.address, "--page-size", "64KiB", "--batch-size", "1MiB").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == source.read_bytes()


def test_bandwidth_cap_slows_the_wire_to_the_cap(procs: Processes, tmp_path: Path) -> None:
    source = make_image(tmp_path / "random.img", 4 << 20, profile="random")
    recv = procs.recv(tmp_path / "dest.img")
    code, out, err = procs.send(source, recv.address, "--max-bandwidth", "4MB", "--json").wait()
    assert code == 0, err
    report = json.loads(out)
    wire_rate = report["transferred"] / (report["total-time"] / 1000)
    assert wire_rate <= 4e6 * 1.10, f"wire rate {wire_rate / 1e6:.2f} MB/s exceeds the 4 MB/s cap"
    assert wire_rate >= 4e6 * 0.6, f"wire rate {wire_rate / 1e6:.2f} MB/s far below the cap"
    assert recv.wait()[0] == 0


def test_force_overwrites_an_existing_destination(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"old contents")
    recv = procs.recv(dest, "--force")
    assert procs.send(image_8m, recv.address).wait()[0] == 0
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == image_8m.read_bytes()


def test_a_migration_over_ipv6_loopback_is_identical(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    if not Path("/proc/net/if_inet6").exists():
        pytest.skip("no IPv6 on this machine")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, listen="[::1]:0")
    assert recv.address.startswith("[::1]:")
    assert procs.send(image_8m, recv.address).wait()[0] == 0
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == image_8m.read_bytes()


def test_memfd_source_via_proc_fd(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    fd = os.memfd_create("guest-ram")
    try:
        os.write(fd, image_8m.read_bytes())
        dest = tmp_path / "dest.img"
        recv = procs.recv(dest)
        code, _, err = procs.send(Path(f"/proc/{os.getpid()}/fd/{fd}"), recv.address).wait()
        assert code == 0, err
        assert recv.wait()[0] == 0
        assert dest.read_bytes() == image_8m.read_bytes()
    finally:
        os.close(fd)


def test_sparse_destination_keeps_zero_pages_as_holes(procs: Processes, tmp_path: Path) -> None:
    source = make_image(tmp_path / "idle.img", 8 << 20, profile="idle")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--sparse")
    assert procs.send(source, recv.address).wait()[0] == 0
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == source.read_bytes()
    assert os.stat(dest).st_blocks * 512 < 0.5 * (8 << 20), "zero pages must not be allocated with --sparse"


def test_version_flag_shows_the_protocol_version(procs: Processes) -> None:
    code, out, _ = procs.run("--version")
    assert code == 0 and "protocol 3" in out


def test_a_block_device_is_a_source_and_an_in_place_destination(procs: Processes, tmp_path: Path) -> None:
    import subprocess

    source_file = make_image(tmp_path / "src.img", 8 << 20, seed=3)
    dest_file = tmp_path / "dst.img"
    dest_file.write_bytes(bytes(8 << 20))
    devices: list[str] = []
    try:
        for backing in (source_file, dest_file):
            made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True)
            if made.returncode != 0:
                pytest.skip(f"no loop devices here: {made.stderr.strip()}")
            devices.append(made.stdout.strip())
        recv = procs.recv(Path(devices[1]), "--in-place")
        code, _, err = procs.send(Path(devices[0]), recv.address).wait()
        assert code == 0 and recv.wait()[0] == 0, err
        subprocess.run(["sync"], check=False)
        with open(devices[1], "rb") as fh:
            assert fh.read(8 << 20) == source_file.read_bytes()
    finally:
        for device in devices:
            subprocess.run(["losetup", "--detach", device], check=False)
