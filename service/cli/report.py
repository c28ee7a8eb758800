"""``seqserve report``: one Markdown file comparing the architectures, from a bench run and the
models' manifests, with PNG charts beside it.

Exit codes: 0 ok, 2 bad flags, 3 the bench directory or a manifest is unusable, 6 the output
directory cannot be written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from service.cli.exit_codes import CommandError, ExitCode


def add_report_command(subparsers: argparse._SubParsersAction) -> None:
    report = subparsers.add_parser(
        "report", help="write the architecture comparison (Markdown + PNG charts)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("--bench", type=Path, required=True, metavar="DIR",
                        help="a `seqserve bench --out` directory (or its bench.json)")
    report.add_argument("--repository", type=Path, metavar="DIR",
                        help="model repository for accuracy and training figures (default: "
                        "the evaluation the server reported during the bench)")
    report.add_argument("--out", type=Path, default=Path("report"), metavar="DIR",
                        help="output directory (default: %(default)s)")
    report.set_defaults(handler=handle_report)


def handle_report(args: argparse.Namespace) -> int:
    from service.repo.manifest import ManifestError
    from service.report.markdown import ReportError, load_bench, model_quality, write_report

    if args.repository is not None and not args.repository.is_dir():
        raise CommandError(f"--repository {args.repository}: not a directory", ExitCode.USAGE)
    try:
        document = load_bench(args.bench)
        quality = model_quality(document, args.repository)
    except (ReportError, ManifestError) as error:
        raise CommandError(str(error), ExitCode.DATA_ERROR) from None
    try:
        path = write_report(document, quality, args.out, source=args.bench)
    except OSError as error:
        raise CommandError(f"--out {args.out}: {error}", ExitCode.IO_ERROR) from None
    print(f"wrote {path}")
    return 0
