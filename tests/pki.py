"""Test certificates issued by the CA of a `vmmig tls init` directory, and the options that use them."""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

DAY = datetime.timedelta(days=1)


def issue(
    pki: Path,
    file_name: str,
    common_name: str,
    dns_names: list[str],
    valid_from: datetime.timedelta = -datetime.timedelta(minutes=5),
    valid_until: datetime.timedelta = DAY,
) -> None:
    """Write ``file_name``.pem/.key: a certificate signed by the directory's CA, valid from ``valid_from`` to
    ``valid_until`` (relative to now)."""
    ca_key = serialization.load_pem_private_key((pki / "ca.key").read_bytes(), None)
    ca = x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + valid_from)
        .not_valid_after(now + valid_until)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in dns_names]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    (pki / f"{file_name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (pki / f"{file_name}.key").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def make_expired(pki: Path) -> None:
    """expired.pem/.key: sender.test, signed by the CA, expired yesterday."""
    issue(pki, "expired", "sender.test", ["sender.test"], valid_from=-30 * DAY, valid_until=-DAY)


def tls_args(pki: Path, name: str, ca: str = "ca.pem") -> list[str]:
    return ["--tls-cert", str(pki / f"{name}.pem"), "--tls-key", str(pki / f"{name}.key"), "--tls-ca", str(pki / ca)]
