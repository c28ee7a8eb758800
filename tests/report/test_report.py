"""``seqserve report`` from a real (tiny) bench run with spinning off and on, and the wording of
the claims from hand-made numbers (so no statement depends on how fast this machine is)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from harness.cli import is_png, run_cli
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.cli.exit_codes import ExitCode
from service.report.claims import caveats, quality_claims, speed_claims, transfer_claims


@pytest.fixture(scope="module")
def bench_dir(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report-bench") / "bench"
    argv = ["bench", "--repository", str(tiny_repository), "--texts", "synthetic",
            "--lengths", "8,16", "--concurrency", "1,4", "--requests", "12", "--warmup", "2",
            "--spinning", "both", "--precisions", "fp32,int8", "--in-process",
            "--inprocess-runs", "5",
            "--overhead-concurrency", "4", "--serve-args", "--intra-op-threads 1",
            "--out", str(out), "--json"]
    assert run_cli(argv) == 0
    return out


@pytest.fixture(scope="module")
def report(bench_dir: Path, tiny_repository: Path) -> Path:
    out = bench_dir.parent / "report"
    assert run_cli(["report", "--bench", str(bench_dir), "--repository", str(tiny_repository),
                    "--out", str(out)]) == 0
    return out


def test_spinning_both_ran_two_servers(bench_dir: Path) -> None:
    document = json.loads((bench_dir / "bench.json").read_text())
    # Per spinning mode one server per precision; the first precision is the primary run.
    assert [(run["spinning"], run["precision"], run["primary"]) for run in document["runs"]] == [
        (False, "fp32", True), (False, "int8", False), (True, "fp32", True),
        (True, "int8", False)]
    assert {c["spinning"] for c in document["cells"]} == {False, True}
    assert {c["precision"] for c in document["cells"]} == {"fp32"}
    # The in-process baseline ran what the primary server served.
    assert {r["precision"] for r in document["inprocess"]} == {"fp32"}
    # The LSTM has no int8 artifact: --precision int8 serves... nothing for it, so the server
    # refuses it and the int8 run measures only the Transformer.
    assert {(c["model"], c["precision"]) for c in document["precision_cells"]} == {
        (TRANSFORMER_NAME, "int8")}
    assert {(r["spinning"], r["model"]) for r in document["overhead"]} == {
        (spin, model) for spin in (False, True) for model in (LSTM_NAME, TRANSFORMER_NAME)}


def test_report_has_both_architectures_numbers_and_valid_charts(report: Path,
                                                                bench_dir: Path) -> None:
    text = (report / "report.md").read_text()
    document = json.loads((bench_dir / "bench.json").read_text())
    for heading in ("## What this says about the talk's claims", "### Caveats",
                    "## The accuracy-cost frontier", "## Model quality", "## Latency",
                    "## Throughput", "## Serving overhead",
                    "## Served defaults vs in-process fp32 at its best thread count"):
        assert heading in text
    assert "| transformer (tiny-transformer) | int8 |" in text
    assert "| transformer (tiny-transformer) | fp32 |" in text
    assert "Pareto front runs from" in text or "one point dominates" in text
    for architecture in ("lstm", "transformer"):
        assert f"| {architecture} | " in text
    # The bench's own numbers appear (as formatted for the tables).
    cell = next(c for c in document["cells"] if c["concurrency"] == 1)
    assert f"{cell['latency_ms']['p50']:,.2f} / {cell['latency_ms']['p99']:,.2f}" in text
    assert "spinning on" in text and "spinning off" in text
    assert "inserted casts in fp32" in text  # the CPU fp16 caveat
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert {"accuracy.png", "latency_vs_length.png", "overhead.png", "frontier.png"} <= set(
        images)
    for image in images:
        assert is_png(report / image), image


def test_report_without_repository_uses_the_bench_evaluation(bench_dir: Path,
                                                            tmp_path: Path) -> None:
    assert run_cli(["report", "--bench", str(bench_dir / "bench.json"),
                    "--out", str(tmp_path)]) == 0
    assert "the evaluation the server reported" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize(("content", "message"), [
    (None, "no bench.json there"),
    ("{not json", "Expecting property name"),
    ('{"schema_version": 99}', "not a seqserve bench.json"),
])
def test_unusable_bench_is_a_data_error(tmp_path: Path, capsys, content: str | None,
                                        message: str) -> None:
    if content is not None:
        (tmp_path / "bench.json").write_text(content)
    assert run_cli(["report", "--bench", str(tmp_path), "--out",
                    str(tmp_path / "r")]) == ExitCode.DATA_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_report_bad_flags_exit_2(capsys) -> None:
    assert run_cli(["report"]) == ExitCode.USAGE  # --bench is required (argparse)
    assert run_cli(["report", "--bench", ".", "--repository", "/nonexistent"]) == ExitCode.USAGE
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(
        "seqserve: error: --repository /nonexistent: not a directory")


# --- the claims, from hand-made numbers -----------------------------------------------------

def _cell(model: str, arch: str, length: int, callers: int, p50: float, texts_per_s: float,
          **extra: Any) -> dict[str, Any]:
    return {"model": model, "architecture": arch, "length": length, "concurrency": callers,
            "mode": "closed", "texts_per_request": 1, "spinning": False, "rate": None,
            "latency_ms": {"p50": p50, "p99": 2 * p50}, "texts_per_s": texts_per_s,
            "tokens_mean": float(min(length, extra.get("max_length", length))),
            "truncated_fraction": 0.0 if length <= extra.get("max_length", length) else 1.0,
            "ok": 5000, "errors": {}, "server_cpu_s": 10.0, "client_cpu_s": 2.0,
            "device": "cpu", "server": {}}


def test_speed_claims_follow_the_numbers() -> None:
    cells = [_cell("a-lstm", "lstm", 16, 1, 1.0, 900), _cell("b-tr", "transformer", 16, 1, 2.0,
                                                               500),
             _cell("a-lstm", "lstm", 256, 1, 9.0, 100), _cell("b-tr", "transformer", 256, 1, 3.0,
                                                                300),
             _cell("a-lstm", "lstm", 16, 32, 5.0, 5000),
             _cell("b-tr", "transformer", 16, 32, 5.1, 5100),
             _cell("a-lstm", "lstm", 256, 32, 50.0, 600),
             _cell("b-tr", "transformer", 256, 32, 20.0, 1500)]
    text = "\n".join(speed_claims(cells, False))
    assert "At 16 tokens, one caller, p50 latency: lstm 1.00 ms vs transformer 2.00 ms: " \
           "**lstm** is 2.00x faster" in text
    assert "At 256 tokens, one caller, p50 latency: lstm 9.00 ms vs transformer 3.00 ms: " \
           "**transformer** is 3.00x faster" in text
    assert "The lead changes with length with one caller (lstm → transformer" in text
    assert "At 16 tokens, 32 callers, throughput" in text and "a tie (within 5%)" in text
    assert "transformer/lstm grows" not in text and "shrinks with length" in text


def test_quality_claims_say_whether_fp16_hurt() -> None:
    quality = [
        {"architecture": "lstm", "fp32_accuracy": 0.74, "fp32_macro_f1": 0.73,
         "fp16_accuracy": 0.74, "fp16_agreement": 1.0, "examples": 1000,
         "dataset": "d", "split": "test"},
        {"architecture": "transformer", "fp32_accuracy": 0.80, "fp32_macro_f1": 0.79,
         "fp16_accuracy": 0.79, "fp16_agreement": 0.99, "examples": 1000},
    ]
    text = "\n".join(quality_claims(quality))
    assert "transformer is ahead by 6.0 points — more than twice its standard error" in text
    assert "fp16 did not hurt lstm" in text
    assert "fp16 changed transformer: agreement with fp32 0.9900 (10 label(s) changed), " \
           "accuracy -1.00 points" in text


def test_caveats_flag_load_truncation_and_few_requests() -> None:
    cells = [_cell("a-lstm", "lstm", 256, 1, 1.0, 10, max_length=128)]
    cells[0]["ok"] = 200
    document = {"cells": cells, "machine": {"cpu_count": 2, "loadavg_start": [5.0, 1, 1],
                                            "loadavg_end": [1.0, 1, 1], "cpu_tick_s": 0.01},
                "text_source": "synthetic", "warnings": []}
    text = "\n".join(caveats(document))
    assert "load average was 5.0 on 2 cores before the bench started" in text
    assert "Lengths 256 exceed a model's max_length" in text
    assert "only 200 successful requests" in text and "synthetic words" in text


def test_transfer_claims_say_what_pretraining_buys_and_costs() -> None:
    quality = [
        {"architecture": "lstm", "fp32_accuracy": 0.76, "training_seconds": 44,
         "model_bytes": {"fp32": 5_200_000}},
        {"architecture": "transformer", "fp32_accuracy": 0.765, "training_seconds": 76,
         "model_bytes": {"fp32": 5_300_000}},
        {"architecture": "pretrained", "fp32_accuracy": 0.842, "training_seconds": 266,
         "model_bytes": {"fp32": 91_500_000}},
    ]
    cells = [_cell("t", "transformer", 64, 1, 2.0, 500), _cell("p", "pretrained", 64, 1, 12.0, 80),
             _cell("t", "transformer", 64, 32, 40.0, 800),
             _cell("p", "pretrained", 64, 32, 300.0, 100)]
    cells[2]["texts_per_server_cpu_s"], cells[3]["texts_per_server_cpu_s"] = 400.0, 50.0
    text = "\n".join(transfer_claims(quality, cells, False))
    assert "Transfer learning buys +7.7 points of accuracy" in text
    assert "best model trained from scratch (transformer) 0.765" in text
    assert "after 266 s of fine-tuning against 76 s of training" in text
    assert "at 64 tokens: 6.0x the one-caller p50, 8.0x fewer texts/s at 32 callers, 8.0x the " \
           "server CPU per text" in text
    assert "92 MB against 5.3 MB (17x)" in text
    assert transfer_claims(quality[:2], cells, False) == []  # no pretrained model, no claim
