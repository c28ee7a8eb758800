"""``seqserve bench`` against the tiny real repository: a self-started server (closed and open
loop, in-process baseline), a running server, the load generators alone, and bad flags.

Sizes are tiny and nothing here asserts speed: only that the figures are complete and
consistent with each other.
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from harness.cli import is_png, run_cli, write_texts_csv
from harness.server import RunningServer, server_settings
from harness.tiny_models import LSTM_NAME, MAX_LENGTH, TRANSFORMER_NAME

from service.bench.child_server import proc_cpu_seconds
from service.bench.errors import BenchError
from service.bench.load import closed_loop, open_loop
from service.bench.texts import SYNTHETIC, TextBuilder, load_pool
from service.cli.exit_codes import ExitCode
from service.client import ClassifyResult, ClientError, Timing

LENGTHS = (8, 32)  # 32 is over the tiny transformer's max_length (24): it gets truncated
CALLERS = (1, 4)
RATE = 40.0
REQUESTS = 16


@pytest.fixture(scope="module")
def bench_dir(tiny_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small bench with a self-started server, run once for the module."""
    root = tmp_path_factory.mktemp("bench")
    texts = write_texts_csv(root / "texts.csv")
    argv = ["bench", "--repository", str(tiny_repository), "--texts", str(texts),
            "--lengths", ",".join(map(str, LENGTHS)), "--concurrency",
            ",".join(map(str, CALLERS)), "--rate", str(RATE), "--requests", str(REQUESTS),
            "--duration", "20", "--warmup", "2", "--in-process", "--inprocess-runs", "5",
            "--overhead-concurrency", "4", "--serve-args", "--intra-op-threads 1",
            "--precisions", "auto", "--out", str(root / "out"), "--json"]
    assert run_cli(argv) == 0
    return root / "out"


@pytest.fixture(scope="module")
def document(bench_dir: Path) -> dict[str, Any]:
    return json.loads((bench_dir / "bench.json").read_text())


def test_every_cell_is_complete_and_consistent(document: dict[str, Any]) -> None:
    cells = document["cells"]
    assert len(cells) == 2 * len(LENGTHS) * (len(CALLERS) + 1)
    assert {c["model"] for c in cells} == {LSTM_NAME, TRANSFORMER_NAME}
    assert {c["architecture"] for c in cells} == {"lstm", "transformer"}
    for cell in cells:
        assert cell["errors"] == {} and cell["ok"] == cell["requests"]
        # Closed loops stop at the request count; open loops may end earlier by duration.
        if cell["mode"] == "closed":
            assert cell["requests"] == REQUESTS
        else:
            assert 1 <= cell["requests"] <= REQUESTS and cell["rate"] == RATE
        latency = cell["latency_ms"]
        assert 0 < latency["min"] <= latency["p50"] <= latency["p95"] <= latency["p99"] \
            <= latency["max"]
        assert cell["texts_per_s"] > 0 and cell["texts"] == cell["ok"]
        assert cell["server"]["batch_size_per_batch"] >= 1
        # Read around the measured phase only (not since the server started): bounded by the
        # cell's own wall time on every core, plus one /proc tick of rounding.
        tick, cores = document["machine"]["cpu_tick_s"], document["machine"]["cpu_count"]
        assert 0 <= cell["server_cpu_s"] <= cell["duration_s"] * cores + tick
        if cell["server_cpu_s"] > 0:
            assert cell["texts_per_server_cpu_s"] == pytest.approx(
                cell["texts"] / cell["server_cpu_s"])
        assert cell["client_cpu_s"] > 0
    # /proc counts 10 ms ticks: one small cell may read 0, the whole run cannot.
    assert sum(c["server_cpu_s"] for c in cells) > 0
    assert document["runs"][0]["self_started"] and document["runs"][0]["server_exit_code"] == 0
    assert len(document["machine"]["loadavg_start"]) == 3


def test_texts_have_the_asked_token_counts(document: dict[str, Any]) -> None:
    for cell in document["cells"]:
        served = min(cell["length"], MAX_LENGTH[cell["model"]])
        assert abs(cell["tokens_mean"] - served) <= 1
        assert (cell["truncated_fraction"] > 0) == (cell["length"] > MAX_LENGTH[cell["model"]])
    assert document["text_source"] == "texts.csv"


