"""``seqserve serve``: the gRPC server on a model repository.

The flags are derived from ``ServeSettings`` (``service/server/settings_flags.py``): every field
is a flag, unset flags fall through to ``SEQSERVE_*`` variables and then to the defaults.

Exit codes: 0 ok (drained on SIGTERM/SIGINT), 1 the server could not start, 2 usage.
"""

from __future__ import annotations

import argparse

from pydantic import ValidationError

from service.cli.exit_codes import CommandError, ExitCode
from service.server.settings import ENV_PREFIX, ServeSettings
from service.server.settings_flags import add_settings_flags
from service.server.settings_flags import settings_from_args as _settings_from_args


def add_serve_command(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a model repository over gRPC",
        description="Serve every model of a repository over gRPC (seqserve.v1 and the Open "
        "Inference Protocol on one port), with Prometheus metrics on another. Every flag can "
        f"also be set as an environment variable {ENV_PREFIX}<FLAG_NAME>.")
    add_settings_flags(serve)
    serve.set_defaults(handler=handle_serve)


def settings_from_args(args: argparse.Namespace) -> tuple[ServeSettings, set[str]]:
    """The settings, and which were given as flags; a refused value is a usage error."""
    try:
        return _settings_from_args(args)
    except ValidationError as error:
        raise CommandError.invalid_settings(error) from None


def handle_serve(args: argparse.Namespace) -> int:
    from service.server import event_loop
    from service.server.app import StartupError, serve  # keeps other commands light to import

    settings, overridden = settings_from_args(args)
    try:
        return int(event_loop.run(lambda: serve(settings, overridden=overridden),  # type: ignore[arg-type]
                                  settings.event_loop))
    except (StartupError, RuntimeError) as error:
        raise CommandError(str(error), ExitCode.FAILURE) from None
