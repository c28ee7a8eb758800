"""``seqserve demo``: the README's main job, end to end on the default models.

Builds ``sentiment-lstm`` and ``sentiment-transformer`` when the repository lacks them (needs
the ``train`` extra, once), starts ``seqserve serve`` as a child process on a free loopback
port, classifies example texts with both architectures, measures them side by side through the
server, and stops the server with SIGTERM (a clean drain), unless ``--keep-serving``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from service.exit_codes import CommandError, ExitCode
from service.repository import latest_version

DEFAULT_MODELS = ("sentiment-lstm", "sentiment-transformer")
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


def ensure_models(repository: Path) -> None:
    missing = [name for name in DEFAULT_MODELS if latest_version(repository, name) is None]
    if not missing:
        return
    print(f"building {', '.join(missing)} into {repository} (first run only)", flush=True)
    from service.cli import main as cli_main

    code = cli_main(["build", "--repository", str(repository)])
    if code != 0:
        raise CommandError(f"seqserve build failed with exit code {code}", ExitCode(code))


def start_server(repository: Path, port: int, metrics_port: int,
                 log_level: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "service", "--log-level", log_level, "serve",
               "--repository", str(repository),
               "--host", "127.0.0.1", "--port", str(port), "--metrics-host", "127.0.0.1",
               "--metrics-port", str(metrics_port), "--poll-interval-s", "0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    assert process.stdout is not None
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        if line.startswith("seqserve: serving on "):
            return process, line.rsplit(" ", 1)[1].strip()
    process.kill()
    raise CommandError("the server did not start (see its log above)", ExitCode.FAILURE)


def measure(client: Any, model: str, texts: list[str]) -> dict[str, float]:
    """One caller for latency, then 32 concurrent callers for throughput; one text a request.

    Both are warmed-up closed-loop cells of ``seqserve bench``, so the demo and the benchmark
    measure the same way.
    """
    from service.bench_run import measure_cell

    single = measure_cell(client.target, model, texts, concurrency=1,
                          requests=LATENCY_REQUESTS)
    loaded = measure_cell(client.target, model, texts, concurrency=THROUGHPUT_CALLERS,
                          requests=THROUGHPUT_REQUESTS)
    return {"p50_ms": single["latency_ms"]["p50"], "p99_ms": single["latency_ms"]["p99"],
            "texts_per_s": loaded["texts_per_s"],
            "mean_batch": loaded["server"]["batch_size_mean"] or float("nan")}


def handle_demo(args: argparse.Namespace) -> int:
    from service.client import Client, ClientError

    ensure_models(args.repository)
    process, address = start_server(args.repository, args.port, args.metrics_port,
                                    args.server_log_level)
    try:
        with Client(address, timeout=30) as client:
            models = {m.name: m for m in client.list_models()}
            print(f"\nserver {address}: " + ", ".join(
                f"{m.name} v{m.version} ({m.architecture}, {m.precision} on {m.device})"
                for m in models.values()))
            names = [name for name in DEFAULT_MODELS if name in models]
            print("\n" + "text".ljust(60) + "".join(n.ljust(24) for n in names))
            answers = {name: client.classify(EXAMPLES, model=name).results for name in names}
            for index, text in enumerate(EXAMPLES):
                cells = "".join(f"{answers[n][index].label} {answers[n][index].score:.2f}"
                                .ljust(24) for n in names)
                print((text[:57] + "...").ljust(60) + cells)

            print("\narchitecture   accuracy fp32/fp16   fp16 agreement   p50 ms   p99 ms"
                  "   texts/s (32 callers)   mean batch")
            for name in names:
                model = models[name]
                evaluation = model.evaluation
                figures = measure(client, name, EXAMPLES * 8)
                print(f"{model.architecture:<14} "
                      f"{evaluation.get('fp32_accuracy', float('nan')):.4f}/"
                      f"{evaluation.get('fp16_accuracy', float('nan')):.4f}      "
                      f"{evaluation.get('fp16_agreement', float('nan')):.4f}          "
                      f"{figures['p50_ms']:6.2f}   {figures['p99_ms']:6.2f}   "
                      f"{figures['texts_per_s']:10.0f}             {figures['mean_batch']:.1f}")
    except ClientError as error:
        process.kill()
        raise CommandError(str(error), ExitCode.SERVER_ERROR) from None
    if args.keep_serving:
        metrics = (f"metrics on port {args.metrics_port}" if args.metrics_port
                   else "metrics off: --metrics-port to enable")
        print(f"\nserving on {address} ({metrics}); Ctrl-C stops it")
        try:
            return process.wait()
        except KeyboardInterrupt:
            pass
    process.send_signal(signal.SIGTERM)
    code = process.wait(timeout=60)
    print(f"\nserver drained and stopped (exit code {code})")
    return ExitCode.OK if code == 0 else ExitCode.FAILURE


def add_demo_command(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo", help="build the default models if missing, serve, classify, compare",
        description=__doc__)
    demo.add_argument("--repository", type=Path, default=Path("model_repository"),
                      help="default: ./model_repository")
    demo.add_argument("--port", type=int, default=int(os.environ.get("SEQSERVE_PORT", 0)),
                      help="gRPC port (default: a free one)")
    demo.add_argument("--metrics-port", type=int, default=0,
                      help="Prometheus port (default: 0, disabled; 9400 is the server default)")
    demo.add_argument("--keep-serving", action="store_true",
                      help="leave the server running after the comparison")
    demo.add_argument("--server-log-level", default="WARNING",
                      choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                      help="the server's log level (default: WARNING, to keep the output short)")
    demo.set_defaults(handler=handle_demo)
