"""`--tls-dir DIR` (and VMMIG_TLS_DIR): TLS from the directory `vmmig tls init` writes, ca.pem and one host's
HOST.pem and HOST.key, picked by --tls-host or as the only pair there; explicit --tls-* files win over its own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from migrate_cli.cli import main
from migrate_cli.errors import UsageError
from migrate_cli.net.tls import TlsOptions

from .conftest import Processes
from .pki import issue

CA_KEY_WARNING = "holds ca.key"


@pytest.fixture(scope="module")
def issued(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `vmmig tls init` wrote for two hosts: the CA's pair and one pair per host, on the machine that made them."""
    directory = tmp_path_factory.mktemp("issued")
    result = CliRunner().invoke(main, ["tls", "init", str(directory), "--host", "127.0.0.1", "--host", "sender.test"])
    assert result.exit_code == 0, result.output
    return directory


def host_directory(issued: Path, target: Path, host: str) -> Path:
    """What an operator copies to one migration host: ca.pem and that host's pair, not ca.key."""
    target.mkdir()
    for name in ("ca.pem", f"{host}.pem", f"{host}.key"):
        shutil.copy2(issued / name, target / name)
    return target


def test_a_tls_migration_needs_only_the_directory_on_each_end(
    procs: Processes, tmp_path: Path, image_8m: Path, issued: Path
) -> None:
    dst = host_directory(issued, tmp_path / "dst", "127.0.0.1")
    src = host_directory(issued, tmp_path / "src", "sender.test")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--tls-dir", str(dst), "--tls-peer-name", "sender.test", listen="0.0.0.0:0")
    address = "127.0.0.1:" + recv.address.rsplit(":", 1)[1]
    code, _, send_err = procs.send(image_8m, address, "--tls-dir", str(src)).wait()
    recv_code, _, recv_err = recv.wait()
    assert (code, recv_code) == (0, 0), send_err + recv_err
    assert dest.read_bytes() == image_8m.read_bytes()
    assert CA_KEY_WARNING not in send_err + recv_err


def test_vmmig_tls_dir_is_read_by_both_ends_which_warn_about_the_ca_key_beside_it(
    procs: Processes, tmp_path: Path, image_8m: Path, issued: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMMIG_TLS_DIR", str(issued))
    monkeypatch.setenv("VMMIG_RECV_TLS_HOST", "127.0.0.1")
    monkeypatch.setenv("VMMIG_SEND_TLS_HOST", "sender.test")
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--tls-peer-name", "sender.test", listen="0.0.0.0:0")  # no TLS, no --insecure: refused
    address = "127.0.0.1:" + recv.address.rsplit(":", 1)[1]
    code, _, send_err = procs.send(image_8m, address).wait()
    recv_code, _, recv_err = recv.wait()
    assert (code, recv_code) == (0, 0), send_err + recv_err
    assert dest.read_bytes() == image_8m.read_bytes()
    assert f"vmmig send: warning: --tls-dir {issued} holds ca.key" in send_err
    assert f"vmmig recv: warning: --tls-dir {issued} holds ca.key" in recv_err


def test_explicit_tls_files_win_over_the_directory(
    procs: Processes, tmp_path: Path, image_8m: Path, issued: Path
) -> None:
    dst = host_directory(issued, tmp_path / "dst", "127.0.0.1")
    src = host_directory(issued, tmp_path / "src", "sender.test")
    issuer = tmp_path / "issuer"
    issuer.mkdir()
    for name in ("ca.pem", "ca.key"):
        shutil.copy2(issued / name, issuer / name)
    issue(issuer, "other", "other.test", ["other.test"])
    dest = tmp_path / "dest.img"
    recv = procs.recv(dest, "--tls-dir", str(dst), "--tls-peer-name", "other.test")
    explicit = ["--tls-cert", str(issuer / "other.pem"), "--tls-key", str(issuer / "other.key")]
    code, _, send_err = procs.send(image_8m, recv.address, "--tls-dir", str(src), *explicit).wait()
    recv_code, _, recv_err = recv.wait()
    assert (code, recv_code) == (0, 0), send_err + recv_err  # the receiver saw other.test, not sender.test


def test_a_directory_with_several_pairs_needs_tls_host_and_names_them(issued: Path) -> None:
    with pytest.raises(UsageError, match=r"several hosts' certificates \(127\.0\.0\.1, sender\.test\).*--tls-host"):
        TlsOptions.from_cli(None, None, None, None, str(issued))
    chosen = TlsOptions.from_cli(None, None, None, None, str(issued), "sender.test")
    assert chosen is not None
    assert (chosen.cert, chosen.key, chosen.ca) == tuple(
        str(issued / name) for name in ("sender.test.pem", "sender.test.key", "ca.pem")
    )


@pytest.mark.parametrize("host", ["other.test", "../issued/sender.test", "ca"])
def test_a_tls_host_without_its_pair_in_the_directory_is_refused_listing_those_there(issued: Path, host: str) -> None:
    with pytest.raises(UsageError, match=r"--tls-host .*: no .* \(its hosts: 127\.0\.0\.1, sender\.test\)"):
        TlsOptions.from_cli(None, None, None, None, str(issued), host)


def test_tls_host_without_a_directory_is_refused() -> None:
    with pytest.raises(UsageError, match="--tls-host picks a certificate in --tls-dir"):
        TlsOptions.from_cli(None, None, None, None, None, "sender.test")


def test_a_directory_without_a_ca_or_a_pair_is_refused(tmp_path: Path, issued: Path) -> None:
    with pytest.raises(UsageError, match="no such directory"):
        TlsOptions.from_cli(None, None, None, None, str(tmp_path / "missing"))
    with pytest.raises(UsageError, match=r"has no ca\.pem"):
        TlsOptions.from_cli(None, None, None, None, str(tmp_path))
    shutil.copy2(issued / "ca.pem", tmp_path / "ca.pem")
    with pytest.raises(UsageError, match=r"holds no HOST\.pem and HOST\.key pair"):
        TlsOptions.from_cli(None, None, None, None, str(tmp_path))


def test_a_usage_error_from_the_directory_exits_2_before_listening(procs: Processes, tmp_path: Path) -> None:
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", "--tls-dir", str(tmp_path), str(tmp_path / "d.img"))
    assert code == 2 and "has no ca.pem" in err, err
