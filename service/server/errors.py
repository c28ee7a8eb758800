"""The one error type the data plane raises; each transport skin maps it to its status.

Every refusal carries the gRPC status code it ends with and a bounded ``reason`` used as the
``reason`` label of ``seqserve_rejections_total`` (never free text, so the label set stays small).
"""

from __future__ import annotations

from typing import Literal

import grpc

Reason = Literal[
    "invalid_argument",  # a request field is wrong (the message names it)
    "too_long",  # a text is over the model's max_length and --truncation reject is set
    "not_found",  # unknown model or version
    "queue_full",  # the model's queue is at max_queue_texts
    # the server is at max_inflight_requests, or the model's queue already holds
    # max_queue_batches of work or more than max_queue_delay_ms / the call's deadline
    "overloaded",
    "deadline_exceeded",  # the caller's deadline passed before its texts were computed
    "cancelled",  # the caller went away before its texts were computed
    "unavailable",  # loading, draining, or the model version is being replaced
    "internal",  # inference itself failed
]
REASONS: tuple[Reason, ...] = Reason.__args__  # type: ignore[attr-defined]


class ServingError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, reason: Reason) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


def invalid(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.INVALID_ARGUMENT, message, "invalid_argument")


def not_found(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.NOT_FOUND, message, "not_found")


def unavailable(message: str) -> ServingError:
    return ServingError(grpc.StatusCode.UNAVAILABLE, message, "unavailable")
