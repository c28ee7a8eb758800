"""``seqserve classify`` against a real server, and ``seqserve serve`` failing to start."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import REPO_ROOT
from harness.server import RunningServer, server_settings
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.bench.child_server import ChildServer
from service.bench.errors import BenchError
from service.cli.main import main
from service.client import Client


def classify(server: RunningServer, *argv: str) -> list[str]:
    return ["classify", "--server", server.target, *argv]


def test_prints_label_and_score_per_text(shared_server: RunningServer, capsys) -> None:
    assert main(classify(shared_server, "--model", LSTM_NAME, "good movie", "bad plot")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2
    label, score, text = lines[0].split("\t")
    assert label in ("negative", "positive") and 0 <= float(score) <= 1 and text == "good movie"


def test_json_top_k_and_file_input(shared_server: RunningServer, tmp_path: Path,
                                   capsys) -> None:
    texts = tmp_path / "texts.txt"
    texts.write_text("good movie\n\nbad plot\nfine\n", encoding="utf-8")
    argv = classify(shared_server, "--model", TRANSFORMER_NAME, "--file", str(texts),
                    "--top-k", "2", "--json")
    assert main(argv) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["model"] == TRANSFORMER_NAME and document["device"] == "cpu"
    assert [r["text"] for r in document["results"]] == ["good movie", "bad plot", "fine"]
    assert all(len(r["top"]) == 2 for r in document["results"])


def test_stdin_and_the_only_model_question(shared_server: RunningServer, monkeypatch,
                                           capsys) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("good\nbad\n"))
    # Two models are loaded, so --model is required: a usage error, exit 2.
    assert main(classify(shared_server, "-")) == 2
    assert "--model is required" in capsys.readouterr().err
    monkeypatch.setattr(sys, "stdin", io.StringIO("good\nbad\n"))
    assert main(classify(shared_server, "--model", LSTM_NAME, "-")) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(("argv", "code", "message"), [
    (["--model", "nope", "good"], 4, "seqserve: error: NOT_FOUND: model 'nope' is not loaded"),
    (["--model", LSTM_NAME, "--top-k", "5", "good"], 4, "seqserve: error: INVALID_ARGUMENT: "
                                                        "top_k"),
    (["--model", LSTM_NAME], 2, "seqserve: error: no texts"),
])
def test_exit_codes_and_one_line_errors(shared_server: RunningServer, capsys, argv: list[str],
                                        code: int, message: str) -> None:
    assert main(classify(shared_server, *argv)) == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message)


def test_unreachable_server_is_a_server_error(capsys) -> None:
    argv = ["classify", "--server", "127.0.0.1:1", "--deadline", "2", "--model", "m", "x"]
    assert main(argv) == 4
    assert capsys.readouterr().err.startswith("seqserve: error: UNAVAILABLE: ")


def test_serve_fails_with_one_line_on_a_bad_repository(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, "-m", "service", "serve", "--repository", str(tmp_path / "missing"),
         "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert completed.returncode == 1
    assert completed.stderr.strip().splitlines()[-1] == (
        f"seqserve: error: model repository {tmp_path / 'missing'} is not a directory")


def test_classify_splits_at_the_servers_own_limit(start_server, tiny_repository: Path,
                                                  capsys) -> None:
    running = start_server(server_settings(tiny_repository, max_texts_per_request=3,
                                           max_queue_texts=8))
    texts = [f"good movie {i}" for i in range(8)]
    assert main(classify(running, "--model", LSTM_NAME, "--json", *texts)) == 0
    document = json.loads(capsys.readouterr().out)
    assert [r["text"] for r in document["results"]] == texts
    assert len(document["timings"]) == 3  # 3 + 3 + 2 texts, the server's limit of 3


def test_a_server_that_never_gets_ready_times_out_its_launcher(tmp_path: Path) -> None:
    """The one child-server launcher (bench and demo) gives up on a server that hangs while
    loading instead of blocking on its stdout forever."""
    hang = tmp_path / "hang.py"
    hang.write_text("import time\ntime.sleep(60)\n")
    server = ChildServer(tmp_path, [], startup_timeout_s=1.0)
    server.command = lambda: [sys.executable, str(hang)]  # type: ignore[method-assign]
    started = time.monotonic()
    with pytest.raises(BenchError, match="no ready line within 1s") as caught:
        server.start()
    assert caught.value.kind == "startup"
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(("choice", "loop"), [("uvloop", "uvloop.Loop"),
                                              ("asyncio", "asyncio.unix_events")])
def test_the_event_loop_is_a_setting(tiny_repository: Path, choice: str, loop: str) -> None:
    from harness.processes import serve_process

    process, target = serve_process(tiny_repository, "--metrics-port", "0", "--event-loop",
                                    choice)
    try:
        with Client(target, timeout=10) as client:
            assert client.classify(["good film"], model=LSTM_NAME).results
    finally:
        process.terminate()
        assert process.wait(30) == 0
    assert f"event loop: {loop}" in process.stderr.read()
