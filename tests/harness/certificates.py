"""Throwaway X.509 material for the TLS tests: a certificate authority that issues server and
client certificates, made with ``cryptography`` in milliseconds (EC P-256 keys).

Files are written by rename, as a secret rotation in Kubernetes or cert-manager does, so a server
that watches them never reads half a file.
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

VALIDITY = dt.timedelta(days=1)
# The names the tests connect to: the loopback address the harness servers listen on.
LOOPBACK_NAMES = ("localhost",)
LOOPBACK_ADDRESSES = ("127.0.0.1",)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def write_atomically(path: Path, content: bytes) -> Path:
    staged = path.with_name(f".{path.name}.staged")
    staged.write_bytes(content)
    os.replace(staged, path)
    return path


@dataclass(frozen=True)
class IssuedCertificate:
    common_name: str
    serial_number: int
    certificate_pem: bytes
    key_pem: bytes

    def write(self, directory: Path, stem: str) -> tuple[Path, Path]:
        """``STEM.crt`` and ``STEM.key`` in ``directory`` (replaced atomically if present)."""
        directory.mkdir(parents=True, exist_ok=True)
        return (write_atomically(directory / f"{stem}.crt", self.certificate_pem),
                write_atomically(directory / f"{stem}.key", self.key_pem))


class CertificateAuthority:
    """A self-signed root that signs leaf certificates for servers and clients."""

    def __init__(self, common_name: str = "seqserve test CA") -> None:
        self.common_name = common_name
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def write(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        return write_atomically(path, self.pem)

    def issue_server(self, common_name: str = "seqserve test server") -> IssuedCertificate:
        sans: list[x509.GeneralName] = [x509.DNSName(name) for name in LOOPBACK_NAMES]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in LOOPBACK_ADDRESSES]
        return self._issue(common_name, ExtendedKeyUsageOID.SERVER_AUTH, sans)

    def issue_client(self, common_name: str = "seqserve test client") -> IssuedCertificate:
        return self._issue(common_name, ExtendedKeyUsageOID.CLIENT_AUTH, [])

    def _issue(self, common_name: str, usage: x509.ObjectIdentifier,
               sans: list[x509.GeneralName]) -> IssuedCertificate:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name)).issuer_name(self.certificate.subject)
            .public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        certificate = builder.sign(self._key, hashes.SHA256())
        return IssuedCertificate(common_name, serial,
                                 certificate.public_bytes(serialization.Encoding.PEM),
                                 _key_pem(key))


def serial_of(der_certificate: bytes) -> int:
    """The serial number of a DER certificate, as a TLS peer presents it."""
    return x509.load_der_x509_certificate(der_certificate).serial_number


def common_name_of(der_certificate: bytes) -> str:
    certificate = x509.load_der_x509_certificate(der_certificate)
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


@dataclass(frozen=True)
class Pki:
    """A CA with a server and a client certificate, and a second, unrelated CA with a client
    certificate of its own (which the server must refuse), all written under ``directory``."""

    directory: Path
    authority: CertificateAuthority
    server: IssuedCertificate
    client: IssuedCertificate
    stranger: IssuedCertificate  # issued by another CA

    @property
    def ca_file(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_files(self) -> tuple[Path, Path]:
        return self.directory / "server.crt", self.directory / "server.key"

    @property
    def client_files(self) -> tuple[Path, Path]:
        return self.directory / "client.crt", self.directory / "client.key"

    @property
    def stranger_files(self) -> tuple[Path, Path]:
        return self.directory / "stranger.crt", self.directory / "stranger.key"


def make_pki(directory: Path) -> Pki:
    authority = CertificateAuthority()
    pki = Pki(directory, authority, authority.issue_server(), authority.issue_client(),
              CertificateAuthority("another CA").issue_client("stranger"))
    authority.write(pki.ca_file)
    pki.server.write(directory, "server")
    pki.client.write(directory, "client")
    pki.stranger.write(directory, "stranger")
    return pki
