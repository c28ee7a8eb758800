"""``seqserve classify`` against a real server, and ``seqserve serve`` failing to start."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
from model_factory import LSTM_NAME, TRANSFORMER_NAME
from server_harness import RunningServer

from service.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent


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
