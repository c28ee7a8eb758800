"""Runs a benchmark: per spinning mode, start (or reach) the server, run every cell, stop it,
then time the in-process baseline while no server competes for the CPU."""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service import defaults
from service.bench.child_server import ChildServer, parse_serve_args, proc_cpu_seconds
from service.bench.errors import BenchError
from service.bench.inprocess import formed_batch, load_model, loaded_cell, measure, overhead_rows
from service.bench.load import CellPlan, closed_loop, open_loop, summarize
from service.bench.protocols import OipClient, open_client
from service.bench.texts import TextBuilder, TextSet, load_pool
from service.client import Client, ClientError, ModelDescription
from service.repo.layout import model_names

SCHEMA_VERSION = 1
Warn = Callable[[str], None]


@dataclass
class BenchConfig:
    repository: Path | None
    server: str | None
    models: list[str]
    concurrency: list[int]
    rates: list[float]
    lengths: list[int]
    texts_per_request: list[int]
    requests: int
    duration_s: float
    warmup: int | None
    deadline_s: float
    texts: str
    spinning: list[bool | None]  # None: leave the server's setting alone
    # Server --precision per start; the first is the primary run (cells, in-process, the
    # report's speed sections), the others add points to the accuracy-cost frontier.
    precisions: list[str] = field(default_factory=lambda: ["auto"])
    serve_args: list[str] = field(default_factory=list)
    in_process: bool = False
    inprocess_runs: int = 200
    overhead_concurrency: int = 32
    seed: int = defaults.SEED
    progress: bool = False
    server_log_level: str = "WARNING"
    protocol: str = "native"  # the load's protocol: seqserve.v1, or the Open Inference Protocol
    server_pid: int | None = None  # with --server: the process whose CPU time is read
    v2_input: str = "TEXT"  # the OIP input name of the texts


def cell_plans(config: BenchConfig, models: list[str]) -> list[CellPlan]:
    """Cells with the model innermost: the cells compared with each other (same length and
    load, different architecture) run back to back, under the same outside load."""
    plans = []
    for length in config.lengths:
        for per_request in config.texts_per_request:
            for callers in config.concurrency:
                plans += [CellPlan(model, length, per_request, callers, None, config.requests,
                                   config.duration_s, _warmup(config, callers))
                          for model in models]
            for rate in config.rates:
                plans += [CellPlan(model, length, per_request, None, rate, config.requests,
                                   config.duration_s, _warmup(config, 1)) for model in models]
    return plans


def _warmup(config: BenchConfig, callers: int) -> int:
    # Enough for every caller's connection stream and the server's first batches of this shape.
    return config.warmup if config.warmup is not None else max(8, 2 * callers)


def _spin_flags(spinning: bool | None) -> list[str]:
    return [] if spinning is None else ["--allow-spinning" if spinning else "--no-allow-spinning"]


