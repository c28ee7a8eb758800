"""``seqserve import``: a fine-tuned Hugging Face checkpoint and an ONNX file are published
behind the gates and served; every way an import can be wrong is one clear line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from harness.server import reference_probabilities, server_settings
from harness.synthetic import separable_texts
from harness.tiny_pretrained import save_tiny_encoder
from harness.tiny_runs import train_tiny_run

from export.config import RunConfig
from models import create_model
from service.cli.exit_codes import ExitCode
from service.cli.main import main
from service.repo.layout import latest_version

LABELS = ["neg", "pos"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What a team brings: a fine-tuned classification directory (saved by transformers'
    save_pretrained, with id2label), an evaluation CSV, and an ONNX file of the contract."""
    root = tmp_path_factory.mktemp("import")
    base = save_tiny_encoder(root / "base", "bert")
    run = train_tiny_run(root / "runs", "pretrained", name="tuned", base=base, epochs=4,
                         learning_rate=3e-3, max_length=40)
    config = RunConfig.load(run)
    model = create_model("pretrained", config.model)
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    hf = model.model
    hf.config.id2label = dict(enumerate(LABELS))
    hf.config.label2id = {label: i for i, label in enumerate(LABELS)}
    directory = root / "checkpoint"
    hf.save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes((run / "tokenizer.json").read_bytes())
    evaluation = root / "eval.csv"
    with evaluation.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "gold"])
        writer.writerows(separable_texts(80, seed=11))
    assert main(["export", str(run), "--repository", str(root / "exported"), "--name",
                 "tuned"]) == 0
    onnx_file = root / "exported" / "tuned" / "1" / "model.fp32.onnx"
    return {"root": root, "base": base, "checkpoint": directory, "eval": evaluation,
            "onnx": onnx_file, "tokenizer": run / "tokenizer.json"}


def _eval_flags(checkpoint: dict[str, Path]) -> list[str]:
    return ["--eval", str(checkpoint["eval"]), "--text-column", "sentence", "--label-column",
            "gold"]


def test_a_hugging_face_checkpoint_is_exported_gated_and_served(
        checkpoint, tmp_path, capsys, start_server) -> None:
    repo = tmp_path / "repo"
    assert main(["import", "hf", str(checkpoint["checkpoint"]), "--name", "team-model",
                 "--repository", str(repo), *_eval_flags(checkpoint), "--json"]) == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["parity"]["max_abs_diff"] <= 1e-4
    manifest = latest_version(repo, "team-model").load_manifest()
    assert manifest.labels == LABELS and manifest.architecture == "pretrained"
    assert manifest.source.kind == "huggingface" and manifest.training is None
    assert manifest.evaluation.examples == 80 and manifest.evaluation.fp32.accuracy >= 0.9
    assert {a.precision for a in manifest.artifacts} == {"fp32", "fp16", "int8"}

    texts = [text for text, _ in separable_texts(6, seed=2)]
    expected, labels = reference_probabilities(repo, "team-model", texts)
    running = start_server(server_settings(repo))
    with running.client(timeout=30) as client:
        answers = client.classify(texts, model="team-model").results
        described = client.get_model("team-model")
    assert [a.label for a in answers] == [labels[int(row.argmax())] for row in expected]
    assert described.source.startswith("huggingface ")


def test_an_onnx_file_with_its_tokenizer_and_labels_is_gated_without_parity(
        checkpoint, tmp_path, capsys) -> None:
    repo = tmp_path / "repo"
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(LABELS))
    assert main(["import", "onnx", str(checkpoint["onnx"]), "--tokenizer",
                 str(checkpoint["tokenizer"]), "--labels", str(labels), "--name", "onnx-model",
                 "--repository", str(repo), "--max-length", "40", *_eval_flags(checkpoint)]
                ) == ExitCode.OK
    manifest = latest_version(repo, "onnx-model").load_manifest()
    assert manifest.evaluation.onnx_vs_torch_max_abs_diff is None  # no PyTorch model here
    assert manifest.source.kind == "onnx" and manifest.architecture == "imported"
    assert manifest.tokenizer.max_length == 40 and manifest.tokenizer.pad_id == 0
    assert manifest.artifact("fp16").passed_gates


def test_without_an_evaluation_file_import_refuses_unless_told_not_to_evaluate(
        checkpoint, tmp_path, capsys, start_server) -> None:
    repo = tmp_path / "repo"
    args = ["import", "hf", str(checkpoint["checkpoint"]), "--name", "unevaluated",
            "--repository", str(repo)]
    assert main(args) == ExitCode.USAGE
    assert "--no-eval" in capsys.readouterr().err
    assert main([*args, "--no-eval"]) == ExitCode.OK
    manifest = latest_version(repo, "unevaluated").load_manifest()
    assert manifest.evaluation is None and [a.precision for a in manifest.artifacts] == ["fp32"]
    running = start_server(server_settings(repo))
    with running.client(timeout=30) as client:
        assert client.get_model("unevaluated").evaluation == {}
        assert client.classify(["great film"], model="unevaluated").results[0].label in LABELS


@pytest.mark.parametrize(("case", "message"), [
    ("base", "not a sequence-classification checkpoint"),
    ("other-inputs", "graph inputs are"),
    ("labels", "the labels do not match the logits: the model gives 2 logits per text, 3 "
               "labels given"),
    ("pad-id", "pad id 9999 is outside the tokenizer's vocabulary"),
    ("eval-labels", "labels ['maybe'] are not the model's"),
])
def test_each_way_an_import_is_wrong_is_one_clear_line(checkpoint, tmp_path, capsys, case,
                                                       message) -> None:
    repo = tmp_path / "repo"
    onnx_args = ["import", "onnx", str(checkpoint["onnx"]), "--tokenizer",
                 str(checkpoint["tokenizer"]), "--name", "m", "--repository", str(repo)]
    if case == "base":
        argv = ["import", "hf", str(checkpoint["base"]), "--name", "m", "--repository",
                str(repo), "--no-eval"]
    elif case == "other-inputs":
        argv = [*onnx_args[:2], str(_wrong_inputs_model(tmp_path)), *onnx_args[3:],
                "--labels", "neg,pos", "--no-eval"]
    elif case == "labels":
        argv = [*onnx_args, "--labels", "neg,pos,maybe", "--no-eval"]
    elif case == "pad-id":
        argv = [*onnx_args, "--labels", "neg,pos", "--pad-id", "9999", "--no-eval"]
    else:
        bad = tmp_path / "bad.csv"
        bad.write_text("text,label\ngood film,pos\nso so,maybe\n")
        argv = [*onnx_args, "--labels", "neg,pos", "--eval", str(bad)]
    assert main(argv) == ExitCode.DATA_ERROR
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("seqserve: error: ") and message in err[0]
    assert not latest_version(repo, "m")  # nothing was published


def _wrong_inputs_model(tmp_path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["tokens"], ["logits"], to=TensorProto.FLOAT)], "wrong",
        [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["b", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])])
    path = tmp_path / "wrong.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)],
                                ir_version=10), path)
    return path
