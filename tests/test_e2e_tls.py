"""Mutually authenticated TLS 1.3 between real vmmig processes, and `vmmig tls init`."""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from .conftest import Processes, assert_no_destination, make_image, migrate_through_fault, read_stderr_until
from .pki import make_expired, tls_args


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from click.testing import CliRunner

    from migrate_cli.cli import main

    directory = tmp_path_factory.mktemp("pki")
    result = CliRunner().invoke(main, ["tls", "init", str(directory), "--host", "127.0.0.1", "--host", "sender.test"])
    assert result.exit_code == 0, result.output
    other = tmp_path_factory.mktemp("other-pki")
    assert CliRunner().invoke(main, ["tls", "init", str(other), "--host", "sender.test"]).exit_code == 0
    (directory / "foreign.pem").write_bytes((other / "sender.test.pem").read_bytes())
    (directory / "foreign.key").write_bytes((other / "sender.test.key").read_bytes())
    make_expired(directory)
    return directory


def test_tls_init_writes_a_ca_and_a_certificate_per_host_with_private_keys(pki: Path) -> None:
    for name in ("ca", "127.0.0.1", "sender.test"):
        assert (pki / f"{name}.pem").exists()
        assert stat.S_IMODE(os.stat(pki / f"{name}.key").st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((pki / "127.0.0.1.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > datetime.timedelta(days=365)


def test_tls_init_refuses_to_overwrite(pki: Path) -> None:
    from click.testing import CliRunner

    from migrate_cli.cli import main

    result = CliRunner().invoke(main, ["tls", "init", str(pki), "--host", "127.0.0.1"])
    assert result.exit_code == 2 and "--force" in result.output


def test_a_mutually_authenticated_migration_verifies(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, *tls_args(pki, "127.0.0.1"), "--tls-peer-name", "sender.test", listen="0.0.0.0:0")
    address = "127.0.0.1:" + recv.address.rsplit(":", 1)[1]
    code, out, err = procs.send(image_8m, address, *tls_args(pki, "sender.test"), "--json").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == image_8m.read_bytes()
    assert json.loads(out)["status"] == "completed"


@pytest.mark.parametrize(
    ("sender_cert", "recv_extra", "send_extra", "failing_side", "message"),
    [
        ("foreign", [], [], "recv", "unknown CA"),
        ("expired", [], [], "recv", "expired"),
        ("sender.test", ["--tls-peer-name", "other.test"], [], "recv", "not other.test"),
        ("sender.test", [], ["--tls-peer-name", "wrong.test"], "send", "name mismatch"),
    ],
    ids=["unknown-ca", "expired", "receiver-pins-another-name", "sender-expects-another-name"],
)
def test_authentication_failures_name_their_cause(
    procs: Processes,
    tmp_path: Path,
    image_8m: Path,
    pki: Path,
    sender_cert: str,
    recv_extra: list[str],
    send_extra: list[str],
    failing_side: str,
    message: str,
) -> None:
    """The refusing side names the cause; the sender exits 15 either way; the receiver logs the refused
    connection (and goes on waiting for its sender)."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, *tls_args(pki, "127.0.0.1"), *recv_extra)
    send = procs.send(image_8m, recv.address, *tls_args(pki, sender_cert), *send_extra, "--handshake-timeout", "3s")
    send_code, _, send_err = send.wait(30)
    recv_err = read_stderr_until(recv, "TLS:")
    assert send_code == 15, (send_err, recv_err)
    assert message in (recv_err if failing_side == "recv" else send_err)
    assert_no_destination(dest)


def test_plaintext_sender_meets_tls_receiver(procs: Processes, tmp_path: Path, image_8m: Path, pki: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"))
    send_code, _, send_err = procs.send(image_8m, recv.address).wait(20)
    assert "not speaking TLS" in read_stderr_until(recv, "TLS")
    assert send_code == 5 and "requires TLS" in send_err


def test_tls_sender_meets_plaintext_receiver(procs: Processes, tmp_path: Path, image_8m: Path, pki: Path) -> None:
    recv = procs.recv(tmp_path / "dest.img")
    send_code, _, send_err = procs.send(image_8m, recv.address, *tls_args(pki, "sender.test")).wait(20)
    assert "the peer speaks TLS" in read_stderr_until(recv, "TLS")
    assert send_code == 15 and "not speaking TLS" in send_err


def test_tls_options_go_together(procs: Processes, tmp_path: Path, image_8m: Path, pki: Path) -> None:
    code, _, err = procs.send(image_8m, "127.0.0.1:9", "--tls-cert", str(pki / "ca.pem")).wait()
    assert code == 2 and "all three" in err
    code, _, err = procs.run("recv", "--listen", "0.0.0.0:0", str(tmp_path / "d.img"))
    assert code == 2 and "without TLS" in err


def test_a_silent_client_is_cut_at_the_handshake_timeout(procs: Processes, tmp_path: Path, pki: Path) -> None:
    import socket
    import time

    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"), "--handshake-timeout", "1s")
    host, port = recv.address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        started = time.monotonic()
        sock.sendall(b"\x16\x03")  # the start of a TLS record, then nothing: a slow-loris
        assert "handshake" in read_stderr_until(recv, "handshake", timeout=20)
        assert time.monotonic() - started < 5


def test_tls_over_several_channels(procs: Processes, tmp_path: Path, image_8m: Path, pki: Path) -> None:
    """Each channel does its own TLS handshake; the receiver takes them one after the other."""
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, *tls_args(pki, "127.0.0.1"), "--tls-peer-name", "sender.test")
    code, _, err = procs.send(image_8m, recv.address, *tls_args(pki, "sender.test"), "--channels", "3").wait(60)
    assert code == 0 and recv.wait()[0] == 0, err
    assert dest.read_bytes() == image_8m.read_bytes()


def test_a_tls_migration_whose_link_is_cut_resumes(procs: Processes, tmp_path: Path, pki: Path) -> None:
    """Resume needs nothing of TLS but a new handshake: the reconnection authenticates again, both ways."""
    source = make_image(tmp_path / "vm.ram", 16 << 20, profile="random", seed=9)
    dest = tmp_path / "dest.img"
    run = migrate_through_fault(
        procs, source, dest, "cut", 6 << 20,
        (*tls_args(pki, "127.0.0.1"), "--tls-peer-name", "sender.test", "--json"),
        (*tls_args(pki, "sender.test"), "--compress", "none", "--json", "--retries", "2", "--retry-delay", "200ms",
         "--state-file", str(tmp_path / "send.state")),
    )  # fmt: skip
    assert (run.send_code, run.recv_code) == (0, 0), run.send_err + run.recv_err
    assert run.proxy.fired.is_set() and run.proxy.connections == 2
    assert json.loads(run.send_out)["resumes"] == 1 and json.loads(run.recv_out)["resumes"] == 1
    assert dest.read_bytes() == source.read_bytes()