class Progress:
    """A tqdm bar over measured requests on stderr, or nothing."""

    def __init__(self, enabled: bool) -> None:
        self._bar: Any = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=0, unit="req", file=sys.stderr, dynamic_ncols=True)

    def add_total(self, count: int) -> None:
        # Each server start adds its cells' requests (the model list is known only then).
        if self._bar is not None:
            self._bar.total += count
            self._bar.refresh()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.set_description(text, refresh=False)

    def advance(self, count: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(count)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


async def run_cells(target: str, plans: list[CellPlan], texts: dict[tuple[str, int], TextSet],
                    cpu_seconds: Callable[[], float | None], config: BenchConfig,
                    progress: Progress) -> list[dict[str, Any]]:
    records = []
    client = open_client(config.protocol, target, timeout=config.deadline_s,  # type: ignore[arg-type]
                         v2_input=config.v2_input)
    try:
        for number, plan in enumerate(plans):
            pool = texts[(plan.model, plan.length)].texts
            per = plan.texts_per_request

            async def send(index: int, model: str = plan.model, pool: list[str] = pool,
                           per: int = per) -> Any:
                chosen = [pool[(index * per + j) % len(pool)] for j in range(per)]
                return await client.classify(chosen, model=model)

            where = f"c={plan.concurrency}" if plan.mode == "closed" else f"r={plan.rate:g}"
            progress.describe(f"{plan.model} len={plan.length} {where} x{per}")
            # Warm-up: excluded from every figure, including the CPU readings below.
            await closed_loop(send, concurrency=plan.concurrency or 1, requests=plan.warmup,
                              duration_s=plan.duration_s)
            load_before = os.getloadavg()
            server_cpu, client_cpu = cpu_seconds(), time.process_time()
            if plan.concurrency is not None:
                run = await closed_loop(send, concurrency=plan.concurrency,
                                        requests=plan.requests, duration_s=plan.duration_s,
                                        on_done=progress.advance)
            else:
                assert plan.rate is not None
                run = await open_loop(send, rate=plan.rate, requests=plan.requests,
                                      duration_s=plan.duration_s, seed=config.seed + number,
                                      on_done=progress.advance)
            server_after, client_after = cpu_seconds(), time.process_time()
            progress.advance(plan.requests - len(run.outcomes))
            used = (server_after - server_cpu if server_cpu is not None
                    and server_after is not None else None)
            record = summarize(plan, run, server_cpu_s=used,
                               client_cpu_s=client_after - client_cpu)
            record["loadavg_before"] = list(load_before)
            record["loadavg_after"] = list(os.getloadavg())
            record["protocol"] = config.protocol
            records.append(record)
    finally:
        await client.close()
    return records


def measure_cell(target: str, model: str, texts: list[str], *, concurrency: int,
                 requests: int, duration_s: float = 60.0, deadline_s: float = 30.0
                 ) -> dict[str, Any]:
    """One closed-loop cell against a running server (one text per request), for callers such
    as ``seqserve demo`` that want a quick, warmed-up measurement without a sweep."""
    plan = CellPlan(model, 0, 1, concurrency, None, requests, duration_s,
                    max(8, 2 * concurrency))
    config = BenchConfig(None, target, [model], [concurrency], [], [0], [1], requests,
                         duration_s, None, deadline_s, "synthetic", [None])
    cells = asyncio.run(run_cells(target, [plan], {(model, 0): TextSet(0, texts, [])},
                                  lambda: None, config, Progress(False)))
    return cells[0]


def _describe_models(target: str, wanted: list[str], deadline_s: float, *,
                     native: bool = True) -> list[ModelDescription]:
    """What ``target`` serves: from seqserve's ListModels, or (``native`` False: any Open
    Inference Protocol server) from ModelMetadata of the named models."""
    if not native:
        if not wanted:
            raise BenchError("--models is required with --protocol v2 against --server (the "
                             "Open Inference Protocol has no model listing)", "usage")
        try:
            return asyncio.run(_describe_v2(target, wanted, deadline_s))
        except ClientError as error:
            raise BenchError(f"{target}: {error}", "server") from None
    try:
        with Client(target, timeout=deadline_s) as client:
            served = {m.name: m for m in client.list_models()}
    except ClientError as error:
        raise BenchError(f"{target}: {error}", "server") from None
    missing = [name for name in wanted if name not in served]
    if missing:
        raise BenchError(f"--models: {', '.join(missing)} not served by {target} (serves: "
                           f"{', '.join(served) or 'nothing'})", "usage")
    return [served[name] for name in (wanted or sorted(served))]


async def _describe_v2(target: str, names: list[str], deadline_s: float
                       ) -> list[ModelDescription]:
    client = OipClient(target, timeout=deadline_s)
    try:
        return await client.describe(names)
    finally:
        await client.close()


def check_models(config: BenchConfig) -> None:
    """Fail before any server starts when a named model is not in the repository."""
    if config.repository is None:
        return
    have = model_names(config.repository)
    if not have:
        raise BenchError(f"--repository {config.repository}: no models there",
                           "data")
    missing = [name for name in config.models if name not in have]
    if missing:
        raise BenchError(f"--models: {', '.join(missing)} not in {config.repository} "
                           f"(has: {', '.join(have)})", "usage")


def _version_dir(config: BenchConfig, model: ModelDescription) -> Path | None:
    if config.repository is None:
        return None
    directory = config.repository / model.name / str(model.version)
    return directory if directory.is_dir() else None


def run_bench(config: BenchConfig, warn: Warn) -> dict[str, Any]:
    check_models(config)
    # The in-process baseline loads what the primary server serves: its precision too.
    primary = ([] if "--precision" in config.serve_args or config.server is not None
               else ["--precision", config.precisions[0]])
    settings_by_mode = {mode: parse_serve_args(["--device", "cpu", *config.serve_args,
                                                *_spin_flags(mode), *primary])
                        for mode in config.spinning}
    pool, source = load_pool(config.texts, warn)
    builder = TextBuilder(pool, seed=config.seed)
    document = _new_document(config, source)
    if config.server is not None:
        warn("CPU seconds of a server not started by bench are unknown; thread and spinning "
             "settings for the in-process baseline come from --serve-args")
    progress = Progress(config.progress)
    for mode, settings in settings_by_mode.items():
        for index, precision in enumerate(config.precisions):
            primary = index == 0
            if not primary and config.server is not None:
                warn("--precisions: a server bench did not start serves one precision; "
                     "only the first is measured")
                break
            _run_mode(config, mode, settings, builder, document, progress, warn,
                      precision=precision, primary=primary)
    progress.close()
    document["overhead"] = overhead_rows(document["cells"], document["inprocess"],
                                         config.overhead_concurrency)
    document["machine"]["loadavg_end"] = list(os.getloadavg())
    return document


def _new_document(config: BenchConfig, source: str) -> dict[str, Any]:
    return {
        "schema_version": SCHEMA_VERSION,
        "created_at": datetime.now(UTC).isoformat(),
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "onnxruntime": _ort_version(),
                    # /proc CPU times count in clock ticks: short cells read coarsely.
                    "cpu_tick_s": 1.0 / os.sysconf("SC_CLK_TCK"),
                    "loadavg_start": list(os.getloadavg())},
        "config": _config_json(config),
        "text_source": source, "warnings": [], "models": [], "runs": [], "cells": [],
        "inprocess": [], "overhead": [], "precision_cells": [], "fp32_reference": [],
    }


