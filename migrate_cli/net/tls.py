"""Mutually authenticated TLS 1.3 for migration channels, and `vmmig tls init` to make the certificates.

Both ends present a certificate signed by the same CA and verify the other's: the sender checks the receiver's
name (``--tls-peer-name``, default the host it connects to) and the receiver checks the sender's name when
``--tls-peer-name`` is given. Verification failures are turned into one line naming the cause (expired, unknown
CA, name mismatch, plaintext peer), on the side that refused and, from the alert or ABORT it gets, on the side that
was refused. Guest RAM holds every secret of the guest: no downgrade, no TLS < 1.3.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import re
import shutil
import socket
import ssl
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from ..errors import AuthError, DestinationError, TlsHandshakeLost, UsageError
from ..safefile import create_exclusive, fsync_directory, write_whole


@dataclass(frozen=True)
class TlsOptions:
    cert: str
    key: str
    ca: str
    peer_name: str | None = None
    directory: str | None = None  # --tls-dir, when files came from one: checked for a ca.key left in it

    @staticmethod
    def from_cli(
        cert: str | None,
        key: str | None,
        ca: str | None,
        peer_name: str | None,
        directory: str | None = None,
        host: str | None = None,
    ) -> TlsOptions | None:
        """The TLS files: --tls-cert, --tls-key and --tls-ca, each given explicitly winning over --tls-dir's."""
        if host is not None and directory is None:
            raise UsageError("--tls-host picks a certificate in --tls-dir (or VMMIG_TLS_DIR): give that too")
        if directory is not None:
            cert, key, ca = from_directory(directory, host, cert, key, ca)
        given = [x is not None for x in (cert, key, ca)]
        if not any(given):
            if peer_name is not None:
                raise UsageError("--tls-peer-name needs --tls-dir, or --tls-cert, --tls-key and --tls-ca")
            return None
        if not all(given):
            raise UsageError("TLS needs all three of --tls-cert, --tls-key and --tls-ca (or --tls-dir)")
        assert cert is not None and key is not None and ca is not None
        for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
            if not os.path.isfile(path):
                raise UsageError(f"{option} {path}: no such file")
        return TlsOptions(cert, key, ca, peer_name, directory)


def from_directory(
    directory: str, host: str | None, cert: str | None, key: str | None, ca: str | None
) -> tuple[str, str, str]:
    """Certificate, key and CA from a directory as `vmmig tls init` writes it: ``ca.pem`` and a ``HOST.pem`` and
    ``HOST.key`` pair, the one named by ``host`` or else the only one there. A file given explicitly is kept."""
    if not os.path.isdir(directory):
        raise UsageError(f"--tls-dir {directory}: no such directory")
    if ca is None:
        ca = os.path.join(directory, "ca.pem")
        if not os.path.isfile(ca):
            raise UsageError(f"--tls-dir {directory} has no ca.pem (the CA's certificate, from vmmig tls init)")
    if cert is not None and key is not None:
        return cert, key, ca
    pairs = host_pairs(directory)
    listed = ", ".join(pairs) or "none"
    if host is not None:
        if host not in pairs:
            raise UsageError(f"--tls-host {host}: no {host}.pem and {host}.key in {directory} (its hosts: {listed})")
    elif len(pairs) == 1:
        host = pairs[0]
    elif not pairs:
        raise UsageError(
            f"--tls-dir {directory} holds no HOST.pem and HOST.key pair (vmmig tls init DIR --host HOST writes them)"
        )
    else:
        raise UsageError(f"--tls-dir {directory} holds several hosts' certificates ({listed}): choose with --tls-host")
    return cert or os.path.join(directory, f"{host}.pem"), key or os.path.join(directory, f"{host}.key"), ca


def host_pairs(directory: str) -> list[str]:
    """The hosts with both NAME.pem and NAME.key in ``directory`` (the CA's own files aside), sorted."""
    try:
        names = os.listdir(directory)
    except OSError as exc:
        raise UsageError(f"--tls-dir {directory}: {exc.strerror}") from None
    return sorted(
        name[:-4]
        for name in names
        if name.endswith(".pem") and name != "ca.pem" and os.path.isfile(os.path.join(directory, name[:-4] + ".key"))
    )


def preflight(opts: TlsOptions | None, server: bool, warn: Callable[[str], None]) -> None:
    """Load this end's TLS files before listening or connecting, not when the first peer arrives.

    A certificate or CA file that is not PEM, or a key that does not match its certificate, is a usage error
    (exit 2) naming the file; a key that other users can read gets a warning (``warn``, one line).
    """
    if opts is None:
        return
    _context(opts, ssl.Purpose.CLIENT_AUTH if server else ssl.Purpose.SERVER_AUTH)
    mode = stat.S_IMODE(os.stat(opts.key).st_mode)
    if mode & 0o077:
        warn(f"warning: --tls-key {opts.key} is accessible to other users (mode {mode:04o}): chmod 600 it")
    if opts.directory is not None and os.path.lexists(os.path.join(opts.directory, "ca.key")):
        warn(
            f"warning: --tls-dir {opts.directory} holds ca.key, which signs certificates every host of this CA "
            "trusts: keep it off the migration hosts"
        )


