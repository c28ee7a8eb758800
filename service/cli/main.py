"""The ``seqserve`` command: one entry point, one subcommand per job.

Subcommands that need torch (train, export, build) import it only when they run, so the serving
install answers ``seqserve serve`` and ``seqserve --help`` without it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from service.cli.exit_codes import CommandError, ExitCode


def build_parser() -> argparse.ArgumentParser:
    from service.cli.bench import add_bench_command
    from service.cli.classify import add_classify_command
    from service.cli.data import add_data_commands
    from service.cli.demo import add_demo_command
    from service.cli.doctor import add_doctor_command
    from service.cli.export import add_export_commands
    from service.cli.import_model import add_import_commands
    from service.cli.replicas import add_replicas_command
    from service.cli.repo import add_repo_commands
    from service.cli.report import add_report_command
    from service.cli.serve import add_serve_command
    from service.cli.train import add_train_command

    parser = argparse.ArgumentParser(
        prog="seqserve",
        description="Train, export, serve and compare LSTM and Transformer text classifiers.",
        epilog="Exit codes: " + ", ".join(f"{c.value} {c.name.lower()}" for c in ExitCode),
    )
    parser.add_argument("--log-level", default="INFO",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="default: INFO")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_data_commands(commands)
    add_train_command(commands)
    add_export_commands(commands)
    add_import_commands(commands)
    add_repo_commands(commands)
    add_serve_command(commands)
    add_classify_command(commands)
    add_demo_command(commands)
    add_bench_command(commands)
    add_report_command(commands)
    add_doctor_command(commands)
    add_replicas_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.handler(args))
    except CommandError as error:
        if args.debug:
            logging.exception("command failed")
        print(f"seqserve: error: {error}", file=sys.stderr)
        return int(error.code)
    except KeyboardInterrupt:
        print("seqserve: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
