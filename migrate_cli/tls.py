"""Mutually authenticated TLS 1.3 for migration channels, and `vmmig tls init` to make the certificates.

Both ends present a certificate signed by the same CA and verify the other's: the sender checks the receiver's
name (``--tls-peer-name``, default the host it connects to) and the receiver checks the sender's name when
``--tls-peer-name`` is given. Verification failures are turned into one line naming the cause (expired, unknown
CA, name mismatch, plaintext peer). Guest RAM holds every secret of the guest: no downgrade, no TLS < 1.3.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import AuthError, UsageError


@dataclass(frozen=True)
class TlsOptions:
    cert: str
    key: str
    ca: str
    peer_name: str | None = None

    @staticmethod
    def from_cli(cert: str | None, key: str | None, ca: str | None, peer_name: str | None) -> TlsOptions | None:
        given = [x is not None for x in (cert, key, ca)]
        if not any(given):
            if peer_name is not None:
                raise UsageError("--tls-peer-name needs --tls-cert, --tls-key and --tls-ca")
            return None
        if not all(given):
            raise UsageError("TLS needs all three of --tls-cert, --tls-key and --tls-ca")
        assert cert is not None and key is not None and ca is not None
        for option, path in (("--tls-cert", cert), ("--tls-key", key), ("--tls-ca", ca)):
            if not os.path.isfile(path):
                raise UsageError(f"{option} {path}: no such file")
        return TlsOptions(cert, key, ca, peer_name)


def _context(opts: TlsOptions, purpose: ssl.Purpose) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT if purpose is ssl.Purpose.SERVER_AUTH else ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(opts.cert, opts.key)
        ctx.load_verify_locations(opts.ca)
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"cannot load TLS files ({opts.cert}, {opts.key}, {opts.ca}): {exc}") from None
    return ctx


class TlsHandshakeLost(AuthError):
    """The handshake ended without a verdict (closed, reset, timed out): a refusal or a link fault, which cannot
    be told apart, so --retries may try again (a real refusal fails the same way each time)."""

    resumable = True


def _explain(exc: BaseException, peer: str) -> AuthError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        reason = exc.verify_message or str(exc)
        if "expired" in reason:
            why = "its certificate has expired"
        elif "not yet valid" in reason:
            why = "its certificate is not valid yet"
        elif any(word in reason for word in ("issuer", "self-signed", "self signed", "signature failure")):
            why = "its certificate is not signed by our CA (unknown CA)"
        elif "mismatch" in reason or "match" in reason:
            why = f"name mismatch ({reason})"
        else:
            why = reason
        return AuthError(f"TLS: {peer} failed verification: {why}")
    text = str(exc)
    if "WRONG_VERSION_NUMBER" in text or "wrong version number" in text or "HTTP_REQUEST" in text:
        return AuthError(f"TLS: {peer} is not speaking TLS (a plaintext vmmig? use the --tls-* options on both ends)")
    if "CERTIFICATE_REQUIRED" in text or "PEER_DID_NOT_RETURN" in text:
        return AuthError(f"TLS: {peer} presented no certificate (it must use --tls-cert/--tls-key too)")
    if "UNKNOWN_CA" in text or "unknown ca" in text:
        return AuthError(f"TLS: {peer} does not trust our certificate (unknown CA)")
    if "CERTIFICATE_EXPIRED" in text or "certificate expired" in text:
        return AuthError(f"TLS: {peer} rejected our certificate as expired")
    if isinstance(exc, TimeoutError):
        return TlsHandshakeLost(f"TLS: handshake with {peer} timed out (--handshake-timeout)")
    if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or "EOF" in text:
        return TlsHandshakeLost(
            f"TLS: {peer} closed the connection during the handshake (does it use TLS, and trust us?)"
        )
    return AuthError(f"TLS: handshake with {peer} failed: {text}")


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
    if opts.peer_name is not None and opts.peer_name not in names:
        tls.close()
        raise AuthError(
            f"TLS: the sender's certificate names {', '.join(names) or 'nothing'}, "
            f"not {opts.peer_name} (--tls-peer-name)"
        )
    return tls


def peer_names(tls: ssl.SSLSocket) -> list[str]:
    cert = tls.getpeercert() or {}
    names = [value for kind, value in cert.get("subjectAltName", ()) if kind in ("DNS", "IP Address")]
    for rdn in cert.get("subject", ()):
        names += [value for key, value in rdn if key == "commonName"]
    return names


# --- vmmig tls init -----------------------------------------------------------------------------------------------

CA_DAYS = 3650
HOST_DAYS = 825  # the longest validity browsers accept; plenty for migration hosts


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)


def init(directory: str, hosts: list[str], force: bool = False, days: int = HOST_DAYS) -> list[Path]:
    """Create ``ca.pem``/``ca.key`` and ``NAME.pem``/``NAME.key`` per host in ``directory``; returns the files."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    targets = [out / "ca.pem", out / "ca.key"] + [out / f"{h}{ext}" for h in hosts for ext in (".pem", ".key")]
    existing = [str(p) for p in targets if p.exists()]
    if existing and not force:
        raise UsageError(f"refusing to overwrite {', '.join(existing)} (use --force)")
    now = datetime.datetime.now(datetime.UTC)
    pem = serialization.Encoding.PEM
    no_password = serialization.NoEncryption()
    key_format = serialization.PrivateFormat.PKCS8

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
    _write_private(out / "ca.key", ca_key.private_bytes(pem, key_format, no_password))
    (out / "ca.pem").write_bytes(ca_cert.public_bytes(pem))
    written = [out / "ca.pem", out / "ca.key"]
    for host in hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            alt: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            alt = x509.DNSName(host)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
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
        _write_private(out / f"{host}.key", key.private_bytes(pem, key_format, no_password))
        (out / f"{host}.pem").write_bytes(cert.public_bytes(pem))
        written += [out / f"{host}.pem", out / f"{host}.key"]
    return written
