"""recv --in-place: write into an existing file or memfd of exactly the image size (a waiting QEMU's RAM)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from .conftest import Processes, make_image


def test_in_place_overwrites_old_content_including_zero_pages(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    dest = tmp_path / "qemu-dest.ram"
    dest.write_bytes(b"\xee" * (8 << 20))  # old content everywhere: the zero pages must be written too
    inode = os.stat(dest).st_ino
    recv = procs.recv(dest, "--in-place")
    code, _, err = procs.send(image_8m, recv.address).wait()
    assert code == 0 and recv.wait()[0] == 0, err
    assert dest.read_bytes() == image_8m.read_bytes()
    assert os.stat(dest).st_ino == inode, "written in place: the same file, not a renamed one"
    assert not Path(str(dest) + ".partial").exists()


def test_in_place_into_a_memfd(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    fd = os.memfd_create("dest-ram")
    try:
        os.ftruncate(fd, 8 << 20)
        dest = Path(f"/proc/{os.getpid()}/fd/{fd}")
        recv = procs.recv(dest, "--in-place")
        assert procs.send(image_8m, recv.address).wait()[0] == 0
        assert recv.wait()[0] == 0
        assert os.pread(fd, 8 << 20, 0) == image_8m.read_bytes()
    finally:
        os.close(fd)


def test_a_memfd_destination_needs_in_place(procs: Processes) -> None:
    fd = os.memfd_create("dest-ram")
    try:
        code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", "--force", f"/proc/{os.getpid()}/fd/{fd}")
        assert code == 4 and "use --in-place" in err
    finally:
        os.close(fd)


def test_in_place_refuses_a_destination_of_another_size(procs: Processes, tmp_path: Path, image_8m: Path) -> None:
    dest = tmp_path / "small.ram"
    dest.write_bytes(b"\x01" * 4096)
    recv = procs.recv(dest, "--in-place")
    send_code, _, send_err = procs.send(image_8m, recv.address).wait()
    code, _, err = recv.wait()
    assert code == 4 and "is 4096 bytes, but the image is 8388608 bytes" in err
    assert send_code == 8 and "peer: destination" in send_err
    assert dest.read_bytes() == b"\x01" * 4096, "nothing was written"


def test_in_place_needs_an_existing_destination(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", "--in-place", str(tmp_path / "nope.ram"))
    assert code == 4 and "does not exist" in err


def test_a_failure_after_writing_says_modified_and_unverified(procs: Processes, tmp_path: Path) -> None:
    source = make_image(tmp_path / "random.img", 8 << 20, profile="random")
    dest = tmp_path / "qemu-dest.ram"
    dest.write_bytes(bytes(8 << 20))
    recv = procs.recv(dest, "--in-place")
    send = procs.send(source, recv.address, "--max-bandwidth", "2M", "--batch-size", "256KiB")  # writes at once
    time.sleep(1.0)
    os.kill(send.popen.pid, signal.SIGKILL)
    code, _, err = recv.wait()
    assert code == 13 and "modified in place but not verified" in err
    assert dest.exists(), "an in-place destination is never deleted"
