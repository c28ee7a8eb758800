"""The gRPC port's security, in one place for the server to use: TLS or mutual TLS
(``service/server/tls.py``) and bearer tokens (``service/server/auth.py``), built from the
settings, with one ``reload`` for SIGHUP.

Nothing configured means what it always meant: a plaintext port and no authentication.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import grpc

from service.server.auth import AuthError, TokenAuthInterceptor, TokenSource
from service.server.settings import ServeSettings
from service.server.tls import ReloadingCertificates, TlsError, TlsFiles, describe

log = logging.getLogger(__name__)


class SecurityError(ValueError):
    """Security settings the server cannot start with; one line naming the setting."""


class ServerSecurity:
    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.certificates: ReloadingCertificates | None = None
        self.auth: TokenAuthInterceptor | None = None

    def load(self, served_services: Iterable[str]) -> None:
        """Read and check the certificates and tokens; raises ``SecurityError``."""
        s = self.settings
        open_services = s.open_services()
        unknown = sorted(set(open_services) - set(served_services))
        if unknown:
            raise SecurityError(
                f"invalid setting auth_open_services: {', '.join(unknown)} is not a service of "
                f"this server (its services: {', '.join(sorted(served_services))})")
        try:
            if s.tls_cert_file is not None and s.tls_key_file is not None:
                self.certificates = ReloadingCertificates(
                    TlsFiles(s.tls_cert_file, s.tls_key_file, s.tls_client_ca_file))
            listed = s.auth_tokens.get_secret_value() if s.auth_tokens is not None else ""
            if s.auth_token_file is not None or listed.strip():
                self.auth = TokenAuthInterceptor(TokenSource(s.auth_token_file, listed),
                                                 open_services)
        except (TlsError, AuthError) as error:
            raise SecurityError(str(error)) from None
        for line in self.summary():
            log.info("security: %s", line)
        if self.auth is not None and self.certificates is None:
            log.warning("security: bearer tokens travel in plaintext without TLS "
                        "(tls_cert_file/tls_key_file); use this only behind a TLS proxy or mesh")

    def summary(self) -> list[str]:
        c = self.certificates
        lines = [describe(c.files, c.current) if c is not None else "plaintext port (no TLS)"]
        if self.auth is None:
            lines.append("no token authentication")
        else:
            opened = ", ".join(sorted(self.auth.open_services)) or "none"
            lines.append(f"bearer tokens required: {len(self.auth.source.tokens)} token(s); "
                         f"open without a token: {opened}")
        return lines

    @property
    def interceptors(self) -> list[Any]:
        """For ``grpc.aio.server(interceptors=...)``; empty (no per-call cost) without tokens."""
        return [self.auth] if self.auth is not None else []

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.certificates is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.certificates.credentials())

    def reload(self) -> None:
        """SIGHUP: reread the certificates and the token file; a broken rotation keeps what
        is in force and is logged."""
        if self.certificates is not None:
            self.certificates.reload()
        if self.auth is not None:
            self.auth.source.reload()
