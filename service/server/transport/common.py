"""What both gRPC skins share: the caller's deadline, and a ``ServingError`` as a status."""

from __future__ import annotations

import time
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
