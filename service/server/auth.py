"""Bearer-token authentication of gRPC calls: ``authorization: Bearer <token>`` metadata.

Tokens come from a file (one per line; blank lines and ``#`` comments ignored; reread on SIGHUP,
so a token is rotated by adding the new one, moving clients, then removing the old) and from
the environment (``SEQSERVE_AUTH_TOKENS``, comma-separated, fixed for the process's life).

A presented token is compared with every configured token, each time all of them: both sides
are hashed with SHA-256 first, so ``hmac.compare_digest`` compares equal lengths and the time
taken says nothing about a token's length, its prefix, or which token matched. Refusals are
UNAUTHENTICATED with a one-line message that never repeats what the client sent.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger(__name__)

AUTHORIZATION = "authorization"
SCHEME = "bearer"  # compared case-insensitively, as HTTP authentication schemes are

MISSING = "missing bearer token: send metadata 'authorization: Bearer <token>'"
MALFORMED = "authorization metadata must be 'Bearer <token>'"
INVALID = "invalid bearer token"


class AuthError(ValueError):
    """Tokens that cannot be used; the message is one line and never contains a token."""


def _valid_token(token: str) -> bool:
    # What fits in an HTTP/2 header value after "Bearer ": visible ASCII, no spaces.
    return bool(token) and all("!" <= char <= "~" for char in token)


def parse_token_file(path: Path) -> list[str]:
    """The tokens of a token file; raises ``AuthError`` naming the line, never its content."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise AuthError(f"auth_token_file {path}: {reason or error}") from None
    tokens = []
    for number, line in enumerate(text.splitlines(), start=1):
        token = line.strip()
        if not token or token.startswith("#"):
            continue
        if not _valid_token(token):
            raise AuthError(f"auth_token_file {path} line {number}: a token must be visible "
                            "ASCII without spaces")
        tokens.append(token)
    return tokens


def parse_token_list(secret: str) -> list[str]:
    """The comma-separated tokens of ``auth_tokens``; raises ``AuthError``."""
    tokens = [part.strip() for part in secret.split(",") if part.strip()]
    for index, token in enumerate(tokens, start=1):
        if not _valid_token(token):
            raise AuthError(f"auth_tokens: token {index} of {len(tokens)} must be visible ASCII "
                            "without spaces")
    return tokens


class TokenSet:
    """Configured tokens, kept only as SHA-256 digests."""

    def __init__(self, tokens: Iterable[str]) -> None:
        self._digests = tuple({_digest(token) for token in tokens})

    def __len__(self) -> int:
        return len(self._digests)

    def accepts(self, presented: str) -> bool:
        candidate = _digest(presented)
        matched = False
        for digest in self._digests:  # no early exit: every token is compared every time
            matched |= hmac.compare_digest(candidate, digest)
        return matched


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


class TokenSource:
    """Where the tokens come from, and the set in force; ``reload`` rereads the file."""

    def __init__(self, token_file: Path | None, listed: str) -> None:
        self.token_file = token_file
        self._listed = parse_token_list(listed)
        self.tokens = self._read()
        if not self.tokens:
            where = f"auth_token_file {token_file}" if token_file else "auth_tokens"
            raise AuthError(f"{where}: no token in it (blank lines and # comments are ignored)")

    def _read(self) -> TokenSet:
        from_file = parse_token_file(self.token_file) if self.token_file else []
        return TokenSet([*from_file, *self._listed])

    def reload(self) -> bool:
        """Reread the token file (SIGHUP). A file that became unreadable, invalid or empty keeps
        the tokens in force: a broken rotation must not lock every client out, nor let
        everyone in."""
        if self.token_file is None:
            return False
        try:
            tokens = self._read()
        except AuthError as error:
            log.error("token file reload refused, keeping %d token(s): %s",
                      len(self.tokens), error)
            return False
        if not tokens:
            log.error("token file reload refused: %s holds no token; keeping %d token(s)",
                      self.token_file, len(self.tokens))
            return False
        self.tokens = tokens
        log.info("token file reloaded: %d token(s) in force", len(tokens))
        return True


def refusal(metadata: Sequence[tuple[str, Any]] | None, tokens: TokenSet) -> str | None:
    """Why a call with this metadata is refused, or None when its token is accepted."""
    value = next((v for k, v in metadata or () if k == AUTHORIZATION), None)
    if value is None:
        return MISSING
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != SCHEME or not token:
        return MALFORMED
    return None if tokens.accepts(token) else INVALID


def service_of(method: str) -> str:
    """``/grpc.health.v1.Health/Check`` -> ``grpc.health.v1.Health``."""
    return method.lstrip("/").rpartition("/")[0]


Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler | None]]


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses, before any handler runs, every call without an accepted token, except to the
    open services (health by default, so probes need no secret)."""

    def __init__(self, source: TokenSource, open_services: Iterable[str]) -> None:
        self.source = source
        self.open_services = frozenset(open_services)

    async def intercept_service(self, continuation: Continuation,
                                handler_call_details: grpc.HandlerCallDetails
                                ) -> grpc.RpcMethodHandler | None:
        details = handler_call_details
        if service_of(details.method) in self.open_services:
            return await continuation(details)
        reason = refusal(details.invocation_metadata, self.source.tokens)  # type: ignore[attr-defined]
        handler = await continuation(details)
        if reason is None:
            return handler
        log.debug("refused %s: %s", details.method, reason)
        return _refusing(handler, reason)


def _refusing(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that answers UNAUTHENTICATED at once; its
    request is never deserialized. An unknown method is refused the same way, so callers
    without a token learn nothing about which methods exist."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, reason)

    streaming_in = handler is not None and handler.request_streaming
    streaming_out = handler is not None and handler.response_streaming
    if streaming_in and streaming_out:
        return grpc.stream_stream_rpc_method_handler(refuse)
    if streaming_in:
        return grpc.stream_unary_rpc_method_handler(refuse)
    if streaming_out:
        return grpc.unary_stream_rpc_method_handler(refuse)
    return grpc.unary_unary_rpc_method_handler(refuse)
