"""Running ``seqserve bench`` / ``seqserve report`` in tests, exactly as ``seqserve`` would.

Until ``service/cli.py`` registers the two commands, they are added to its parser here; the
error handling mirrors ``service.cli.main`` (one line ``seqserve: error: ...``, exit code).
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Sequence
from pathlib import Path

from model_factory import corpus

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: Sequence[str]) -> int:
    from service.bench import add_bench_commands
    from service.cli import build_parser, main
    from service.exit_codes import CommandError
    from service.report import add_report_command

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "bench" in commands.choices and "report" in commands.choices:
        return main(list(argv))
    add_bench_commands(commands)
    add_report_command(commands)
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as exit_:  # argparse's own usage errors
        return int(exit_.code or 0)
    try:
        return int(args.handler(args))
    except CommandError as error:
        print(f"seqserve: error: {error}", file=sys.stderr)
        return int(error.code)


def write_texts_csv(path: Path, count: int = 60) -> Path:
    """A small labelled CSV in the shape ``--texts FILE`` reads (text, label)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for index, text in enumerate(corpus(count, seed=3)):
            writer.writerow([text, "a" if index % 2 else "b"])
    return path


def is_png(path: Path) -> bool:
    """A PNG signature, and matplotlib can decode the whole image."""
    from matplotlib.image import imread

    if not path.is_file() or path.read_bytes()[:8] != PNG_SIGNATURE:
        return False
    image = imread(path)
    return image.ndim == 3 and image.shape[0] > 10 and image.shape[1] > 10
