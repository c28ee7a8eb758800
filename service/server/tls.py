"""TLS and mutual TLS on the gRPC port, with certificates rotated without a restart.

gRPC calls ``ReloadingCertificates.fetch`` before every TLS handshake
(``grpc.dynamic_ssl_server_credentials``) and asks whether the certificate configuration
changed. ``fetch`` only stats the files (once per new connection, not per call); when one of them
is a different file than last time (inode, size, mtime or ctime), it rereads and checks them,
and hands gRPC the new pair only if it is whole and valid. A rotation caught half-written, or to
a broken or mismatched pair, keeps the previous certificates serving and is logged once. SIGHUP
(``reload``) rereads even when the files look unchanged.

The checks use the standard library's ``ssl`` (OpenSSL), so the serving install needs nothing
more: the chain and the client CA must hold PEM certificates, the key must be an unencrypted PEM
private key, and it must belong to the chain's first certificate.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

_PEM_CERTIFICATE = re.compile(
    rb"-----BEGIN CERTIFICATE-----\s+.*?-----END CERTIFICATE-----", re.DOTALL)
_PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN ((?:RSA |EC )?PRIVATE KEY)-----")
_ENCRYPTED_KEY = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")

# What identifies one version of a file: replaced by rename (Kubernetes secrets, cert-manager)
# gives a new inode; rewritten in place changes size or times.
FileIdentity = tuple[int, int, int, int, int] | None


class TlsError(ValueError):
    """Certificate files that cannot be served; the message is one line naming the setting."""


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None  # given: mutual TLS, client certificates required

    @property
    def mutual(self) -> bool:
        return self.client_ca_file is not None

    def named(self) -> list[tuple[str, Path]]:
        files = [("tls_cert_file", self.cert_file), ("tls_key_file", self.key_file)]
        if self.client_ca_file is not None:
            files.append(("tls_client_ca_file", self.client_ca_file))
        return files

    def identity(self) -> tuple[FileIdentity, ...]:
        return tuple(_identity(path) for _, path in self.named())


def _identity(path: Path) -> FileIdentity:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class CertificateMaterial:
    """One checked set of PEM bytes, exactly as gRPC is given them."""

    certificate_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    fingerprint: str  # SHA-256 of the leaf certificate, as `openssl x509 -fingerprint -sha256`

    def configuration(self) -> Any:
        return grpc.ssl_server_certificate_configuration(
            [(self.private_key, self.certificate_chain)], root_certificates=self.client_ca)


def read_material(files: TlsFiles) -> CertificateMaterial:
    """Read and check the files; raises ``TlsError``."""
    chain = _read("tls_cert_file", files.cert_file)
    key = _read("tls_key_file", files.key_file)
    leaf = _certificates("tls_cert_file", files.cert_file, chain)[0]
    if any(marker in key for marker in _ENCRYPTED_KEY):
        raise TlsError(f"tls_key_file {files.key_file}: the key is encrypted; gRPC needs it "
                       "unencrypted (protect the file instead)")
    if not _PEM_PRIVATE_KEY.search(key):
        raise TlsError(f"tls_key_file {files.key_file}: no PEM private key in it")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(files.cert_file, files.key_file)
    except ssl.SSLError as error:
        reason = ("the key does not belong to the certificate in tls_cert_file"
                  if "KEY_VALUES_MISMATCH" in str(error) else f"refused by OpenSSL ({error})")
        raise TlsError(f"tls_key_file {files.key_file}: {reason}") from None
    except OSError as error:
        raise TlsError(f"tls_cert_file/tls_key_file: {error.strerror or error}") from None
    client_ca = None
    if files.client_ca_file is not None:
        client_ca = _read("tls_client_ca_file", files.client_ca_file)
        _certificates("tls_client_ca_file", files.client_ca_file, client_ca)
    digest = hashlib.sha256(ssl.PEM_cert_to_DER_cert(leaf.decode("ascii"))).hexdigest()
    fingerprint = ":".join(digest[i:i + 2] for i in range(0, len(digest), 2)).upper()
    return CertificateMaterial(chain, key, client_ca, fingerprint)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise TlsError(f"{setting} {path}: {error.strerror or error}") from None


def _certificates(setting: str, path: Path, content: bytes) -> list[bytes]:
    """The PEM certificates in ``content``, each checked to parse; at least one."""
    blocks = _PEM_CERTIFICATE.findall(content)
    if not blocks:
        raise TlsError(f"{setting} {path}: no PEM certificate in it")
    try:
        # OpenSSL parses every certificate of the bundle from memory.
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(
            cadata=b"\n".join(blocks).decode("ascii"))
    except (ssl.SSLError, ValueError, UnicodeDecodeError) as error:
        raise TlsError(f"{setting} {path}: a certificate does not parse ({error})") from None
    return blocks


class ReloadingCertificates:
    """The server's certificates: the ones loaded at start-up, then each valid rotation."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        # gRPC calls fetch from its own threads, SIGHUP arrives on the event loop.
        self._lock = threading.Lock()
        identity = files.identity()
        self.current = read_material(files)  # at start-up a bad pair is fatal (TlsError)
        if files.identity() != identity:
            self.current = read_material(files)  # replaced while read: take the newer one
        self._seen: tuple[FileIdentity, ...] | None = files.identity()
        self._pending: CertificateMaterial | None = None
        self.reloads = 0

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self.current.configuration(), self.fetch,
            require_client_authentication=self.files.mutual)

    def fetch(self) -> Any:
        """gRPC's question before each handshake: a new configuration, or None for none."""
        try:
            with self._lock:
                identity = self.files.identity()
                if identity != self._seen:
                    self._load(identity)
                pending, self._pending = self._pending, None
            return pending.configuration() if pending is not None else None
        except Exception:  # a failed reload must never fail the handshake itself
            log.exception("TLS certificate reload failed; still serving %s",
                          self.current.fingerprint)
            return None

    def reload(self) -> bool:
        """Reread the files now (SIGHUP); True if new certificates will be served."""
        with self._lock:
            return self._load(self.files.identity())

    def _load(self, identity: tuple[FileIdentity, ...]) -> bool:
        # Remembered even when refused, so a broken rotation is logged once, not per handshake.
        self._seen = identity
        try:
            material = read_material(self.files)
        except TlsError as error:
            log.error("TLS certificate rotation refused, still serving %s: %s",
                      self.current.fingerprint, error)
            return False
        if self.files.identity() != identity:
            # A file changed while it was read: what was checked may not be what is on disk
            # now. Forget the identity so the next handshake (or SIGHUP) reads it again.
            self._seen = None
            return False
        if material == self.current:
            return False
        self.current = self._pending = material
        self.reloads += 1
        log.info("TLS certificates reloaded: now serving %s%s", material.fingerprint,
                 " (client CA reloaded too)" if self.files.mutual else "")
        return True


def describe(files: TlsFiles, material: CertificateMaterial) -> str:
    mode = ("mutual TLS: client certificates required, verified against "
            f"{files.client_ca_file}" if files.mutual else "TLS")
    return f"{mode}; certificate {files.cert_file} ({material.fingerprint})"

