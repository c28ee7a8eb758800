"""The architecture comparison as one Markdown file, from a bench run and the models'
manifests, with PNG charts beside it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.report.claims import contender

REPORT_FILE = "report.md"
BENCH_SCHEMA_VERSION = 1


class ReportError(Exception):
    """The bench document cannot be reported on; the message is one line."""


def load_bench(path: Path) -> dict[str, Any]:
    """The ``bench.json`` in ``path`` (a ``seqserve bench --out`` directory, or the file)."""
    from service.bench.output import load_document

    try:
        document = load_document(path)
    except FileNotFoundError:
        raise ReportError(f"--bench {path}: no bench.json there (run `seqserve bench --out DIR` "
                          "first)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ReportError(f"--bench {path}: {error}") from None
    if not isinstance(document, dict) or document.get("schema_version") != BENCH_SCHEMA_VERSION:
        raise ReportError(f"--bench {path}: not a seqserve bench.json (schema "
                          f"{BENCH_SCHEMA_VERSION})")
    return document


QUALITY_KEYS = ("dataset", "split", "examples", "fp32_accuracy", "fp32_macro_f1",
                "fp16_accuracy", "fp16_macro_f1", "fp16_agreement", "int8_accuracy",
                "int8_macro_f1", "int8_agreement")


def model_quality(document: dict[str, Any], repository: Path | None) -> list[dict[str, Any]]:
    """Accuracy, macro-F1 and lower-precision agreement per benchmarked model, from its
    manifest when the repository is given (else from what the server reported)."""
    from service.repo.layout import ModelVersion

    rows = []
    for model in document.get("models", []):
        row: dict[str, Any] = {"name": model["name"], "version": model["version"],
                               "architecture": model["architecture"], "source": "bench"}
        evaluation = model.get("evaluation") or {}
        row.update({key: evaluation.get(key) for key in QUALITY_KEYS})
        taught = model.get("distillation") or {}
        row.update(teacher=taught.get("teacher_name"),
                   teacher_test_accuracy=taught.get("teacher_test_accuracy"))
        if repository is not None:
            directory = repository / model["name"] / str(model["version"])
            manifest = ModelVersion(model["name"], model["version"], directory).load_manifest()
            row.update(source="manifest", **_manifest_quality(manifest))
        rows.append(row)
    return rows


def _manifest_quality(manifest: Any) -> dict[str, Any]:
    row: dict[str, Any] = dict.fromkeys(QUALITY_KEYS)
    ev = manifest.evaluation
    if ev is not None:
        row.update(dataset=ev.dataset, split=ev.split, examples=ev.examples,
                   fp32_accuracy=ev.fp32.accuracy, fp32_macro_f1=ev.fp32.macro_f1,
                   fp16_max_abs_diff=ev.fp16_max_abs_diff, int8_max_abs_diff=ev.int8_max_abs_diff)
        for precision in ("fp16", "int8"):
            figures = getattr(ev, precision)
            row[f"{precision}_accuracy"] = figures.accuracy if figures else None
            row[f"{precision}_macro_f1"] = figures.macro_f1 if figures else None
            row[f"{precision}_agreement"] = getattr(ev, f"{precision}_agreement")
    taught = manifest.distillation
    row.update(teacher=taught.teacher.name if taught else None,
               teacher_test_accuracy=taught.teacher.test_accuracy if taught else None,
               transfer_texts=taught.transfer_set.texts if taught else None)
    training = manifest.training
    row.update(epochs=training.epochs if training else None,
               training_seconds=training.duration_seconds if training else None,
               model_bytes={a.precision: a.bytes for a in manifest.artifacts})
    return row


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows), ""]


def _quality_section(quality: list[dict[str, Any]]) -> list[str]:
    from service.bench.output import fmt

    def size_mb(q: dict[str, Any]) -> str:
        sizes = q.get("model_bytes")
        return fmt(sizes["fp32"] / 1e6, 1) if isinstance(sizes, dict) and "fp32" in sizes else "-"

    rows = [[contender(q), f"{q['name']} v{q['version']}", fmt(q.get("fp32_accuracy"), 4),
             fmt(q.get("fp16_accuracy"), 4), fmt(q.get("int8_accuracy"), 4),
             fmt(q.get("fp32_macro_f1"), 4), fmt(q.get("fp16_agreement"), 4),
             fmt(q.get("int8_agreement"), 4), fmt(q.get("examples")),
             fmt(q.get("training_seconds"), 0), size_mb(q)] for q in quality]
    source = "manifests" if all(q["source"] == "manifest" for q in quality) else (
        "the evaluation the server reported during the bench")
    return ["## Model quality", "", f"Test-set figures from {source}.", "",
            *_md_table(["architecture", "model", "accuracy fp32", "accuracy fp16",
                        "accuracy int8", "macro-F1 fp32", "fp16 agreement", "int8 agreement",
                        "test texts", "training s", "fp32 MB"], rows),
            "![accuracy](accuracy.png)", ""]


def _latency_section(cells: list[dict[str, Any]], modes: list[Any]) -> list[str]:
    from service.bench.output import fmt, spin_label
    from service.report.claims import busiest, one_text_cells

    lines = ["## Latency", "", "Client-side latency in ms (p50 / p99), one text per request, "
             "closed loop, after warm-up.", ""]
    for mode in modes:
        subset = one_text_cells(cells, mode)
        models = sorted({c["model"] for c in subset})
        callers = sorted({1, busiest(subset) or 1} & {c["concurrency"] for c in subset})
        headers = ["length", "tokens served"] + [
            f"{_arch(subset, m)} c={n}" for n in callers for m in models]
        rows = []
        for length in sorted({c["length"] for c in subset}):
            here = [c for c in subset if c["length"] == length]
            row = [str(length), fmt(min(c["tokens_mean"] or 0 for c in here), 0)]
            for n in callers:
                for m in models:
                    cell = next((c for c in here if c["model"] == m and c["concurrency"] == n),
                                None)
                    row.append(f"{fmt(cell['latency_ms']['p50'])} / "
                               f"{fmt(cell['latency_ms']['p99'])}" if cell else "-")
            rows.append(row)
        lines += [f"### ORT spinning {spin_label(mode)}", "", *_md_table(headers, rows)]
    return [*lines, "![latency vs length](latency_vs_length.png)", ""]


def _throughput_section(cells: list[dict[str, Any]], modes: list[Any]) -> list[str]:
    from service.bench.output import fmt, spin_label
    from service.report.claims import one_text_cells

    lines = ["## Throughput", "", "Texts per second (and texts per server CPU-second), one "
             "text per request.", ""]
    for mode in modes:
        subset = one_text_cells(cells, mode)
        models = sorted({c["model"] for c in subset})
        callers = sorted({c["concurrency"] for c in subset})
        headers = ["length"] + [f"{_arch(subset, m)} c={n}" for n in callers for m in models]
        rows = []
        for length in sorted({c["length"] for c in subset}):
            row = [str(length)]
            for n in callers:
                for m in models:
                    cell = next((c for c in subset if c["model"] == m and c["length"] == length
                                 and c["concurrency"] == n), None)
                    row.append(f"{fmt(cell['texts_per_s'], 0)} "
                               f"({fmt(cell['texts_per_server_cpu_s'], 0)}/cpu-s)"
                               if cell else "-")
            rows.append(row)
        lines += [f"### ORT spinning {spin_label(mode)}", "", *_md_table(headers, rows)]
    return [*lines, "![throughput vs length](throughput_vs_length.png)", "",
            "![throughput vs concurrency](throughput_vs_concurrency.png)", ""]


def _phases_section(cells: list[dict[str, Any]]) -> list[str]:
    from service.bench.output import fmt, spin_label

    rows = [[spin_label(c["spinning"]), c["architecture"], str(c["length"]),
             f"c={c['concurrency']}" if c["mode"] == "closed" else f"r={c['rate']:g}/s",
             fmt(c["latency_ms"]["p50"]), fmt(c["server"]["total_ms_p50"]),
             fmt(c["server"]["queue_ms_p50"]), fmt(c["server"]["tokenize_ms_p50"], 3),
             fmt(c["server"]["inference_ms_p50"]), fmt(c["server"]["batch_size_per_batch"], 1),
             ",".join(f"{k}:{v}" for k, v in c["errors"].items()) or "-"]
            for c in cells]
    return ["## Where the time goes (server timings, medians in ms)", "",
            *_md_table(["spin", "architecture", "length", "load", "client p50", "server total",
                        "queue", "tokenize", "inference", "mean batch", "errors"], rows)]


def _overhead_section(document: dict[str, Any]) -> list[str]:
    from service.bench.output import fmt, spin_label

    rows = [[spin_label(r["spinning"]), r["architecture"] or r["model"], str(r["length"]),
             fmt(r.get("server_texts_per_s"), 0), fmt(r.get("inprocess_texts_per_s"), 0),
             fmt(r.get("server_texts_per_cpu_s"), 0), fmt(r.get("inprocess_texts_per_cpu_s"), 0),
             fmt(r.get("server_batch_size")), fmt(r.get("cpu_ratio")),
             fmt(r.get("single_p50_ms")), fmt(r.get("inprocess_batch1_p50_ms"), 3),
             fmt(r.get("latency_overhead_ms")), fmt(r.get("single_queue_p50_ms"))]
            for r in document["overhead"]]
    if not document["inprocess"]:
        return ["## Serving overhead", "", "Not measured (run bench with --in-process).", ""]
    return ["## Serving overhead", "",
            "(a) texts per server CPU-second with the most callers ÷ texts per CPU-second of "
            "ONNX Runtime in-process (same files, settings, tokenizer, texts) at the batch size "
            "the server formed — goal ≥ 0.8. (b) one caller's p50 − in-process batch-1 p50 "
            "(tokenize + run) — goal ≤ 1 ms; 'queue' is the part spent waiting in the batcher.",
            "", *_md_table(["spin", "architecture", "length", "server texts/s",
                            "in-process texts/s", "server texts/cpu-s", "in-process texts/cpu-s",
                            "batch", "(a)", "one-caller p50", "in-process b=1", "(b) ms",
                            "queue ms"], rows), "![serving overhead](overhead.png)", ""]


def best_fp32_reference(document: dict[str, Any]) -> list[dict[str, Any]]:
    """Per (model, length): served texts/s at the most callers against in-process fp32 at its
    best thread count, at the batch the server formed."""
    best: dict[tuple[str, int], dict[str, Any]] = {}
    for row in document.get("fp32_reference", []):
        key = (row["model"], row["length"])
        if key not in best or row["texts_per_s"] > best[key]["texts_per_s"]:
            best[key] = row
    return [{"model": model, "length": length, "threads": row["threads"],
             "batch_size": row["batch_size"], "fp32_texts_per_s": row["texts_per_s"],
             "served_texts_per_s": row["served_texts_per_s"],
             "ratio": row["served_texts_per_s"] / row["texts_per_s"]}
            for (model, length), row in sorted(best.items())]


def reference_claims(document: dict[str, Any]) -> list[str]:
    return [f"{r['model']} at {r['length']} tokens, served with the defaults: "
            f"{r['ratio']:.2f}x the texts/s of in-process ONNX Runtime fp32 at its best thread "
            f"count ({r['threads']}) on the same batches."
            for r in best_fp32_reference(document)]


def _reference_section(document: dict[str, Any]) -> list[str]:
    from service.bench.output import fmt

    rows = [[r["model"], str(r["length"]), str(r["batch_size"]), str(r["threads"]),
             fmt(r["fp32_texts_per_s"], 1), fmt(r["served_texts_per_s"], 1),
             fmt(r["ratio"], 2)] for r in best_fp32_reference(document)]
    if not rows:
        return []
    return ["## Served defaults vs in-process fp32 at its best thread count", "",
            "The server with no precision or thread flag, at the most callers, against the "
            "fp32 artifact run in this process at every thread count from 1 to all cores "
            "(the best shown), on batches of the size the server formed.", "",
            *_md_table(["model", "tokens", "batch", "best fp32 threads", "fp32 texts/s",
                        "served texts/s", "ratio"], rows)]


def _arch(cells: list[dict[str, Any]], model: str) -> str:
    return next((c["architecture"] for c in cells if c["model"] == model), model)


def write_report(document: dict[str, Any], quality: list[dict[str, Any]], out: Path, *,
                 source: Path) -> Path:
    from service.bench.output import spin_label
    from service.report import charts, frontier
    from service.report import claims as rc

    out.mkdir(parents=True, exist_ok=True)
    cells = document["cells"]
    modes = sorted({c["spinning"] for c in cells}, key=lambda s: (s is True, s is None))
    primary = rc.primary_spinning(cells)
    charts.accuracy_chart(quality, out / "accuracy.png")
    if rc.one_text_cells(cells, primary):
        charts.latency_vs_length(cells, out / "latency_vs_length.png")
        charts.throughput_vs_length(cells, out / "throughput_vs_length.png")
        charts.throughput_vs_concurrency(cells, out / "throughput_vs_concurrency.png")
    charts.overhead_chart(document["overhead"], out / "overhead.png")
    points = frontier.frontier_points(document, quality)
    lengths = frontier.frontier_lengths(document["cells"])
    frontier.frontier_chart(points, lengths, out / "frontier.png")
    machine = document.get("machine", {})
    claims = [*rc.speed_claims(cells, primary), *rc.quality_claims(quality),
              *rc.transfer_claims(quality, cells, primary),
              *frontier.distillation_claims(points, quality, lengths),
              *rc.overhead_claims(document["overhead"], document.get("runs", [])),
              *rc.spinning_claims(cells), *frontier.frontier_claims(points, lengths),
              *reference_claims(document)]
    lines = [
        "# LSTM vs Transformer vs a pretrained Transformer, served: what the numbers say", "",
        f"Generated {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from `{source}` (bench of "
        f"{document.get('created_at', '?')}); {machine.get('cpu_count')} CPUs, ONNX Runtime "
        f"{machine.get('onnxruntime')}, load average {machine.get('loadavg_start', ['?'])[0]:.2f}"
        f" at the start and {machine.get('loadavg_end', ['?'])[0]:.2f} at the end; texts from "
        f"{document.get('text_source')}.", "",
        "## What this says about the talk's claims", "",
        "The talk argues that Transformers beat LSTMs on quality, and on speed because "
        "attention processes every position at once where an LSTM steps through them one by "
        "one, which should matter more as texts get longer — and above all that a Transformer "
        "pretrained on unlabelled text and fine-tuned beats anything trained from scratch. "
        "Measured here (speed with ORT "
        f"spinning {spin_label(primary)}; ties are differences under "
        f"{rc.TIE:.0%}):", "",
        *(f"- {line}" for line in claims), "",
        "### Caveats", "", *(f"- {line}" for line in rc.caveats(document)), "",
        *frontier.frontier_section(points, lengths), *_quality_section(quality),
        *_reference_section(document), *_latency_section(cells, modes),
        *_throughput_section(cells, modes), *_overhead_section(document),
        *_phases_section(cells),
    ]
    path = out / REPORT_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
