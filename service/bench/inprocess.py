"""The in-process baseline: the same model files, tokenizer and texts, run by ONNX Runtime directly.

A server's overhead is only measurable against the work it wraps. Sessions are created by the
server's own loader (``service.server.runtime.load_version``) from the same ``ServeSettings``, so
threads, spinning, optimisation level, artifact choice and warm-up are exactly the server's.

Each measurement times the whole per-batch work a server must do too (tokenize, pad, run,
softmax), and separately ONNX Runtime alone on pre-tokenized inputs. CPU time is this process's
``time.process_time()``, which counts ORT's worker threads (and their spinning) as well.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.bench.load import percentiles_ms
from service.repo.layout import ModelVersion
from service.repo.probabilities import softmax
from service.server.runtime import LoadedVersion, SessionBuilder, load_version
from service.server.settings import ServeSettings

WARMUP_RUNS = 3
# Goals from the issue: serving keeps >= 80 % of in-process texts per CPU-second, and adds at
# most 1 ms to a lone caller's latency.
GOAL_CPU_RATIO = 0.8
GOAL_LATENCY_MS = 1.0


@dataclass(frozen=True)
class Timed:
    latency_ms: dict[str, float | None]
    runs: int
    texts_per_s: float
    texts_per_cpu_s: float | None


def load_model(directory: Path, name: str, version: int, settings: ServeSettings
               ) -> LoadedVersion:
    return load_version(ModelVersion(name, version, directory), settings,
                        SessionBuilder(settings))


def _time_interleaved(steps: dict[str, Callable[[int], None]], batch_size: int, runs: int,
                      budget_s: float) -> dict[str, Timed]:
    """Time several ways of doing the same work, alternating them step by step.

    On a shared machine the load from others changes within seconds; alternating makes each
    way see the same conditions, so their ratio stays meaningful. CPU time is read around each
    step (``process_time`` has nanosecond resolution), so it is billed per way too.
    """
    for index in range(WARMUP_RUNS):
        for step in steps.values():
            step(index)
    latencies: dict[str, list[float]] = {name: [] for name in steps}
    cpu = dict.fromkeys(steps, 0.0)
    started = time.perf_counter()
    for index in range(runs):
        if index and time.perf_counter() - started > budget_s:
            break
        for name, step in steps.items():
            cpu_before, begun = time.process_time(), time.perf_counter()
            step(index)
            latencies[name].append(time.perf_counter() - begun)
            cpu[name] += time.process_time() - cpu_before
    timed = {}
    for name, values in latencies.items():
        texts = batch_size * len(values)
        timed[name] = Timed(percentiles_ms(values), len(values), texts / sum(values),
                            texts / cpu[name] if cpu[name] > 0 else None)
    return timed


def measure(loaded: LoadedVersion, texts: list[str], batch_size: int, *, runs: int,
            budget_s: float) -> dict[str, Any]:
    """Latency and throughput of batches of ``batch_size`` texts, cycling through ``texts``."""
    batches = [[texts[(i * batch_size + j) % len(texts)] for j in range(batch_size)]
               for i in range(min(runs, len(texts)))]
    tokenizer, session = loaded.tokenizer, loaded.session

    def full(index: int) -> None:
        encoded = tokenizer.encode_batch(batches[index % len(batches)])
        softmax(session.run(encoded.input_ids, encoded.attention_mask))

    encoded = [tokenizer.encode_batch(batch) for batch in batches]

    def ort_only(index: int) -> None:
        batch = encoded[index % len(encoded)]
        session.run(batch.input_ids, batch.attention_mask)

    timed = _time_interleaved({"full": full, "ort": ort_only}, batch_size, runs, budget_s)
    whole, ort = timed["full"], timed["ort"]
    return {
        "model": loaded.model.name,
        "architecture": loaded.manifest.architecture,
        "precision": loaded.session.precision,
        "device": loaded.session.device,
        "batch_size": batch_size,
        "tokens_mean": float(np.mean([b.lengths.mean() for b in encoded])),
        "runs": whole.runs,
        "latency_ms": whole.latency_ms,
        "texts_per_s": whole.texts_per_s,
        "texts_per_cpu_s": whole.texts_per_cpu_s,
        "ort_latency_ms": ort.latency_ms,
        "ort_texts_per_s": ort.texts_per_s,
        "ort_texts_per_cpu_s": ort.texts_per_cpu_s,
    }


def formed_batch(cell: dict[str, Any]) -> int:
    """The batch size the server formed in a cell: its mean executed batch, rounded."""
    size = cell["server"].get("batch_size_per_batch") or 1.0
    return max(1, round(size))


def _find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def loaded_cell(cells: list[dict[str, Any]], spinning: Any, model: str, length: int,
                concurrency: int) -> dict[str, Any] | None:
    """The closed-loop, one-text cell with ``concurrency`` callers, else the most callers."""
    candidates = [c for c in cells if c["spinning"] == spinning and c["model"] == model
                  and c["length"] == length and c["mode"] == "closed"
                  and c["texts_per_request"] == 1 and (c["concurrency"] or 0) > 1]
    exact = [c for c in candidates if c["concurrency"] == concurrency]
    if exact:
        return exact[0]
    return max(candidates, key=lambda c: c["concurrency"], default=None)


def overhead_rows(cells: list[dict[str, Any]], inprocess: list[dict[str, Any]],
                  concurrency: int) -> list[dict[str, Any]]:
    """The issue's two serving-overhead figures per (spinning, model, length).

    (a) texts per server CPU-second with many callers / texts per CPU-second in-process at the
        batch size the server formed; (b) one caller's p50 minus in-process batch-1 p50.
    """
    rows = []
    keys = sorted({(c["spinning"] is True, c["spinning"], c["model"], c["length"])
                   for c in cells}, key=lambda k: (k[0], k[2], k[3]))
    for _, spinning, model, length in keys:
        loaded = loaded_cell(cells, spinning, model, length, concurrency)
        single = _find(cells, spinning=spinning, model=model, length=length, mode="closed",
                       texts_per_request=1, concurrency=1)
        row: dict[str, Any] = {"spinning": spinning, "model": model, "length": length,
                               "architecture": (loaded or single or {}).get("architecture")}
        if loaded is not None:
            batch = formed_batch(loaded)
            baseline = _find(inprocess, spinning=spinning, model=model, length=length,
                             batch_size=batch)
            server_rate = loaded["texts_per_server_cpu_s"]
            local_rate = baseline["texts_per_cpu_s"] if baseline else None
            row.update({
                "concurrency": loaded["concurrency"], "server_batch_size": batch,
                "server_texts_per_s": loaded["texts_per_s"],
                "server_texts_per_cpu_s": server_rate,
                "inprocess_texts_per_s": baseline["texts_per_s"] if baseline else None,
                "inprocess_texts_per_cpu_s": local_rate,
                "cpu_ratio": (server_rate / local_rate if server_rate and local_rate
                              else None),
            })
        if single is not None:
            baseline = _find(inprocess, spinning=spinning, model=model, length=length,
                             batch_size=1)
            served = single["latency_ms"]["p50"]
            local = baseline["latency_ms"]["p50"] if baseline else None
            phases = single["server"]
            row.update({"single_p50_ms": served, "inprocess_batch1_p50_ms": local,
                        "latency_overhead_ms": (served - local if served is not None
                                                and local is not None else None),
                        # Where (b) goes: waiting in the batcher for company, the server's
                        # own total, and what gRPC + the client add on top of it.
                        "single_queue_p50_ms": phases["queue_ms_p50"],
                        "single_server_total_p50_ms": phases["total_ms_p50"],
                        "single_transport_ms": (served - phases["total_ms_p50"]
                                                if served is not None
                                                and phases["total_ms_p50"] is not None
                                                else None)})
        ratio, extra = row.get("cpu_ratio"), row.get("latency_overhead_ms")
        row["cpu_ratio_goal_met"] = None if ratio is None else ratio >= GOAL_CPU_RATIO
        row["latency_goal_met"] = None if extra is None else extra <= GOAL_LATENCY_MS
        rows.append(row)
    return rows
