"""Writing a benchmark: ``bench.json`` (everything), ``bench.csv`` (one row per cell) and the
summary tables printed on stdout."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

JSON_FILE = "bench.json"
CSV_FILE = "bench.csv"
# Above this one-minute load average per core before the run, other work shared the CPU.
BUSY_LOAD_PER_CORE = 0.75


def flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts become ``outer_inner`` columns; errors become ``CODE:n;CODE:n``."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if key == "errors" and isinstance(value, dict):
            flat[name] = ";".join(f"{code}:{n}" for code, n in sorted(value.items()))
        elif isinstance(value, dict):
            flat.update(flatten(value, f"{name}_"))
        elif isinstance(value, list):
            flat[name] = " ".join(f"{v:.2f}" if isinstance(v, float) else str(v) for v in value)
        else:
            flat[name] = value
    return flat


def write_outputs(document: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / JSON_FILE
    json_path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    rows = [flatten(cell) for cell in document["cells"]]
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    csv_path = out / CSV_FILE
    with csv_path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def load_document(directory: Path) -> dict[str, Any]:
    path = directory / JSON_FILE if directory.is_dir() else directory
    return json.loads(path.read_text(encoding="utf-8"))


def busy_machine(document: dict[str, Any]) -> str | None:
    """A sentence when the load average says others shared the CPU, else None.

    Only the load before the bench started counts: once it runs, its own server, ORT threads
    and load generator keep the load average up by themselves."""
    machine = document.get("machine", {})
    cores = machine.get("cpu_count") or 1
    before = machine.get("loadavg_start", [0])[0]
    if before / cores <= BUSY_LOAD_PER_CORE:
        return None
    return (f"the 1-minute load average was {before:.1f} on {cores} cores before the bench "
            "started: other work shared the CPU, so absolute figures are pessimistic and noisier")


def fmt(value: Any, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def spin_label(spinning: Any) -> str:
    return {True: "on", False: "off"}.get(spinning, "?")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    body = ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body])


def summary(document: dict[str, Any]) -> str:
    cells = [[spin_label(c["spinning"]), c["model"], c["architecture"],
              f"c={c['concurrency']}" if c["mode"] == "closed" else f"r={c['rate']:g}/s",
              str(c["length"]), fmt(c["tokens_mean"], 0), str(c["texts_per_request"]),
              f"{c['ok']}/{c['requests']}",
              ",".join(f"{k}:{v}" for k, v in c["errors"].items()) or "-",
              fmt(c["latency_ms"]["p50"]), fmt(c["latency_ms"]["p95"]),
              fmt(c["latency_ms"]["p99"]), fmt(c["texts_per_s"], 0),
              fmt(c["server"]["batch_size_per_batch"], 1), fmt(c["server_cpu_s"]),
              fmt(c["texts_per_server_cpu_s"], 0), fmt(c["client_cpu_s"])]
             for c in document["cells"]]
    parts = [table(["spin", "model", "arch", "load", "len", "tok", "x", "ok", "errors",
                    "p50 ms", "p95 ms", "p99 ms", "texts/s", "batch", "srv cpu s",
                    "texts/cpu-s", "gen cpu s"], cells)]
    if document["inprocess"]:
        rows = [[spin_label(r["spinning"]), r["model"], str(r["length"]), str(r["batch_size"]),
                 str(r["runs"]), fmt(r["latency_ms"]["p50"], 3), fmt(r["latency_ms"]["p99"], 3),
                 fmt(r["texts_per_s"], 0), fmt(r["texts_per_cpu_s"], 0),
                 fmt(r["ort_latency_ms"]["p50"], 3), fmt(r["ort_texts_per_cpu_s"], 0)]
                for r in document["inprocess"]]
        parts += ["", "in-process ONNX Runtime (tokenize + run; and run alone):",
                  table(["spin", "model", "len", "batch", "runs", "p50 ms", "p99 ms", "texts/s",
                         "texts/cpu-s", "ort p50 ms", "ort texts/cpu-s"], rows)]
    if any(r.get("cpu_ratio") is not None or r.get("latency_overhead_ms") is not None
           for r in document["overhead"]):
        rows = [[spin_label(r["spinning"]), r["model"], str(r["length"]),
                 fmt(r.get("server_texts_per_cpu_s"), 0),
                 fmt(r.get("inprocess_texts_per_cpu_s"), 0), fmt(r.get("cpu_ratio")),
                 fmt(r.get("cpu_ratio_goal_met")), fmt(r.get("single_p50_ms"), 3),
                 fmt(r.get("inprocess_batch1_p50_ms"), 3), fmt(r.get("latency_overhead_ms"), 3),
                 fmt(r.get("latency_goal_met"))]
                for r in document["overhead"]]
        parts += ["", "serving overhead: (a) texts per server CPU-s / in-process at the server's "
                  "batch (goal >= 0.8); (b) one caller's p50 - in-process batch 1 (goal <= 1 ms)",
                  table(["spin", "model", "len", "srv texts/cpu-s", "in-proc texts/cpu-s",
                         "(a)", "ok", "p50 ms", "in-proc ms", "(b) ms", "ok"], rows)]
    busy = busy_machine(document)
    if busy:
        parts += ["", f"note: {busy}"]
    return "\n".join(parts)
