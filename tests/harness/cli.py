"""Running ``seqserve bench`` / ``seqserve report`` in tests, exactly as ``seqserve`` would."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from harness.tiny_models import corpus

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(argv: Sequence[str]) -> int:
    """``seqserve ARGV``'s exit code, argparse's usage errors (SystemExit) included."""
    from service.cli.main import main

    try:
        return main(list(argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)


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
