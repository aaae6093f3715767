"""Destinations by scheme: unix:PATH, exec:COMMAND with `recv --stdio` (a local command, and ssh to an sshd the test
starts), `send --bind`, and `recv --accept-timeout` — real vmmig processes, cleaned up by PID."""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrate_cli.errors import ExitCode
from migrate_cli.net.exec_peer import relay_prefix

from .conftest import ROOT, Processes, make_image, wait_until_landed

SSHD = "/usr/sbin/sshd"


def stdio_receiver(dest: Path, *args: str) -> str:
    """The exec: destination that runs a local `vmmig recv --stdio DEST`."""
    command = [sys.executable, "-m", "migrate_cli", "recv", "--stdio", *args, str(dest)]
    return "exec:" + shlex.join(command)


def test_a_migration_over_a_unix_socket_reports_it_in_the_ready_file_and_removes_the_socket(
    procs: Processes, tmp_path: Path
) -> None:
    src = make_image(tmp_path / "src.img", 8 << 20)
    sock = tmp_path / "vmmig.sock"
    recv = procs.recv(tmp_path / "dst.img", listen=f"unix:{sock}")
    assert recv.address == f"unix:{sock}"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    code, _out, err = procs.send(src, recv.address, "--compress", "none").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert (tmp_path / "dst.img").read_bytes() == src.read_bytes()
    assert not sock.exists()


def test_a_live_socket_at_the_unix_path_is_refused_and_left_alone(procs: Processes, tmp_path: Path) -> None:
    sock = tmp_path / "taken.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(sock))
    listener.listen(1)
    try:
        code, _out, err = procs.run("recv", "--listen", f"unix:{sock}", str(tmp_path / "dst.img"))
    finally:
        listener.close()
    assert code == ExitCode.NETWORK
    assert "address already in use" in err
    assert sock.exists()


def test_exec_runs_a_stdio_receiver_and_relays_its_stderr_with_a_prefix(procs: Processes, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 8 << 20)
    dst = tmp_path / "dst.img"
    code, _out, err = procs.send(src, stdio_receiver(dst)).wait()
    assert code == 0, err
    assert dst.read_bytes() == src.read_bytes()
    assert "recv: vmmig recv: verified" in err
    assert "vmmig send: verified" in err


def test_an_ssh_command_prefixes_the_relayed_lines_with_the_host() -> None:
    assert relay_prefix("ssh -p 2222 -o BatchMode=yes admin@dsthost vmmig recv --stdio /dev/shm/vm.ram") == "dsthost: "
    assert relay_prefix("/usr/bin/ssh -4 dst.example vmmig recv --stdio x") == "dst.example: "
    assert relay_prefix("sh -c 'vmmig recv --stdio x'") == "recv: "


def test_a_command_that_exits_without_abort_is_a_network_error_quoting_its_status(
    procs: Processes, tmp_path: Path
) -> None:
    src = make_image(tmp_path / "src.img", 1 << 20)
    code, _out, err = procs.send(src, "exec:echo going away >&2; exit 3").wait()
    assert code == ExitCode.NETWORK, err
    assert "exited with status 3 without ABORT" in err
    assert "recv: going away" in err


def test_a_stdio_receiver_that_refuses_sends_its_reason_and_the_sender_exits_with_the_peer_code(
    procs: Processes, tmp_path: Path
) -> None:
    src = make_image(tmp_path / "src.img", 1 << 20)
    existing = tmp_path / "dst.img"
    existing.write_bytes(b"x")
    code, _out, err = procs.send(src, stdio_receiver(existing)).wait()
    assert code != 0
    assert "exists" in err  # the receiver's one line, relayed
    assert existing.read_bytes() == b"x"


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("send", "IMG", "exec:true", "--channels", "2"), "one channel"),
        (("send", "IMG", "exec:true", "--bind", "127.0.0.1"), "--bind"),
        (("send", "IMG", "unix:/nonexistent.sock", "--qmp", "/nonexistent.qmp", "--qemu-handoff"), "TCP"),
        (("recv", "--stdio", "--json", "DEST"), "--json"),
        (("recv", "--stdio", "--stats", "-", "DEST"), "--stats -"),
        (("recv", "--stdio", "--listen", "127.0.0.1:0", "DEST"), "--listen"),
        (("recv", "--listen", "exec:true", "DEST"), "exec:"),
    ],
    ids=["exec-channels", "exec-bind", "unix-qemu-handoff", "stdio-json", "stdio-stats", "stdio-listen", "recv-exec"],
)
def test_combinations_a_scheme_cannot_carry_are_usage_errors(
    procs: Processes, tmp_path: Path, args: tuple[str, ...], says: str
) -> None:
    image = make_image(tmp_path / "src.img", 1 << 20)
    argv = [str(image) if a == "IMG" else str(tmp_path / "dst.img") if a == "DEST" else a for a in args]
    code, out, err = procs.run(*argv)
    assert code == ExitCode.USAGE, err
    assert says in err
    assert out == ""
    assert not (tmp_path / "dst.img").exists()


def test_accept_timeout_ends_a_receiver_no_sender_reaches_with_exit_18(procs: Processes, tmp_path: Path) -> None:
    started = time.monotonic()
    code, _out, err = procs.run("recv", "--listen", "127.0.0.1:0", "--accept-timeout", "1s", str(tmp_path / "d.img"))
    assert code == ExitCode.NO_SENDER == 18
    assert err.strip().splitlines()[-1] == ("vmmig recv: no sender completed a handshake within 1s (--accept-timeout)")
    assert time.monotonic() - started < 30
    assert not list(tmp_path.iterdir())


