"""``seqserve bench``: load generator and sweep against one or more served models.

Cells are the product of model x length x texts-per-request x (concurrency | rate) x spinning
mode. Each cell runs warm-up requests first (not measured), then at most ``--requests`` requests
for at most ``--duration`` seconds, and records client latency percentiles, throughput, errors
by gRPC code, the server's own phase timings, and CPU seconds of the server process (when bench
started it) and of the load generator. ``--in-process`` times ONNX Runtime directly on the same
files and texts, giving the serving-overhead figures.

Exit codes: 0 ok, 2 bad flags, 3 unusable texts or repository, 4 the server failed every
request of some cell (results are still written), 1 the server did not start.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode

log = logging.getLogger(__name__)

DEFAULT_LENGTHS = "16,64,256"
DEFAULT_CONCURRENCY = "1,32"
# auto is what the server serves by default (int8 where its gates passed, else fp32); fp32
# beside it puts both precisions of each model on the frontier.
DEFAULT_PRECISIONS = "auto,fp32"
PRECISION_CHOICES = ("auto", "auto-int8", "fp32", "fp16", "int8")
SPINNING_MODES: dict[str, list[bool | None]] = {
    "server": [None], "off": [False], "on": [True], "both": [False, True]}
_TARGET = re.compile(r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):\d{1,5}$")


def add_bench_command(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser(
        "bench", help="load-test served models and compare them with in-process ONNX Runtime",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = bench.add_argument_group("what to measure")
    where.add_argument("--repository", type=Path, metavar="DIR",
                       help="start a server on this repository (its CPU time is then measured); "
                       "with --server, only where the model files are (for --in-process)")
    where.add_argument("--server", metavar="HOST:PORT", help="measure a running server instead")
    where.add_argument("--server-pid", type=int, metavar="PID",
                       help="with --server: the server's process, whose CPU time is then read "
                       "from /proc (same machine only)")
    where.add_argument("--protocol", choices=["native", "v2"], default="native",
                       help="the load's protocol: seqserve.v1 (native) or the Open Inference "
                       "Protocol (v2), which any KServe-v2 server speaks (default: %(default)s)")
    where.add_argument("--v2-input", default="TEXT", metavar="NAME",
                       help="--protocol v2: the input tensor the texts go in (default: "
                       "%(default)s)")
    where.add_argument("--models", default="", metavar="NAME[,NAME]",
                       help="models to measure (default: every served model)")
    where.add_argument("--serve-args", default="", metavar="'FLAGS'",
                       help="extra `seqserve serve` flags for the started server, quoted, e.g. "
                       "'--intra-op-threads 2 --max-batch-delay-ms 1' (a single flag needs the "
                       "= form: --serve-args=--no-warmup); with --server they describe that "
                       "server's settings to the in-process baseline")
    where.add_argument("--spinning", choices=list(SPINNING_MODES), default="server",
                       help="ORT spin-waiting of the started server: leave the server's setting "
                       "(server), off, on, or both (two server starts, both reported); "
                       "default: %(default)s")
    where.add_argument("--precisions", default=DEFAULT_PRECISIONS, metavar="P[,P]",
                       help="server --precision per start (auto, fp32, fp16, int8): the first "
                       "is the main run, the others add points to the report's accuracy-cost "
                       "frontier (default: %(default)s)")
    where.add_argument("--server-log-level", default="WARNING",
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="log level of the started server (default: %(default)s)")
    load = bench.add_argument_group("load")
    load.add_argument("--concurrency", metavar="N[,N]",
                      help=f"closed loop: concurrent callers per cell (default: "
                      f"{DEFAULT_CONCURRENCY}, unless --rate is given)")
    load.add_argument("--rate", metavar="R[,R]",
                      help="open loop: Poisson arrivals, requests/s; latency counts from the "
                      "intended send time")
    load.add_argument("--lengths", default=DEFAULT_LENGTHS, metavar="T[,T]",
                      help="tokens per text (default: %(default)s)")
    load.add_argument("--texts-per-request", default="1", metavar="N[,N]",
                      help="texts in each request (default: %(default)s)")
    load.add_argument("--requests", type=int, default=400, metavar="N",
                      help="measured requests per cell at most (default: %(default)s)")
    load.add_argument("--duration", type=float, default=20.0, metavar="SECONDS",
                      help="measured time per cell at most (default: %(default)s)")
    load.add_argument("--warmup", type=int, metavar="N",
                      help="unmeasured requests before each cell (default: max(8, 2 x callers))")
    load.add_argument("--deadline", type=float, default=30.0, metavar="SECONDS",
                      help="per-request deadline (default: %(default)s)")
    load.add_argument("--texts", default="rotten-tomatoes", metavar="SOURCE",
                      help="where texts come from: a built-in dataset, a CSV/TSV/JSONL file, or "
                      "'synthetic' (default: %(default)s; falls back to synthetic words when the "
                      "built-in is not cached)")
    load.add_argument("--seed", type=int, default=defaults.SEED,
                      help="text and arrival seed (default: %(default)s)")
    baseline = bench.add_argument_group("in-process baseline")
    baseline.add_argument("--in-process", action="store_true",
                          help="also time ONNX Runtime in this process on the same files and "
                          "texts, at batch 1 and at the batch size the server formed")
    baseline.add_argument("--inprocess-runs", type=int, default=200, metavar="N",
                          help="runs per in-process measurement (default: %(default)s)")
    baseline.add_argument("--overhead-concurrency", type=int, default=32, metavar="N",
                          help="callers of the cell the CPU ratio uses (default: %(default)s)")
    output = bench.add_argument_group("output")
    output.add_argument("--out", type=Path, metavar="DIR",
                        help="write bench.json, bench.csv and PNG charts here")
    output.add_argument("--json", action="store_true",
                        help="print bench.json on stdout instead of the tables (no progress bar)")
    bench.set_defaults(handler=handle_bench)


def parse_list(flag: str, text: str, kind: type[int] | type[float]) -> list[Any]:
    """``1,8,32`` -> [1, 8, 32]; positive numbers only, duplicates dropped, order kept."""
    values: list[Any] = []
    for raw in text.split(","):
        part = raw.strip()
        try:
            value = kind(part)
        except ValueError:
            raise CommandError(f"{flag}: {part!r} is not a number", ExitCode.USAGE) from None
        if not 0 < value < float("inf"):
            raise CommandError(f"{flag}: {part} must be > 0", ExitCode.USAGE)
        if value not in values:
            values.append(value)
    return values


def config_from_args(args: argparse.Namespace) -> Any:
    import shlex

    from service.bench.run import BenchConfig

    if args.repository is None and args.server is None:
        raise CommandError("give --repository DIR (bench starts a server) or --server HOST:PORT",
                           ExitCode.USAGE)
    if args.server is not None and not _TARGET.match(args.server):
        raise CommandError(f"--server {args.server!r}: expected HOST:PORT", ExitCode.USAGE)
    if args.repository is not None and not args.repository.is_dir():
        raise CommandError(f"--repository {args.repository}: not a directory", ExitCode.USAGE)
    if args.server is not None and args.spinning != "server":
        raise CommandError("--spinning needs a server started by bench (drop --server)",
                           ExitCode.USAGE)
    if args.server_pid is not None and args.server is None:
        raise CommandError("--server-pid needs --server (bench reads its own server's CPU)",
                           ExitCode.USAGE)
    if args.in_process and args.repository is None:
        raise CommandError("--in-process needs --repository (the model files)", ExitCode.USAGE)
    for flag, value, low in (("--requests", args.requests, 1), ("--inprocess-runs",
                             args.inprocess_runs, 1), ("--overhead-concurrency",
                             args.overhead_concurrency, 1), ("--warmup", args.warmup, 0)):
        if value is not None and value < low:
            raise CommandError(f"{flag}: must be >= {low}", ExitCode.USAGE)
    for flag, seconds in (("--duration", args.duration), ("--deadline", args.deadline)):
        if not seconds > 0:
            raise CommandError(f"{flag}: must be > 0 seconds", ExitCode.USAGE)
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISION_CHOICES]
    if not precisions or unknown:
        raise CommandError(f"--precisions: {', '.join(unknown) or 'empty'}: expected some of "
                           f"{', '.join(PRECISION_CHOICES)}", ExitCode.USAGE)
    if len(set(precisions)) != len(precisions):
        raise CommandError("--precisions: a precision is named twice", ExitCode.USAGE)
    rates = parse_list("--rate", args.rate, float) if args.rate else []
    concurrency = (parse_list("--concurrency", args.concurrency, int) if args.concurrency
                   else [] if rates else parse_list("--concurrency", DEFAULT_CONCURRENCY, int))
    try:
        serve_args = shlex.split(args.serve_args)
    except ValueError as error:
        raise CommandError(f"--serve-args: {error}", ExitCode.USAGE) from None
    return BenchConfig(
        repository=args.repository, server=args.server,
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        concurrency=concurrency, rates=rates,
        lengths=parse_list("--lengths", args.lengths, int),
        texts_per_request=parse_list("--texts-per-request", args.texts_per_request, int),
        requests=args.requests, duration_s=args.duration, warmup=args.warmup,
        deadline_s=args.deadline, texts=args.texts, spinning=SPINNING_MODES[args.spinning],
        serve_args=serve_args, precisions=precisions,
        in_process=args.in_process, inprocess_runs=args.inprocess_runs,
        overhead_concurrency=args.overhead_concurrency, seed=args.seed,
        progress=not args.json and sys.stderr.isatty(),
        server_log_level=args.server_log_level, protocol=args.protocol,
        server_pid=args.server_pid, v2_input=args.v2_input,
    )


# How each kind of benchmark failure ends the command.
_EXIT_CODES = {"usage": ExitCode.USAGE, "data": ExitCode.DATA_ERROR,
               "server": ExitCode.SERVER_ERROR, "startup": ExitCode.FAILURE}


def handle_bench(args: argparse.Namespace) -> int:
    from service.bench.errors import BenchError
    from service.bench.output import summary, write_outputs
    from service.bench.run import run_bench

    config = config_from_args(args)
    warnings: list[str] = []

    def warn(message: str) -> None:
        if message not in warnings:  # each server start would repeat the same ones
            warnings.append(message)
            log.warning("%s", message)

    try:
        document = run_bench(config, warn)
    except BenchError as error:
        raise CommandError(str(error), _EXIT_CODES[error.kind]) from None
    document["warnings"] = warnings
    written: list[Path] = []
    if args.out is not None:
        from service.report.charts import bench_charts

        try:
            written = write_outputs(document, args.out)
            written += bench_charts(document, args.out)
        except OSError as error:
            raise CommandError(f"--out {args.out}: {error}", ExitCode.IO_ERROR) from None
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(summary(document))
        if written:
            print("\nwrote " + ", ".join(str(path) for path in written))
    failed = [c for c in document["cells"] if c["ok"] == 0]
    if failed:
        first = failed[0]
        raise CommandError(f"every request of {len(failed)} cell(s) failed, e.g. "
                           f"{first['model']} length {first['length']}: {first['errors']}",
                           ExitCode.SERVER_ERROR)
    return 0