def _run_mode(config: BenchConfig, mode: bool | None, settings: Any, builder: TextBuilder,
              document: dict[str, Any], progress: Progress, warn: Warn, *,
              precision: str = "auto", primary: bool = True) -> None:
    """One server start (or the given server) with one spinning mode and precision: every
    cell, then (primary run) the in-process baseline while no server competes for the CPU."""
    serve_args = ["--device", "cpu", *config.serve_args, *_spin_flags(mode)]
    if config.server is None and "--precision" not in config.serve_args:
        serve_args += ["--precision", precision]
        if not primary:
            # A forced precision refuses models without that artifact (the LSTM has no
            # int8): serve the others rather than exit.
            serve_args += ["--no-strict-startup"]
    child = (ChildServer(config.repository, serve_args, log_level=config.server_log_level)
             if config.server is None and config.repository is not None else None)
    target = child.start() if child is not None else config.server
    assert target is not None
    try:
        # A server bench started is seqserve: its own API describes the models fully.
        native = child is not None or config.protocol == "native"
        models = _describe_models(target, config.models if primary else [], config.deadline_s,
                                  native=native)
        if not primary:
            wanted = config.models or [m["name"] for m in document["models"]]
            models = [m for m in models if m.name in wanted]
            if missing := sorted(set(wanted) - {m.name for m in models}):
                warn(f"--precision {precision}: not served for {', '.join(missing)} (no "
                     "such artifact)")
        texts = _texts(config, models, builder, warn)
        plans = cell_plans(config, [m.name for m in models])
        progress.add_total(sum(p.requests for p in plans))
        cpu = (child.cpu_seconds if child is not None
               else (lambda: proc_cpu_seconds(config.server_pid)) if config.server_pid
               else (lambda: None))
        cells = asyncio.run(run_cells(target, plans, texts, cpu, config, progress))
    finally:
        stopped = child.stop() if child is not None else None
    by_name = {m.name: m for m in models}
    for cell in cells:
        served = by_name[cell["model"]]
        cell.update(spinning=settings.allow_spinning, version=served.version,
                    architecture=served.architecture, precision=served.precision,
                    device=served.device, precision_mode=precision,
                    intra_op_threads=served.intra_op_threads)
    document["cells" if primary else "precision_cells"] += cells
    document["runs"].append({
        "precision": precision, "primary": primary,
        "served": {m.name: {"precision": m.precision, "why": m.precision_reason,
                            "intra_op_threads": m.intra_op_threads,
                            "threads_why": m.intra_op_threads_reason} for m in models},
        "spinning": settings.allow_spinning, "self_started": child is not None,
        "target": target, "server_exit_code": stopped,
        "intra_op_threads": settings.intra_op_threads,
        "inter_op_threads": settings.inter_op_threads,
        "max_batch_texts": settings.max_batch_texts,
        "max_batch_delay_ms": settings.max_batch_delay_ms,
        "serve_args": serve_args,
    })
    if not document["models"]:
        document["models"] = [_model_json(m) for m in models]
    if config.in_process and primary:
        progress.describe("in-process baseline")
        document["inprocess"] += _inprocess(config, models, texts, cells, settings)
        progress.describe("in-process fp32 reference")
        document["fp32_reference"] += _fp32_reference(config, models, texts, cells, settings)