def test_csv_matches_json(bench_dir: Path, document: dict[str, Any]) -> None:
    with (bench_dir / "bench.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(document["cells"])
    for row, cell in zip(rows, document["cells"], strict=True):
        assert row["model"] == cell["model"] and int(row["ok"]) == cell["ok"]
        assert float(row["latency_ms_p99"]) == pytest.approx(cell["latency_ms"]["p99"])
        assert row["errors"] == ""


def test_charts_are_valid_pngs(bench_dir: Path) -> None:
    for name in ("latency_vs_length.png", "throughput_vs_concurrency.png",
                 "latency_vs_rate.png"):
        assert is_png(bench_dir / name), name


def test_in_process_baseline_and_overhead_figures(document: dict[str, Any]) -> None:
    rows = document["inprocess"]
    for model in (LSTM_NAME, TRANSFORMER_NAME):
        for length in LENGTHS:
            mine = [r for r in rows if r["model"] == model and r["length"] == length]
            assert 1 in {r["batch_size"] for r in mine}
            for row in mine:
                assert row["runs"] >= 1 and row["texts_per_s"] > 0
                assert row["latency_ms"]["p50"] <= row["latency_ms"]["p99"]
                # The baseline runs what the server served (auto: int8 where it passed).
                served = {c["precision"] for c in document["cells"] if c["model"] == model}
                assert row["device"] == "cpu" and {row["precision"]} == served
    overhead = document["overhead"]
    assert len(overhead) == 2 * len(LENGTHS)
    # The yardstick of the served defaults: fp32 in process at every thread count.
    cores = len(os.sched_getaffinity(0))
    reference = document["fp32_reference"]
    assert {(r["model"], r["threads"]) for r in reference} == {
        (model, threads) for model in (LSTM_NAME, TRANSFORMER_NAME)
        for threads in range(1, cores + 1)}
    assert all(r["precision"] == "fp32" and r["texts_per_s"] > 0 for r in reference)
    for row in overhead:
        assert row["concurrency"] == 4 and row["server_batch_size"] >= 1
        assert row["latency_overhead_ms"] is not None
        assert row["inprocess_texts_per_cpu_s"] is not None


def test_against_a_running_server_cpu_is_unknown(tiny_repository: Path, tmp_path: Path
                                                  ) -> None:
    running = RunningServer(server_settings(tiny_repository)).start()
    try:
        argv = ["bench", "--server", running.target, "--models", LSTM_NAME, "--texts",
                SYNTHETIC, "--lengths", "8", "--concurrency", "2", "--requests", "6",
                "--warmup", "1", "--out", str(tmp_path), "--json"]
        assert run_cli(argv) == 0
    finally:
        running.close()
    document = json.loads((tmp_path / "bench.json").read_text())
    (cell,) = document["cells"]
    assert cell["ok"] == 6 and cell["server_cpu_s"] is None
    assert cell["texts_per_server_cpu_s"] is None
    assert any("CPU seconds" in w for w in document["warnings"])
    assert any("sized in words" in w for w in document["warnings"])


def test_the_open_inference_protocol_and_a_server_pid(tiny_repository: Path,
                                                     tmp_path: Path) -> None:
    """The same cells through the v2 protocol (what Triton, MLServer and KServe runtimes
    speak), against a server bench did not start, with its CPU read from --server-pid."""
    from harness.processes import serve_process

    process, target = serve_process(tiny_repository, "--metrics-port", "0")
    try:
        outs = {}
        for protocol in ("native", "v2"):
            out = tmp_path / protocol
            argv = ["bench", "--server", target, "--server-pid", str(process.pid),
                    "--protocol", protocol, "--models", LSTM_NAME, "--texts", SYNTHETIC,
                    "--lengths", "8", "--concurrency", "2", "--requests", "40", "--warmup", "2",
                    "--out", str(out), "--json"]
            assert run_cli(argv) == 0
            outs[protocol] = json.loads((out / "bench.json").read_text())
    finally:
        process.terminate()
        process.wait(30)
    native, v2 = (outs[p]["cells"][0] for p in ("native", "v2"))
    assert native["protocol"] == "native" and v2["protocol"] == "v2"
    for cell in (native, v2):
        assert cell["ok"] == 40 and cell["errors"] == {}
        assert cell["server_cpu_s"] is not None and cell["server_cpu_s"] >= 0
    # Only the native API reports server timings and token counts; v2 says "unknown".
    assert native["server"]["total_ms_p50"] > 0 and native["tokens_mean"] > 0
    assert v2["server"]["total_ms_p50"] is None and v2["tokens_mean"] is None
    assert outs["v2"]["models"][0]["name"] == LSTM_NAME  # described through ModelMetadata


@pytest.mark.parametrize(("argv", "message"), [
    ([], "give --repository DIR"),
    (["--server-pid", "1", "--repository", "."], "--server-pid needs --server"),
    (["--server", "nonsense"], "--server 'nonsense': expected HOST:PORT"),
    (["--repository", "/nonexistent/repo"], "--repository /nonexistent/repo: not a directory"),
    (["--server", "127.0.0.1:1", "--spinning", "both"], "--spinning needs a server started"),
    (["--server", "127.0.0.1:1", "--in-process"], "--in-process needs --repository"),
    (["--server", "127.0.0.1:1", "--concurrency", "0"], "--concurrency: 0 must be > 0"),
    (["--server", "127.0.0.1:1", "--lengths", "16,abc"], "--lengths: 'abc' is not a number"),
    (["--server", "127.0.0.1:1", "--duration", "0"], "--duration: must be > 0"),
    (["--server", "127.0.0.1:1", "--serve-args", "'unclosed"], "--serve-args:"),
])
def test_bad_flags_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert run_cli(["bench", *argv]) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqserve: error: {message}")


@pytest.mark.parametrize(("serve_args", "message"), [
    ("--port 5", "--serve-args: --port is set by seqserve bench itself"),
    ("--no-such-flag", "--serve-args: unrecognized arguments: --no-such-flag"),
    ("--max-batch-texts 0", "--serve-args: invalid setting max_batch_texts"),
])
def test_bad_server_flags_fail_before_any_server_starts(tiny_repository: Path, capsys,
                                                       serve_args: str, message: str) -> None:
    # The `=` form: argparse would read a lone "--flag" value as an option of bench itself.
    argv = ["bench", "--repository", str(tiny_repository), f"--serve-args={serve_args}"]
    assert run_cli(argv) == ExitCode.USAGE
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"seqserve: error: {message}")


