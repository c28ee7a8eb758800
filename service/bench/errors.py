"""Why a benchmark cannot run; the command line turns ``kind`` into its exit code."""

from __future__ import annotations

from typing import Literal

Kind = Literal[
    "usage",  # a flag names something that does not exist (a model, a server flag)
    "data",  # the texts or the repository are unusable
    "server",  # the server answered with an error or could not be reached
    "startup",  # the benchmark's own server did not start
]


class BenchError(Exception):
    def __init__(self, message: str, kind: Kind) -> None:
        super().__init__(message)
        self.kind = kind
