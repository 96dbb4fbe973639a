"""A throw-away certificate authority for tests, made with the ``cryptography`` package.

::

    ca = CertificateAuthority.create(tmp_path / "pki")
    server = ca.issue_server("server")                  # SAN DNS:localhost, IP:127.0.0.1
    device = ca.issue_client("pi-07")                   # CN=pi-07, for use_identity_as_username
    server.cert, server.key, ca.cert                    # PEM files under tmp_path / "pki"

Keys are EC P-256, certificates are valid from an hour ago for two days, and carry the
extensions a strict verifier wants (basic constraints, key usage, extended key usage, subject
and authority key identifiers), so OpenSSL's and Python's default checks accept them. Keys are
written unencrypted with mode 0600: Mosquitto and the agent read them as they would on a board.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["CertificateAuthority", "Issued"]


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, as PEM files."""

    name: str
    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeship tests"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return builder.not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(
        now + dt.timedelta(days=days)
    )


class CertificateAuthority:
    """A self-signed CA whose certificate and key live in ``directory``."""

    def __init__(
        self, directory: Path, name: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> None:
        self.directory = directory
        self.name = name
        self._key = key
        self._cert = cert
        self.cert = directory / f"{name}.crt"
        self.key = directory / f"{name}.key"

    @classmethod
    def create(
        cls, directory: Path, name: str = "ca", common_name: str = "edgeship test CA"
    ) -> CertificateAuthority:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        builder = (
            _validity(x509.CertificateBuilder(), 2)
            .subject_name(_name(common_name))
            .issuer_name(_name(common_name))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        )
        cert = builder.sign(key, hashes.SHA256())
        ca = cls(directory, name, key, cert)
        ca.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(ca.key, key)
        return ca

    def issue_server(
        self,
        name: str = "server",
        dns: tuple[str, ...] = ("localhost",),
        ips: tuple[str, ...] = ("127.0.0.1",),
    ) -> Issued:
        """A TLS server certificate for ``dns`` names and ``ips`` (CN is the first name)."""
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
        return self._issue(name, dns[0] if dns else name, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def issue_client(self, common_name: str, name: str | None = None) -> Issued:
        """A TLS client certificate with ``CN=common_name`` (Mosquitto's
        ``use_identity_as_username`` makes that the MQTT user name)."""
        return self._issue(name or common_name, common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def _issue(
        self,
        name: str,
        common_name: str,
        usage: x509.ObjectIdentifier,
        sans: list[x509.GeneralName],
    ) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        public = key.public_key()
        builder = (
            _validity(x509.CertificateBuilder(), 2)
            .subject_name(_name(common_name))
            .issuer_name(self._cert.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(name, self.directory / f"{name}.crt", self.directory / f"{name}.key")
        issued.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_key(issued.key, key)
        return issued
