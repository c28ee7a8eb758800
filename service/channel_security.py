"""How a client reaches a secured server: TLS (which CA to trust, and for mutual TLS its own
certificate and key) and a bearer token, for ``service.client``'s ``Client`` and
``AsyncClient``.

The token is attached by a client interceptor as ``authorization: Bearer <token>`` on every
call, over TLS or (behind a TLS-terminating proxy or a mesh) plaintext; an interceptor is used
rather than gRPC's call credentials, whose Python plugin runs on a thread pool for every call.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

AUTHORIZATION = "authorization"
TARGET_NAME_OVERRIDE = "grpc.ssl_target_name_override"
_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"
_PRIVATE_KEY = b"PRIVATE KEY-----"


class ChannelSecurityError(ValueError):
    """A file that cannot be read, or a token that cannot be sent; the message is one line
    naming the file or the option, never the token."""


@dataclass(frozen=True)
class ChannelSecurity:
    """``tls``: connect with TLS, trusting ``root_certificates`` (PEM; None: gRPC's default
    roots); ``certificate_chain`` and ``private_key``: the client's own, for mutual TLS;
    ``token``: the bearer token; ``server_name``: the name the server's certificate must carry
    when it differs from the target's host (an address, a tunnel)."""

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ChannelSecurityError("a client certificate needs its key, and a key its "
                                       "certificate")
        if self.token is not None and not _sendable(self.token):
            raise ChannelSecurityError("the token must be visible ASCII without spaces")

    @classmethod
    def from_files(cls, *, ca_file: Path | None = None, cert_file: Path | None = None,
                   key_file: Path | None = None, token: str | None = None,
                   token_file: Path | None = None, server_name: str | None = None,
                   tls: bool = False) -> ChannelSecurity:
        """Read the PEM files (any of them turns TLS on) and the token (``token_file``: its
        first line that is not blank or a ``#`` comment)."""
        if token_file is not None:
            token = first_token(token_file)
        uses_tls = tls or any(f is not None for f in (ca_file, cert_file, key_file))
        return cls(tls=uses_tls,
                   root_certificates=_read_pem(ca_file, "CA certificates", _CERTIFICATE),
                   certificate_chain=_read_pem(cert_file, "client certificate", _CERTIFICATE),
                   private_key=_read_pem(key_file, "client key", _PRIVATE_KEY), token=token,
                   server_name=server_name)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key,
                                            self.certificate_chain)

    def options(self) -> list[tuple[str, Any]]:
        return [(TARGET_NAME_OVERRIDE, self.server_name)] if self.tls and self.server_name else []


def _sendable(token: str) -> bool:
    return bool(token) and all("!" <= char <= "~" for char in token)


def _read_pem(path: Path | None, what: str, marker: bytes) -> bytes | None:
    """The file's bytes; a file without the PEM block is refused here, with its name, rather
    than as an opaque handshake failure later."""
    if path is None:
        return None
    try:
        content = Path(path).read_bytes()
    except OSError as error:
        raise ChannelSecurityError(f"{what} {path}: {error.strerror or error}") from None
    if marker not in content:
        raise ChannelSecurityError(f"{what} {path}: not PEM (no '{marker.decode()}' in it)")
    return content


def first_token(path: Path) -> str:
    """The token in a token file: its first line that is not blank or a ``#`` comment."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ChannelSecurityError(f"token file {path}: {reason or error}") from None
    token = next((s for line in lines if (s := line.strip()) and not s.startswith("#")), None)
    if token is None:
        raise ChannelSecurityError(f"token file {path}: no token in it")
    if not _sendable(token):
        raise ChannelSecurityError(f"token file {path}: its token must be visible ASCII "
                                   "without spaces")
    return token


def open_channel(target: str, options: Sequence[tuple[str, Any]],
                 security: ChannelSecurity | None) -> grpc.Channel:
    """A blocking channel to ``target``: plaintext without ``security``, as before."""
    if security is None:
        return grpc.insecure_channel(target, options=list(options))
    options = [*options, *security.options()]
    channel = (grpc.secure_channel(target, security.channel_credentials(), options=options)
               if security.tls else grpc.insecure_channel(target, options=options))
    if security.token is None:
        return channel
    return grpc.intercept_channel(channel, _BearerToken(security.token))


def open_aio_channel(target: str, options: Sequence[tuple[str, Any]],
                     security: ChannelSecurity | None) -> grpc.aio.Channel:
    """An asyncio channel to ``target``: plaintext without ``security``, as before."""
    if security is None:
        return grpc.aio.insecure_channel(target, options=list(options))
    options = [*options, *security.options()]
    interceptors = [_AsyncBearerToken(security.token)] if security.token is not None else None
    if security.tls:
        return grpc.aio.secure_channel(target, security.channel_credentials(),
                                       options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


class _CallDetails(
        collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials",
                                                "wait_for_ready", "compression")),
        grpc.ClientCallDetails):
    pass


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        d: Any = details
        return _CallDetails(d.method, d.timeout, [*(d.metadata or ()), self._header],
                            d.credentials, d.wait_for_ready, getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation: Callable[..., Any],
                              client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_unary_stream(self, continuation: Callable[..., Any],
                               client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        return continuation(self._with_token(client_call_details), request)

    def intercept_stream_unary(self, continuation: Callable[..., Any],
                               client_call_details: grpc.ClientCallDetails,
                               request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation: Callable[..., Any],
                                client_call_details: grpc.ClientCallDetails,
                                request_iterator: Any) -> Any:
        return continuation(self._with_token(client_call_details), request_iterator)


class _AsyncBearerToken(grpc.aio.UnaryUnaryClientInterceptor,
                        grpc.aio.UnaryStreamClientInterceptor,
                        grpc.aio.StreamUnaryClientInterceptor,
                        grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, token: str) -> None:
        self._header = (AUTHORIZATION, f"Bearer {token}")

    def _with_token(self, details: Any) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()), self._header)
        return grpc.aio.ClientCallDetails(details.method, details.timeout, metadata,
                                          details.credentials, details.wait_for_ready)

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any,
                                    request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any,
                                     request: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request)

    async def intercept_stream_unary(self, continuation: Any, client_call_details: Any,
                                     request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)

    async def intercept_stream_stream(self, continuation: Any, client_call_details: Any,
                                      request_iterator: Any) -> Any:
        return await continuation(self._with_token(client_call_details), request_iterator)