def _context(opts: TlsOptions, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED

    def encrypted() -> NoReturn:  # without a callback OpenSSL would prompt for a pass phrase on the terminal
        raise UsageError(f"--tls-key {opts.key} is encrypted: vmmig needs an unencrypted key (mode 0600)")

    try:
        ctx.load_cert_chain(opts.cert, opts.key, password=encrypted)
        ctx.load_verify_locations(opts.ca)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(_bad_file(opts, exc)) from None
    return ctx


def _bad_file(opts: TlsOptions, exc: BaseException) -> str:
    """Which of the three files OpenSSL could not use, and why (its own error names none of them)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        certs = x509.load_pem_x509_certificates(Path(opts.cert).read_bytes())
    except OSError as err:
        return f"--tls-cert {opts.cert}: {err.strerror}"
    except ValueError:
        return f"--tls-cert {opts.cert}: no PEM certificate in it"
    try:
        key = serialization.load_pem_private_key(Path(opts.key).read_bytes(), password=None)
    except OSError as err:
        return f"--tls-key {opts.key}: {err.strerror}"
    except (ValueError, TypeError):
        return f"--tls-key {opts.key}: not a PEM private key"
    der, spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(der, spki) != certs[0].public_key().public_bytes(der, spki):
        return f"--tls-key {opts.key} does not match the certificate in --tls-cert {opts.cert}"
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(opts.ca)
    except ssl.SSLError:
        return f"--tls-ca {opts.ca}: no PEM certificate in it"
    except OSError as err:
        return f"--tls-ca {opts.ca}: {err.strerror}"
    return f"cannot use the TLS files ({opts.cert}, {opts.key}, {opts.ca}): {clean(exc)}"


def clean(exc: BaseException) -> str:
    """An ssl error's text without OpenSSL's decorations: '[SSL: X] words (_ssl.c:1006)' -> 'words'."""
    text = re.sub(r"\s*\(_ssl\.c:\d+\)$", "", str(exc))
    text = re.sub(r"^\[[A-Za-z0-9_]+(: [A-Za-z0-9_]+)?\]\s*", "", text)
    return text or getattr(exc, "reason", None) or type(exc).__name__


# Alerts by which a peer refuses our certificate, and what each most likely means. OpenSSL names a received alert
# e.g. TLSV1_ALERT_UNKNOWN_CA; the words after ALERT_ are the alert's name in RFC 8446.
REFUSAL_ALERTS = {
    "unknown ca": "not signed by a CA it trusts: see its --tls-ca",
    "certificate expired": "or not valid yet",
    "bad certificate": "for instance not for the name it expects",
    "certificate unknown": "it cannot use it",
    "unsupported certificate": "not made for TLS clients and servers",
    "certificate revoked": "revoked",
    "certificate required": "we presented none",
    "access denied": "it does not accept it",
    "decrypt error": "our key does not match it",
}


def alert_name(exc: BaseException) -> str | None:
    """The name of the TLS alert the peer sent ('unknown ca'), or None when ``exc`` is not a received alert."""
    reason = getattr(exc, "reason", None) or ""
    _, found, name = reason.partition("_ALERT_")
    return name.lower().replace("_", " ") if found else None


def refusal(exc: BaseException, peer: str) -> AuthError | None:
    """The peer refused our certificate (an alert, seen on the first read under TLS 1.3, where the client's side
    of the handshake ends before the server has checked its certificate); None for any other error."""
    name = alert_name(exc)
    if name not in REFUSAL_ALERTS:
        return None
    shown = "unknown CA" if name == "unknown ca" else name
    return AuthError(f"TLS: {peer} rejected our certificate: {shown} ({REFUSAL_ALERTS[name]})")


def _explain(exc: BaseException, peer: str) -> AuthError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or clean(exc)
        if "expired" in reason:
            why = "its certificate has expired"
        elif "not yet valid" in reason:
            why = "its certificate is not valid yet"
        elif any(word in reason for word in ("issuer", "self-signed", "self signed", "signature failure")):
            why = "its certificate is not signed by our CA (unknown CA)"
        elif "mismatch" in reason:
            name = re.search(r"not valid for '([^']*)'", reason)
            why = f"name mismatch (its certificate is not for {name.group(1) if name else 'the name expected'})"
        else:
            why = reason
        return AuthError(f"TLS: {peer} failed verification: {why}")
    refused = refusal(exc, peer)
    if refused is not None:
        return refused
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "HTTP_REQUEST" in text:
        return AuthError(f"TLS: {peer} is not speaking TLS (a plaintext vmmig? use the --tls-* options on both ends)")
    if "CERTIFICATE_REQUIRED" in text or "PEER_DID_NOT_RETURN" in text:
        return AuthError(f"TLS: {peer} presented no certificate (it must use --tls-cert/--tls-key too)")
    if isinstance(exc, TimeoutError):
        return TlsHandshakeLost(f"TLS: handshake with {peer} timed out (--handshake-timeout)")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or "EOF" in text:
        return TlsHandshakeLost(
            f"TLS: {peer} closed the connection during the handshake (does it use TLS, and trust us?)"
        )
    name = alert_name(exc)
    if name is not None:
        return AuthError(f"TLS: {peer} ended the handshake with the alert '{name}'")
    return AuthError(f"TLS: handshake with {peer} failed: {clean(exc)}")


def wrap_client(sock: socket.socket, opts: TlsOptions, host: str, timeout: float) -> ssl.SSLSocket:
    ctx = _context(opts, ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = True
    name = opts.peer_name or host
    sock.settimeout(timeout)
    try:
        return ctx.wrap_socket(sock, server_hostname=name)
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise _explain(exc, f"receiver {name}") from None


def wrap_server(
    sock: socket.socket, opts: TlsOptions, timeout: float, on_wrapped: Callable[[socket.socket], None] = lambda s: None
) -> ssl.SSLSocket:
    """Server side of the handshake; ``on_wrapped`` sees the TLS socket before the handshake starts (deadlines)."""
    ctx = _context(opts, ssl.Purpose.CLIENT_AUTH)
    sock.settimeout(timeout)
    tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    on_wrapped(tls)
    try:
        tls.do_handshake()
    except (ssl.SSLError, OSError) as exc:
        tls.close()
        raise _explain(exc, "the sender") from None
    names = peer_names(tls)
    if opts.peer_name is not None and not any(name_matches(name, opts.peer_name) for name in names):
        listed = ", ".join(names) or "nothing"
        _refuse_after_handshake(
            tls,
            timeout,
            f"TLS: the receiver refused the sender's certificate: it names {listed}, "
            f"not {opts.peer_name} (the receiver's --tls-peer-name)",
        )
        raise AuthError(f"TLS: the sender's certificate names {listed}, not {opts.peer_name} (--tls-peer-name)")
    return tls


def _refuse_after_handshake(tls: ssl.SSLSocket, timeout: float, message: str) -> None:
    """Tell the sender why with an ABORT (exit 15 there): OpenSSL sent no alert, its own checks having passed, and
    a bare close would read as a link fault."""
    from ..wire.conversation import Role
    from .transport import Channel  # transport imports this module

    Channel(tls, Role.RECEIVER, timeout).abort(AuthError(message))


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    """The names the peer's certificate is for: its DNS and IP subject alternative names, or when it has none its
    subject's common name (RFC 6125: a CN is not looked at beside SANs). Each name once."""
    cert = tls.getpeercert() or {}
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    if not names:
        names = [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]
    return list(dict.fromkeys(names))


def name_matches(presented: str, wanted: str) -> bool:
    """RFC 6125 matching: DNS names without regard to case, a wildcard only as the whole leftmost label and only
    for one label; IP addresses by value (certificates spell IPv6 addresses in full)."""
    if _ip(presented) is not None or _ip(wanted) is not None:
        return _ip(presented) == _ip(wanted)
    presented, wanted = presented.lower().rstrip("."), wanted.lower().rstrip(".")
    if presented.startswith("*."):
        head, _, rest = wanted.partition(".")
        return bool(head) and head != "*" and rest == presented[2:] and "." in rest
    return presented == wanted


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


# --- vmmig tls init -----------------------------------------------------------------------------------------------

CA_DAYS = 3650
HOST_DAYS = 825  # the longest validity browsers accept; plenty for migration hosts
MAX_DAYS = 36500  # a hundred years; X.509 dates end in 9999
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # RFC 1123


def host_name(text: str) -> str:
    """``text`` checked as a certificate name: an IP address (canonical form) or a DNS name of RFC 1123 labels.

    The name is also a file name in DIR, so this is what keeps ``..``, ``/`` and the empty name out of it.
    """
    ip = _ip(text)
    if ip is not None:
        if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id:
            raise UsageError(f"--host {text}: an IPv6 zone (%{ip.scope_id}) cannot be in a certificate")
        return str(ip)
    if not text or len(text) > 253 or not all(_LABEL.fullmatch(label) for label in text.split(".")):
        raise UsageError(
            f"--host {text!r}: not an IP address nor a DNS name (labels of letters, digits and hyphens, "
            "at most 63 characters each, joined by dots, 253 in all)"
        )
    if text.rsplit(".", 1)[-1].isdigit():  # 127.1, 1.2.3.04: read as addresses by some resolvers
        raise UsageError(f"--host {text}: not a valid IP address (nor a DNS name: its last label is numeric)")
    return text


def _host_names(hosts: list[str]) -> list[str]:
    names: list[str] = []
    for text in hosts:
        name = host_name(text)
        if name.lower() == "ca":
            raise UsageError(f"--host {text}: the name is the CA's (DIR/ca.pem, DIR/ca.key): give the host's full name")
        if name.lower() in (n.lower() for n in names):
            raise UsageError(f"--host {text} is given twice (names are not case-sensitive)")
        names.append(name)
    return names


def init(directory: str, hosts: list[str], force: bool = False, days: int = HOST_DAYS) -> list[Path]:
    """Create ``ca.pem``/``ca.key`` and ``NAME.pem``/``NAME.key`` per host in ``directory``; returns the files.

    All of them or none: the PKI is made in memory, written to a private directory inside ``directory``, then
    linked into place; on any failure what was placed is removed and what it replaced is put back.
    """
    names = _host_names(hosts)
    if not 1 <= days <= MAX_DAYS:
        raise UsageError(f"--days must be from 1 to {MAX_DAYS}")
    out = Path(directory)
    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise DestinationError(f"cannot create {out}: {exc.strerror}") from None
    targets = [out / f"{name}{ext}" for name in ["ca", *names] for ext in (".pem", ".key")]
    existing = [p for p in targets if os.path.lexists(p)]
    if existing and not force:
        raise UsageError(f"refusing to overwrite {', '.join(map(str, existing))} (use --force)")
    for path in existing:
        if not (path.is_symlink() or path.is_file()):
            raise UsageError(f"{path} is not a file: it cannot be replaced")
    _place(out, _make_pki(names, days))
    return targets


def _make_pki(names: list[str], days: int) -> list[tuple[str, bytes, int]]:
    """The CA and one certificate per name, in memory: (file name, content, mode) in the order of ``init``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM

    def key_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A unique CA name: two CAs made by `tls init` never look alike to a verifier.
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"vmmig CA {os.urandom(4).hex()}")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    files = [("ca.pem", ca_cert.public_bytes(pem), 0o644), ("ca.key", key_bytes(ca_key), 0o600)]
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        ip = _ip(name)
        alt: x509.GeneralName = x509.IPAddress(ip) if ip is not None else x509.DNSName(name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([alt]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        files += [(f"{name}.pem", cert.public_bytes(pem), 0o644), (f"{name}.key", key_bytes(key), 0o600)]
    return files


def _place(out: Path, files: list[tuple[str, bytes, int]]) -> None:
    """Write ``files`` into ``out``, all or none, never through a symlink planted there.

    Each file is made in a fresh 0700 directory of ours (O_EXCL|O_NOFOLLOW), then hard-linked to its name, which
    fails rather than follow or overwrite anything; with --force what was there is first moved aside (a symlink
    as the link itself) and moved back if a later file fails.
    """
    try:
        staging = Path(tempfile.mkdtemp(prefix=".tls-init-", dir=out))
    except OSError as exc:
        raise DestinationError(f"cannot write in {out}: {exc.strerror}") from None
    aside = staging / "replaced"
    moved: list[str] = []  # names whose old entry went aside
    placed: list[str] = []
    keep_staging = False
    current = ""
    try:
        aside.mkdir()
        for name, data, mode in files:
            current = name
            _write_new(staging / name, data, mode)
        for name, _, _ in files:
            current = name
            if os.path.lexists(out / name):
                os.rename(out / name, aside / name)
                moved.append(name)
            os.link(staging / name, out / name, follow_symlinks=False)
            placed.append(name)
    except OSError as exc:
        if _undo(out, aside, placed, moved):
            raise DestinationError(f"cannot write {out / current}: {exc.strerror}; {out} is left as it was") from None
        keep_staging = True
        raise DestinationError(
            f"cannot write {out / current}: {exc.strerror}; the files it replaced are in {aside}"
        ) from None
    finally:
        if not keep_staging:
            shutil.rmtree(staging, ignore_errors=True)
    with contextlib.suppress(OSError):
        fsync_directory(str(out / "ca.pem"))


def _undo(out: Path, aside: Path, placed: list[str], moved: list[str]) -> bool:
    """Remove what ``_place`` linked and move back what it replaced; False if something could not go back."""
    for name in placed:
        with contextlib.suppress(OSError):
            os.unlink(out / name)
    restored = True
    for name in moved:
        try:
            os.rename(aside / name, out / name)
        except OSError:
            restored = False
    return restored


def _write_new(path: Path, data: bytes, mode: int) -> None:
    write_whole(create_exclusive(str(path)), data, mode)
