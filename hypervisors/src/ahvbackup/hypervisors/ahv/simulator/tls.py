"""The simulator's own certificate authority and per-listener server certificates.

The CA is made once per state directory and kept (``tls/ca.pem``, ``tls/ca-key.pem``), so a
client configured with ``prism_ca_cert = <state>/ca.pem`` keeps working across restarts. Each
listener gets a fresh server certificate whose subject alternative name is its IP address.
"""

from __future__ import annotations

__all__ = ["CertificateAuthority"]

import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ahvbackup.core.fsutil import atomic_write_bytes


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ahvbackup simulator"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


class CertificateAuthority:
    """Loads the CA under ``state_dir`` or creates it; issues server certificates."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = Path(state_dir) / "tls"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca_path = Path(state_dir) / "ca.pem"
        key_path = self.dir / "ca-key.pem"
        if key_path.exists() and self.ca_path.exists():
            self._key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            self._cert = x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            return
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self._cert = (
            x509.CertificateBuilder()
            .subject_name(_name("ahvbackup simulator CA"))
            .issuer_name(_name("ahvbackup simulator CA"))
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, key_cert_sign=True, crl_sign=True,
                    content_commitment=False, key_encipherment=False, data_encipherment=False,
                    key_agreement=False, encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self._key.public_key()), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        atomic_write_bytes(key_path, self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        atomic_write_bytes(
            self.ca_path, self._cert.public_bytes(serialization.Encoding.PEM), mode=0o644
        )

    def issue(self, name: str, ip: str, *, dns: tuple[str, ...] = ()) -> tuple[Path, Path]:
        """Write ``tls/<name>.pem`` and ``tls/<name>-key.pem`` for a listener on ``ip``."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip))]
        sans += [x509.DNSName(d) for d in dns]
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{name} {ip}"))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=825))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(
                    self._key.public_key()  # type: ignore[arg-type]
                ),
                critical=False,
            )
            .sign(self._key, hashes.SHA256())  # type: ignore[arg-type]
        )
        cert_path = self.dir / f"{name}.pem"
        key_path = self.dir / f"{name}-key.pem"
        atomic_write_bytes(key_path, key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        os.chmod(key_path, 0o600)
        return cert_path, key_path