def test_unknown_model_is_a_usage_error(tiny_repository: Path, capsys) -> None:
    assert run_cli(["bench", "--repository", str(tiny_repository), "--models", "nope"]) == 2
    assert "--models: nope not in" in capsys.readouterr().err


# --- the pieces on their own ---------------------------------------------------------------

def _result(texts: int = 1) -> ClassifyResult:
    return ClassifyResult("m", 1, "lstm", "fp32", "cpu", [], Timing(0, 0, 0, 0, 1, 1))


def test_closed_loop_is_bounded_by_count_and_by_duration() -> None:
    async def instant(index: int) -> ClassifyResult:
        await asyncio.sleep(0)
        return _result()

    async def slow(index: int) -> ClassifyResult:
        await asyncio.sleep(0.02)
        return _result()

    run = asyncio.run(closed_loop(instant, concurrency=3, requests=10, duration_s=10))
    assert len(run.outcomes) == 10
    run = asyncio.run(closed_loop(slow, concurrency=2, requests=10_000, duration_s=0.1))
    assert 2 <= len(run.outcomes) < 100


def test_open_loop_latency_counts_from_the_intended_send_time() -> None:
    """A stall of the generator itself (here: the first call blocks the event loop) must show
    up as latency of the requests that were due meanwhile: no coordinated omission."""
    stall_s = 0.05

    async def send(index: int) -> ClassifyResult:
        if index == 0:
            time.sleep(stall_s)  # blocks the loop, so later arrivals are sent late
        await asyncio.sleep(0)
        return _result()

    run = asyncio.run(open_loop(send, rate=500, requests=20, duration_s=5, seed=1))
    assert len(run.outcomes) == 20
    assert all(o.latency_s >= o.send_lag_s for o in run.outcomes)
    late = [o for o in run.outcomes[1:] if o.send_lag_s > stall_s / 2]
    assert late and all(o.latency_s > stall_s / 2 for o in late)


def test_errors_are_counted_by_code() -> None:
    import grpc

    from service.bench.load import CellPlan, summarize

    async def flaky(index: int) -> ClassifyResult:
        if index % 2:
            raise ClientError(grpc.StatusCode.RESOURCE_EXHAUSTED, "queue full")
        return _result()

    run = asyncio.run(closed_loop(flaky, concurrency=1, requests=6, duration_s=5))
    plan = CellPlan("m", 8, 1, 1, None, 6, 5, 0)
    cell = summarize(plan, run, server_cpu_s=None, client_cpu_s=0.0)
    assert cell["ok"] == 3 and cell["errors"] == {"RESOURCE_EXHAUSTED": 3}


def test_texts_are_cut_at_token_boundaries(tiny_repository: Path) -> None:
    from tokenizers import Tokenizer

    tokenizer_file = tiny_repository / LSTM_NAME / "1" / "tokenizer.json"
    pool, source = load_pool(SYNTHETIC, warn=lambda message: None)
    built = TextBuilder(pool, variants=8).build(tokenizer_file, 40)
    raw = Tokenizer.from_file(str(tokenizer_file))
    raw.no_truncation()
    assert source == SYNTHETIC and len(built.texts) == 8
    assert all(abs(len(raw.encode(t).ids) - 40) <= 1 for t in built.texts)


def test_uncached_builtin_falls_back_with_a_warning_but_a_bad_file_fails(monkeypatch,
                                                                         tmp_path: Path) -> None:
    import export.builtin_datasets as builtins

    monkeypatch.setattr(builtins, "is_cached", lambda name, cache_dir=None: False)
    warnings: list[str] = []
    pool, source = load_pool("rotten-tomatoes", warn=warnings.append)
    assert source == SYNTHETIC and pool and "not cached" in warnings[0]
    with pytest.raises(BenchError) as error:
        load_pool(str(tmp_path / "missing.csv"), warn=warnings.append)
    assert error.value.kind == "data"


def test_proc_cpu_seconds_reads_this_process() -> None:
    sum(i * i for i in range(200_000))  # burn a little CPU so the count is above zero
    assert proc_cpu_seconds(os.getpid()) > 0