def _texts(config: BenchConfig, models: list[ModelDescription], builder: TextBuilder,
           warn: Warn) -> dict[tuple[str, int], TextSet]:
    texts = {}
    for model in models:
        directory = _version_dir(config, model)
        tokenizer = directory / "tokenizer.json" if directory is not None else None
        if tokenizer is None or not tokenizer.is_file():
            warn(f"{model.name}: no tokenizer file here; texts are sized in words, not tokens")
            tokenizer = None
        for length in config.lengths:
            texts[(model.name, length)] = builder.build(tokenizer, length)
            if length > model.max_length > 0:
                warn(f"{model.name}: length {length} is over its max_length "
                     f"{model.max_length}; the server truncates those texts")
    return texts


def _inprocess(config: BenchConfig, models: list[ModelDescription],
               texts: dict[tuple[str, int], TextSet], cells: list[dict[str, Any]],
               settings: Any) -> list[dict[str, Any]]:
    rows = []
    for model in models:
        directory = _version_dir(config, model)
        if directory is None:
            raise BenchError(f"--in-process: {model.name}/{model.version} is not in "
                               f"--repository {config.repository}", "data")
        loaded = load_model(directory, model.name, model.version, settings)
        for length in config.lengths:
            sizes = {1}
            busy = loaded_cell(cells, settings.allow_spinning, model.name, length,
                               config.overhead_concurrency)
            if busy is not None:
                sizes.add(formed_batch(busy))
            for size in sorted(sizes):
                row = measure(loaded, texts[(model.name, length)].texts, size,
                              runs=config.inprocess_runs, budget_s=config.duration_s)
                rows.append({"spinning": settings.allow_spinning, "length": length, **row})
    return rows


def _fp32_reference(config: BenchConfig, models: list[ModelDescription],
                    texts: dict[tuple[str, int], TextSet], cells: list[dict[str, Any]],
                    settings: Any) -> list[dict[str, Any]]:
    """What a user's own loop gets from the fp32 artifact in ONNX Runtime at each thread
    count from 1 to every core, at the batch the server formed with many callers: the
    yardstick the served default is held to (its best thread count)."""
    rows = []
    cores = max(1, len(os.sched_getaffinity(0)))
    for model in models:
        directory = _version_dir(config, model)
        busy_cells = {length: loaded_cell(cells, settings.allow_spinning, model.name, length,
                                          config.overhead_concurrency)
                      for length in config.lengths}
        if directory is None or not any(busy_cells.values()):
            continue
        for threads in range(1, cores + 1):
            fp32 = settings.model_copy(update={"precision": "fp32", "intra_op_threads": threads})
            loaded = load_model(directory, model.name, model.version, fp32)
            for length, busy in busy_cells.items():
                if busy is None:
                    continue
                row = measure(loaded, texts[(model.name, length)].texts, formed_batch(busy),
                              runs=config.inprocess_runs, budget_s=config.duration_s)
                rows.append({"length": length, "threads": threads,
                             "served_texts_per_s": busy["texts_per_s"], **row})
    return rows


def _model_json(model: ModelDescription) -> dict[str, Any]:
    keys = ("name", "version", "architecture", "precision", "device", "max_length", "labels",
            "evaluation", "precision_reason", "intra_op_threads", "intra_op_threads_reason",
            "fused_ops", "source", "distillation")
    return {key: getattr(model, key) for key in keys}


def _ort_version() -> str:
    import onnxruntime

    return str(onnxruntime.__version__)


def _config_json(config: BenchConfig) -> dict[str, Any]:
    data = asdict(config)
    for key in ("repository",):
        data[key] = str(data[key]) if data[key] is not None else None
    return data
