"""Process exit codes of the ``seqserve`` command, documented in the README."""

from __future__ import annotations

from enum import IntEnum

from pydantic import ValidationError

from service.server.settings import refused_setting


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # unexpected error (a bug: please report it with the traceback from --debug)
    USAGE = 2  # bad command line (argparse's own code)
    DATA_ERROR = 3  # dataset, run directory or manifest unusable
    SERVER_ERROR = 4  # the server answered with an error, or could not be reached
    GATE_FAILED = 5  # export refused: a parity, precision or accuracy gate failed
    IO_ERROR = 6  # the filesystem refused (permissions, disk full, version already exists)
    MISSING_EXTRA = 7  # the command needs the `train` extra (torch), which is not installed
    DEVICE_UNAVAILABLE = 8  # doctor --device cuda: this node cannot serve on CUDA


class CommandError(Exception):
    """A failure that ends the command with a one-line reason on stderr and a given exit code."""

    def __init__(self, message: str, code: ExitCode) -> None:
        super().__init__(message)
        self.code = code

    @classmethod
    def invalid_settings(cls, error: ValidationError) -> CommandError:
        """A usage error naming the first setting pydantic refused, in one line."""
        return cls(refused_setting(error), ExitCode.USAGE)
