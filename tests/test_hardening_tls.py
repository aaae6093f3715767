"""TLS hardening: `vmmig tls init` writes a whole, safe PKI or nothing; TLS failures are one clean line with exit 15
on the refused side too; bad TLS files fail before listening or connecting; malformed addresses are usage errors."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from .conftest import ROOT, Processes, assert_no_destination, last_line, read_stderr_until, vmmig_command
from .pki import issue, make_expired, tls_args


def tls_init(directory: Path, *args: str) -> tuple[int, str, str]:
    done = subprocess.run(
        vmmig_command("tls", "init", str(directory), *args), cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with 127.0.0.1 and sender.test, an expired sender.test, a sender.test of another CA, and a certificate
    whose common name (cn.test) is not among its subject alternative names (san.test)."""
    directory = tmp_path_factory.mktemp("pki")
    assert tls_init(directory, "--host", "127.0.0.1", "--host", "sender.test")[0] == 0
    other = tmp_path_factory.mktemp("other-pki")
    assert tls_init(other, "--host", "sender.test")[0] == 0
    for ext in (".pem", ".key"):
        (directory / f"foreign{ext}").write_bytes((other / f"sender.test{ext}").read_bytes())
    make_expired(directory)
    issue(directory, "split", common_name="cn.test", dns_names=["san.test"])
    for key in directory.glob("*.key"):
        key.chmod(0o600)
    return directory


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if not p.is_dir())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- vmmig tls init: host names are file names --------------------------------------------------------------------


@pytest.mark.parametrize("host", ["ca", "CA", "Ca"])
def test_tls_init_refuses_a_host_named_like_the_ca(tmp_path: Path, host: str) -> None:
    """`--host ca` would write the host's certificate and key over ca.pem and ca.key: the CA key would be lost."""
    code, out, err = tls_init(tmp_path / "pki", "--host", "dst.test", "--host", host)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "CA" in err
    assert files_under(tmp_path) == [] and out == ""


@pytest.mark.parametrize(
    "host", ["../../evil", "", "a/b", "..", "a..b", "-a.test", "a_b.test", "fe80::1%eth0", "127.1"]
)
def test_tls_init_refuses_host_names_that_are_neither_dns_names_nor_ip_addresses(tmp_path: Path, host: str) -> None:
    """A host name is also a file name in DIR: `../../evil` escaped it, `a/b` and `` crashed half-way."""
    directory = tmp_path / "x" / "pki"
    code, _, err = tls_init(directory, "--host", "ok.test", "--host", host)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "--host" in err
    assert files_under(tmp_path) == [], "nothing written, in DIR or outside it"


@pytest.mark.parametrize("hosts", [["a.test", "a.test"], ["a.test", "A.TEST"], ["::1", "0:0:0:0:0:0:0:1"]])
def test_tls_init_refuses_a_host_given_twice(tmp_path: Path, hosts: list[str]) -> None:
    code, _, err = tls_init(tmp_path / "pki", *(arg for host in hosts for arg in ("--host", host)))
    assert code == 2 and "twice" in err
    assert files_under(tmp_path) == []


def test_tls_init_never_writes_through_a_planted_symlink(tmp_path: Path) -> None:
    """A symlink at a file's name, even a dangling one, is an existing file: refused without --force (it was
    followed, writing outside DIR), replaced as a link with --force (never followed)."""
    directory, outside = tmp_path / "pki", tmp_path / "outside"
    directory.mkdir()
    outside.mkdir()
    (directory / "h.test.pem").symlink_to(outside / "planted.pem")
    code, _, err = tls_init(directory, "--host", "h.test")
    assert code == 2 and "--force" in err
    assert files_under(outside) == []

    (outside / "victim.key").write_text("precious")
    (directory / "ca.key").symlink_to(outside / "victim.key")
    code, _, err = tls_init(directory, "--host", "h.test", "--force")
    assert code == 0, err
    assert files_under(outside) == ["victim.key"] and (outside / "victim.key").read_text() == "precious"
    for name in ("ca.key", "h.test.pem"):
        assert not (directory / name).is_symlink() and (directory / name).is_file()
    assert (directory / "ca.key").stat().st_mode & 0o777 == 0o600


def test_tls_init_writes_the_whole_pki_or_nothing(tmp_path: Path) -> None:
    """A file that cannot be replaced (a directory in the way) must not leave the CA replaced and the rest not."""
    directory = tmp_path / "pki"
    assert tls_init(directory, "--host", "h.test")[0] == 0
    before = {name: (directory / name).read_bytes() for name in ("ca.pem", "ca.key", "h.test.pem", "h.test.key")}
    (directory / "x.test.key").mkdir()
    code, _, err = tls_init(directory, "--host", "h.test", "--host", "x.test", "--force")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert {name: (directory / name).read_bytes() for name in before} == before
    assert sorted(p.name for p in directory.iterdir()) == sorted([*before, "x.test.key"])