def test_accept_timeout_does_not_cut_a_migration_that_started_in_time(procs: Processes, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 16 << 20, profile="random")
    recv = procs.recv(tmp_path / "dst.img", "--accept-timeout", "20s")
    code, _out, err = procs.send(src, recv.address, "--max-bandwidth", "8M").wait()  # ~2 s of transfer
    assert code == 0, err
    assert recv.wait()[0] == 0


def test_bind_sends_from_the_local_address_given(procs: Processes, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 4 << 20)
    recv = procs.recv(tmp_path / "dst.img", "--verbose")
    code, _out, err = procs.send(src, recv.address, "--bind", "127.0.0.1").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert (tmp_path / "dst.img").read_bytes() == src.read_bytes()


def test_a_bind_address_this_host_does_not_have_fails_at_once(procs: Processes, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 1 << 20)
    started = time.monotonic()
    code, _out, err = procs.run("send", str(src), "127.0.0.1:9", "--bind", "192.0.2.1", "--connect-timeout", "30s")
    assert code == ExitCode.NETWORK
    assert "--bind 192.0.2.1" in err and "assign" in err
    assert time.monotonic() - started < 20  # not after --connect-timeout


def test_retries_rerun_the_command_and_the_new_stdio_receiver_resumes_the_kept_session(
    procs: Processes, tmp_path: Path
) -> None:
    src = make_image(tmp_path / "src.img", 64 << 20, profile="random")
    dst, control, pid_file = tmp_path / "dst.img", tmp_path / "recv.ctl", tmp_path / "recv.pid"
    receiver = shlex.join([sys.executable, "-m", "migrate_cli", "recv", "--stdio", "--control", str(control), str(dst)])
    command = f"exec:echo $$ > {shlex.quote(str(pid_file))}; exec {receiver}"
    send = procs.send(src, command, "--compress", "none", "--max-bandwidth", "16M", "--retries", "2",
                      "--retry-delay", "0.2s")  # fmt: skip
    wait_until_landed(control, pages=256)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    code, _out, err = send.wait(120)
    assert code == 0, err
    assert "without ABORT" in err and "retry 1 of 2" in err
    assert "resumed" in err or "pass 1:" in err
    assert dst.read_bytes() == src.read_bytes()
    assert not Path(str(dst) + ".partial").exists()


def test_a_stdio_receiver_keeping_a_session_refuses_a_fresh_sender(procs: Processes, tmp_path: Path) -> None:
    src = make_image(tmp_path / "src.img", 32 << 20, profile="random")
    dst, control, pid_file = tmp_path / "dst.img", tmp_path / "recv.ctl", tmp_path / "recv.pid"
    receiver = shlex.join([sys.executable, "-m", "migrate_cli", "recv", "--stdio", "--control", str(control), str(dst)])
    send = procs.send(src, f"exec:echo $$ > {shlex.quote(str(pid_file))}; exec {receiver}", "--max-bandwidth", "8M",
                      "--compress", "none")  # fmt: skip
    wait_until_landed(control, pages=64)
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    assert send.wait(60)[0] == ExitCode.NETWORK
    partial = Path(str(dst) + ".partial")
    assert partial.exists()
    fresh = tmp_path / "other.img"
    fresh.write_bytes(src.read_bytes())
    code, _out, err = procs.send(fresh, stdio_receiver(dst)).wait()
    assert code == ExitCode.RESUME_REFUSED, err
    assert partial.exists() and not dst.exists()


# -- a real sshd on 127.0.0.1 ----------------------------------------------------------------------------------


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """An sshd on 127.0.0.1 accepting a key generated here for the current user; (port, ssh config file)."""
    if not os.path.exists(SSHD) or shutil.which("ssh-keygen") is None or shutil.which("ssh") is None:
        pytest.skip(f"{SSHD} (Debian openssh-server) or the ssh client is not installed")
    keys = tmp_path / "ssh"
    keys.mkdir(mode=0o700)
    for name in ("host_key", "user_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_text((keys / "user_key.pub").read_text())
    os.chmod(keys / "authorized_keys", 0o600)
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = keys / "sshd_config"
    config.write_text(
        f"HostKey {keys / 'host_key'}\nAuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # its privilege separation directory (systemd makes it)
    log = keys / "sshd.log"
    with log.open("w") as log_file:
        daemon = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config), "-p", str(port), "-o",
                                   "ListenAddress=127.0.0.1"], stderr=log_file)  # fmt: skip
    client = keys / "ssh_config"
    client.write_text(
        f"Host vmmighost\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {keys / 'user_key'}\n"
        f"  User {pwd.getpwuid(os.getuid()).pw_name}\n  BatchMode yes\n  StrictHostKeyChecking no\n"
        f"  UserKnownHostsFile {keys / 'known_hosts'}\n"
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and daemon.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        if daemon.poll() is not None:
            pytest.skip(f"sshd did not start: {log.read_text()}")
        yield port, client
    finally:
        if daemon.poll() is None:
            os.kill(daemon.pid, signal.SIGTERM)
        daemon.wait(10)


def test_a_migration_over_ssh_to_a_real_sshd(procs: Processes, tmp_path: Path, sshd: tuple[int, Path]) -> None:
    _port, client = sshd
    src = make_image(tmp_path / "src.img", 8 << 20)
    dst = tmp_path / "dst.img"
    receiver = shlex.join([sys.executable, "-m", "migrate_cli", "recv", "--stdio", str(dst)])
    remote = f"cd {shlex.quote(str(ROOT))} && {receiver}"
    code, _out, err = procs.send(src, f"exec:ssh -F {client} vmmighost {shlex.quote(remote)}").wait(120)
    assert code == 0, err
    assert "vmmighost: vmmig recv: verified" in err
    assert dst.read_bytes() == src.read_bytes()
