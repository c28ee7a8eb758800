"""``seqserve demo``: the README's main job, end to end on the default models.

Builds ``sentiment-lstm``, ``sentiment-transformer`` and ``sentiment-pretrained`` (MiniLM-L6
fine-tuned) when the repository lacks them (needs the ``train`` extra, once: about 8 minutes on
2 cores), starts ``seqserve serve`` as a child process on a free loopback port, classifies
example texts with the three, measures them side by side through the server, and stops the
server with SIGTERM (a clean drain), unless ``--keep-serving``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from service import defaults
from service.cli.exit_codes import CommandError, ExitCode
from service.repo.layout import latest_version

DEFAULT_MODELS = ("sentiment-lstm", "sentiment-transformer", "sentiment-pretrained")
#: Shown beside the defaults when the repository holds it (``--distilled`` builds it).
DISTILLED_MODEL = "sentiment-distilled"
EXAMPLES = [
    "A gripping, beautifully acted film that stays with you long after the credits.",
    "Tedious, overlong and utterly predictable; I checked my watch twice.",
    "The plot is thin, but the performances are so warm that it hardly matters.",
    "Not even the charming lead can rescue this muddled, joyless sequel.",
]
STARTUP_TIMEOUT_S = 180.0
LATENCY_REQUESTS = 200
THROUGHPUT_REQUESTS = 600
THROUGHPUT_CALLERS = 32


def ensure_models(repository: Path, *, distilled: bool = False) -> None:
    wanted = [*DEFAULT_MODELS, *([DISTILLED_MODEL] if distilled else [])]
    missing = [name for name in wanted if latest_version(repository, name) is None]
    if not missing:
        return
    print(f"building {', '.join(missing)} into {repository} (first run only)", flush=True)
    from service.cli.export import ExportOptions, build_defaults
    from service.cli.train import require_training_extra

    require_training_extra()
    build_defaults(repository, defaults.RUNS, options=ExportOptions(),
                   include_distilled=distilled)


def measure(client: Any, model: str, texts: list[str]) -> dict[str, float]:
    """One caller for latency, then 32 concurrent callers for throughput; one text a request.

    Both are warmed-up closed-loop cells of ``seqserve bench``, so the demo and the benchmark
    measure the same way.
    """
    from service.bench.run import measure_cell

    single = measure_cell(client.target, model, texts, concurrency=1,
                          requests=LATENCY_REQUESTS)
    loaded = measure_cell(client.target, model, texts, concurrency=THROUGHPUT_CALLERS,
                          requests=THROUGHPUT_REQUESTS)
    return {"p50_ms": single["latency_ms"]["p50"], "p99_ms": single["latency_ms"]["p99"],
            "texts_per_s": loaded["texts_per_s"],
            "mean_batch": loaded["server"]["batch_size_mean"] or float("nan")}


def handle_demo(args: argparse.Namespace) -> int:
    from service.bench.child_server import ChildServer
    from service.bench.errors import BenchError
    from service.client import Client, ClientError

    ensure_models(args.repository, distilled=args.distilled)
    server = ChildServer(args.repository, [], log_level=args.server_log_level, port=args.port,
                         metrics_port=args.metrics_port, log_to_terminal=True,
                         startup_timeout_s=STARTUP_TIMEOUT_S)
    try:
        address = server.start()
    except BenchError as error:
        raise CommandError(str(error), ExitCode.FAILURE) from None
    try:
        with Client(address, timeout=30) as client:
            compare(client, address)
    except ClientError as error:
        server.stop()
        raise CommandError(str(error), ExitCode.SERVER_ERROR) from None
    except BaseException:
        server.stop()
        raise
    if args.keep_serving:
        metrics = (f"metrics on port {args.metrics_port}" if args.metrics_port
                   else "metrics off: --metrics-port to enable")
        print(f"\nserving on {address} ({metrics}); Ctrl-C stops it")
        try:
            server.wait()
        except KeyboardInterrupt:
            # The terminal's SIGINT reached the server too (same process group): it is
            # draining already, and a second signal would cut the drain short.
            server.wait()
    code = server.stop()
    print(f"\nserver drained and stopped (exit code {code})")
    return ExitCode.OK if code == 0 else ExitCode.FAILURE


def compare(client: Any, address: str) -> None:
    """Classify the examples with every default model, then measure them side by side."""
    models = {m.name: m for m in client.list_models()}
    print(f"\nserver {address}: " + ", ".join(
        f"{m.name} v{m.version} ({m.architecture}, {m.precision} on {m.device})"
        for m in models.values()))
    names = [name for name in (*DEFAULT_MODELS, DISTILLED_MODEL) if name in models]
    print("\nwhat each model is served as, and why:")
    for name in names:
        model = models[name]
        print(f"  {name}: {model.precision_reason or model.precision}; "
              f"{model.intra_op_threads} ORT thread(s), {model.intra_op_threads_reason}"
              + (f"; fused: {', '.join(f'{op} x{n}' for op, n in model.fused_ops.items())}"
                 if model.fused_ops else ""))
    print("\n" + "text".ljust(60) + "".join(n.ljust(24) for n in names))
    answers = {name: client.classify(EXAMPLES, model=name).results for name in names}
    for index, text in enumerate(EXAMPLES):
        cells = "".join(f"{answers[n][index].label} {answers[n][index].score:.2f}".ljust(24)
                        for n in names)
        print((text if len(text) < 59 else text[:57] + "…").ljust(60) + cells)

    print("\narchitecture   served   accuracy fp32 / fp16 / int8   p50 ms   p99 ms   "
          "texts/s (32 callers)   mean batch")
    for name in names:
        model = models[name]
        evaluation = model.evaluation
        accuracy = " / ".join(f"{evaluation[f'{p}_accuracy']:.4f}"
                              if f"{p}_accuracy" in evaluation else "  -   "
                              for p in ("fp32", "fp16", "int8"))
        figures = measure(client, name, EXAMPLES * 8)
        contender = f"{model.architecture} distilled" if model.distillation else model.architecture
        print(f"{contender:<14} {model.precision:<8} {accuracy:<26}  "
              f"{figures['p50_ms']:6.2f}   "
              f"{figures['p99_ms']:6.2f}   {figures['texts_per_s']:10.0f}             "
              f"{figures['mean_batch']:.1f}")


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="build the default models if missing, serve, classify, compare",
        description=__doc__)
    demo.add_argument("--repository", type=Path, default=defaults.REPOSITORY,
                      help="default: ./%(default)s")
    demo.add_argument("--port", type=int, default=int(os.environ.get("SEQSERVE_PORT", 0)),
                      help="gRPC port (default: a free one)")
    demo.add_argument("--metrics-port", type=int, default=0,
                      help="Prometheus port (default: 0, disabled; "
                      f"{defaults.METRICS_PORT} is the server default)")
    demo.add_argument("--distilled", action="store_true",
                      help=f"also build and compare {DISTILLED_MODEL}, an LSTM distilled from "
                      "sentiment-pretrained (about 9 more minutes, once)")
    demo.add_argument("--keep-serving", action="store_true",
                      help="leave the server running after the comparison")
    demo.add_argument("--server-log-level", default="WARNING",
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="the server's log level (default: WARNING, to keep the output short)")
    demo.set_defaults(handler=handle_demo)