def test_a_failure_while_placing_the_files_puts_everything_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rollback itself: the third file fails to land (a full disk, a race): the old PKI is back, nothing new
    stays, and no staging directory is left in DIR."""
    from migrate_cli.errors import MigrateError
    from migrate_cli.net import tls

    directory = tmp_path / "pki"
    tls.init(str(directory), ["h.test"])
    before = {p.name: p.read_bytes() for p in directory.iterdir()}
    real_link, calls = os.link, []

    def failing_link(src: Path, dst: Path, **kwargs: bool) -> None:
        calls.append(dst)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real_link(src, dst, **kwargs)

    monkeypatch.setattr(os, "link", failing_link)
    with pytest.raises(MigrateError, match="left as it was"):
        tls.init(str(directory), ["h.test", "new.test"], force=True)
    assert {p.name: p.read_bytes() for p in directory.iterdir()} == before


# --- TLS failures: exit 15 and the cause on the refused side, clean text ------------------------------------------


@pytest.mark.parametrize(("cert", "cause"), [("foreign", "unknown CA"), ("expired", "expired")])
def test_a_sender_the_receiver_rejects_exits_15_naming_the_cause(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path, cert: str, cause: str
) -> None:
    """Under TLS 1.3 the sender's handshake completes before the receiver checks its certificate: the receiver's
    alert arrives on the sender's first read, and was reported as a broken stream (exit 5)."""
    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"))
    code, _, err = procs.send(image_8m, recv.address, *tls_args(pki, cert), "--handshake-timeout", "5s").wait(30)
    assert code == 15, err
    assert "the receiver rejected our certificate" in last_line(err) and cause in last_line(err)
    assert "_ssl.c" not in err and "[SSL" not in err
    assert_no_destination(tmp_path / "dest.img")


