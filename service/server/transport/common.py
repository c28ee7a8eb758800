"""What both gRPC skins share: the caller's deadline, a ``ServingError`` as a status, and how
a message quotes what the caller sent."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NoReturn

import grpc

from service.server.errors import ServingError


def deadline_of(context: grpc.aio.ServicerContext) -> float | None:
    """The call's deadline on the monotonic clock, or None when the client set none."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


async def abort(context: grpc.aio.ServicerContext, error: ServingError) -> NoReturn:
    """End the call with the error's status code and message."""
    await context.abort(error.code, error.message)
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


# An error message travels in the grpc-message trailer, percent-encoded (three bytes for each
# non-ASCII byte), and clients drop trailers over 8 KiB (gRPC's default limit) and report
# RESOURCE_EXHAUSTED instead of the real status: what the caller sent is quoted only in part.
MAX_QUOTED_CHARS = 48
MAX_QUOTED_ITEMS = 4


def quoted(value: str) -> str:
    """``repr(value)``, cut to MAX_QUOTED_CHARS characters (escapes count: '\\x00' is four)."""
    shown = repr(value[:MAX_QUOTED_CHARS + 1])  # never the repr of a megabyte
    return shown if len(shown) <= MAX_QUOTED_CHARS else shown[:MAX_QUOTED_CHARS - 1] + "…"


def quoted_all(values: Sequence[object]) -> str:
    """A list as a message quotes it: the first MAX_QUOTED_ITEMS items, then how many more."""
    shown = [quoted(v) if isinstance(v, str) else str(v) for v in values[:MAX_QUOTED_ITEMS]]
    more = len(values) - MAX_QUOTED_ITEMS
    return f"[{', '.join(shown)}]" + (f" and {more} more" if more > 0 else "")