def test_a_sender_refused_for_its_name_exits_15_and_both_ends_say_which_names(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    """The receiver checks --tls-peer-name after the handshake, so no alert goes out: it tells the sender with an
    ABORT instead of closing (which read as 'connection closed by peer', exit 5)."""
    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"), "--tls-peer-name", "other.test")
    code, _, err = procs.send(image_8m, recv.address, *tls_args(pki, "sender.test")).wait(30)
    assert code == 15, err
    assert "sender.test" in last_line(err) and "other.test" in last_line(err)
    logged = read_stderr_until(recv, "other.test")
    assert "names sender.test, not other.test" in logged, "each name once (SAN and CN were both listed)"


def test_the_peer_name_is_matched_against_subject_alternative_names_only_when_there_are_some(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    """RFC 6125: a certificate for san.test whose subject CN is cn.test is not a certificate for cn.test."""
    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"), "--tls-peer-name", "cn.test")
    code, _, err = procs.send(image_8m, recv.address, *tls_args(pki, "split")).wait(30)
    assert code == 15, err
    assert "san.test" in last_line(err) and "cn.test" in last_line(err)
    assert_no_destination(tmp_path / "dest.img")


def test_tls_failures_read_without_openssl_decorations(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    """The receiver whose certificate the sender refuses (wrong name) logged '[SSL: SSLV3_ALERT_BAD_CERTIFICATE]
    sslv3 alert bad certificate (_ssl.c:1006)'."""
    recv = procs.recv(tmp_path / "dest.img", *tls_args(pki, "127.0.0.1"))
    send = procs.send(image_8m, recv.address, *tls_args(pki, "sender.test"), "--tls-peer-name", "wrong.test")
    code, _, err = send.wait(30)
    assert code == 15 and "wrong.test" in last_line(err)
    logged = read_stderr_until(recv, "TLS")
    assert "the sender rejected our certificate: bad certificate" in logged, logged
    for text in (err, logged):
        assert "_ssl.c" not in text and "[SSL" not in text


# --- TLS files are checked before listening or connecting ---------------------------------------------------------


@pytest.mark.parametrize(
    ("cert", "key", "ca", "named"),
    [
        ("127.0.0.1.pem", "sender.test.key", "ca.pem", "--tls-key"),
        ("127.0.0.1.pem", "127.0.0.1.key", "127.0.0.1.key", "--tls-ca"),
        ("ca.key", "127.0.0.1.key", "ca.pem", "--tls-cert"),
    ],
    ids=["key-of-another-certificate", "ca-not-a-certificate", "cert-not-a-certificate"],
)
def test_a_receiver_with_unusable_tls_files_fails_before_listening(
    procs: Processes, tmp_path: Path, pki: Path, cert: str, key: str, ca: str, named: str
) -> None:
    """It printed 'listening' and failed only when a sender arrived."""
    args = ["--tls-cert", str(pki / cert), "--tls-key", str(pki / key), "--tls-ca", str(pki / ca)]
    code, _, err = procs.start("recv", "--listen", "127.0.0.1:0", *args, str(tmp_path / "dest.img")).wait(20)
    assert code == 2, err
    assert "listening" not in err and len(err.strip().splitlines()) == 1
    assert named in err and str(pki / {"--tls-cert": cert, "--tls-key": key, "--tls-ca": ca}[named]) in err


def test_a_sender_with_a_key_not_matching_its_certificate_fails_before_connecting(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    args = ["--tls-cert", str(pki / "sender.test.pem"), "--tls-key", str(pki / "127.0.0.1.key")]
    address = f"127.0.0.1:{free_port()}"  # nobody listens: connecting first would fail with exit 5
    code, _, err = procs.send(
        image_8m, address, *args, "--tls-ca", str(pki / "ca.pem"), "--connect-timeout", "2s"
    ).wait()
    assert code == 2, err
    assert "--tls-key" in err and "does not match" in err and "_ssl.c" not in err


def test_a_key_other_users_can_read_is_warned_about_on_both_ends(
    procs: Processes, tmp_path: Path, image_8m: Path, pki: Path
) -> None:
    exposed = tmp_path / "keys"
    exposed.mkdir()
    for name in ("127.0.0.1", "sender.test"):
        for ext in (".pem", ".key"):
            (exposed / f"{name}{ext}").write_bytes((pki / f"{name}{ext}").read_bytes())
        (exposed / f"{name}.key").chmod(0o644)
    (exposed / "ca.pem").write_bytes((pki / "ca.pem").read_bytes())
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, *tls_args(exposed, "127.0.0.1"), "--tls-peer-name", "sender.test")
    code, _, send_err = procs.send(image_8m, recv.address, *tls_args(exposed, "sender.test")).wait()
    recv_code, _, recv_err = recv.wait()
    assert (code, recv_code) == (0, 0), send_err + recv_err
    assert f"vmmig send: warning: --tls-key {exposed / 'sender.test.key'}" in send_err
    assert f"vmmig recv: warning: --tls-key {exposed / '127.0.0.1.key'}" in recv_err
    assert dest.read_bytes() == image_8m.read_bytes()


# --- addresses ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["[::1:1", "[::1]", "[::1]x", "[::1]:", "[host.test]:1", "::1", "host:", "host:99999", "host:²", "", ":1"]
)
def test_malformed_addresses_are_usage_errors(text: str) -> None:
    from migrate_cli.errors import UsageError
    from migrate_cli.net.transport import parse_address

    with pytest.raises(UsageError):
        parse_address(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("[::1]:1", ("::1", 1)), ("localhost:0", ("localhost", 0)), ("10.0.0.1:65535", ("10.0.0.1", 65535))],
)
def test_well_formed_addresses_parse(text: str, expected: tuple[str, int]) -> None:
    from migrate_cli.net.transport import parse_address

    assert parse_address(text) == expected


def test_an_address_without_a_port_takes_the_default_port() -> None:
    from migrate_cli.net.transport import parse_address

    assert parse_address("[::1]", default_port=7) == ("::1", 7)
    assert parse_address("::1", default_port=7) == ("::1", 7)
    assert parse_address("host.test", default_port=7) == ("host.test", 7)


def test_send_to_an_unclosed_ipv6_bracket_is_a_usage_error(procs: Processes, image_8m: Path) -> None:
    """`[::1:1` was read as [::1]:1 and connected there."""
    code, _, err = procs.send(image_8m, "[::1:1", "--connect-timeout", "2s").wait()
    assert code == 2, err
    assert "[::1:1" in err and len(err.strip().splitlines()) == 1


# --- peer names: RFC 6125 matching --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("presented", "wanted", "matches"),
    [
        ("Sender.Test", "sender.test", True),
        ("0:0:0:0:0:0:0:1", "::1", True),
        ("*.example.test", "a.example.test", True),
        ("*.example.test", "a.b.example.test", False),
        ("*.example.test", "example.test", False),
        ("*.0.0.1", "127.0.0.1", False),
        ("sender.test", "other.test", False),
    ],
)
def test_peer_names_match_as_rfc_6125_says(presented: str, wanted: str, matches: bool) -> None:
    from migrate_cli.net.tls import name_matches

    assert name_matches(presented, wanted) is matches
