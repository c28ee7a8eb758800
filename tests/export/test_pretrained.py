"""Fine-tuning pretrained encoders: a tiny random BERT (pad id 0) and RoBERTa (pad id 1) saved
as real Hugging Face directories are fine-tuned, exported behind the gates, and served through
both APIs exactly as in-process ONNX Runtime answers."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from harness.server import reference_probabilities, server_settings
from harness.synthetic import separable_texts
from harness.tiny_pretrained import save_tiny_encoder
from harness.tiny_runs import train_tiny_run

from export.pipeline import export_run
from protos.inference import grpc_predict_v2_pb2 as pb
from protos.inference import grpc_predict_v2_pb2_grpc as pb_grpc
from service.repo.layout import latest_version
from service.server.transport.open_inference import decode_bytes_tensor, encode_bytes_tensor

FAMILIES = {"bert": 0, "roberta": 1}  # family -> its pad id


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories fine-tuned from each tiny base, and a repository with both exported."""
    root = tmp_path_factory.mktemp("pretrained")
    out: dict[str, Path] = {"repository": root / "repo"}
    for family in FAMILIES:
        base = save_tiny_encoder(root / f"base-{family}", family)
        run = train_tiny_run(root / "runs", "pretrained", name=f"tiny-{family}", base=base,
                             epochs=4, learning_rate=3e-3, max_length=40)
        export_run(run, out["repository"], f"tiny-{family}")
        out[family] = run
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_fine_tuning_keeps_the_checkpoints_tokenizer_and_learns(pretrained, family) -> None:
    run = pretrained[family]
    config = json.loads((run / "config.json").read_text())
    assert config["architecture"] == "pretrained"
    assert config["model"]["pad_id"] == FAMILIES[family]
    assert config["model"]["encoder"]["model_type"] == family
    base_tokenizer = json.loads((run.parent.parent / f"base-{family}" / "tokenizer.json")
                                .read_text())
    tokenizer = json.loads((run / "tokenizer.json").read_text())
    assert tokenizer["model"]["vocab"] == base_tokenizer["model"]["vocab"]  # not retrained
    assert tokenizer["truncation"]["max_length"] == 40
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_is_gated_and_records_the_pad_id(pretrained, family) -> None:
    manifest = latest_version(pretrained["repository"], f"tiny-{family}").load_manifest()
    assert manifest.architecture == "pretrained"
    assert manifest.tokenizer.pad_id == FAMILIES[family]
    assert manifest.source.kind == "fine-tuned"
    assert manifest.source.base == str(pretrained["repository"].parent / f"base-{family}")
    assert all(a.passed_gates for a in manifest.artifacts if a.precision != "int8")
    assert manifest.evaluation.onnx_vs_torch_max_abs_diff <= 1e-4
    assert manifest.evaluation.fp16_agreement >= 0.995


@pytest.mark.parametrize("family", list(FAMILIES))
def test_served_answers_equal_in_process_onnx_runtime_whatever_the_padding(
        pretrained, family, start_server) -> None:
    running = start_server(server_settings(pretrained["repository"], max_batch_delay_ms=20))
    name = f"tiny-{family}"
    # Lengths 3 to 40 words in one request: they share padded batches, so a wrong pad id
    # (RoBERTa derives positions from it) would change the shorter rows' answers.
    texts = [text for text, _ in separable_texts(12, seed=4)]
    expected, labels = reference_probabilities(pretrained["repository"], name, texts)
    with running.client(timeout=30) as client:
        answer = client.classify(texts, model=name, top_k=2)
    assert answer.timing.batch_size > 1
    for result, row in zip(answer.results, expected, strict=True):
        assert result.label == labels[int(row.argmax())]
        assert result.score == pytest.approx(float(row.max()), abs=1e-5)
        assert result.token_count >= 3  # [CLS]/<s> and [SEP]/</s> are counted

    with grpc.insecure_channel(running.target) as channel:
        request = pb.ModelInferRequest(model_name=name)
        request.inputs.add(name="TEXT", datatype="BYTES", shape=[len(texts)])
        request.raw_input_contents.append(encode_bytes_tensor([t.encode() for t in texts]))
        response = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)
    outputs = {o.name: i for i, o in enumerate(response.outputs)}
    probabilities = np.frombuffer(response.raw_output_contents[outputs["PROBABILITIES"]],
                                  dtype="<f4").reshape(len(texts), len(labels))
    assert np.allclose(probabilities, expected, atol=1e-5)
    served_labels = decode_bytes_tensor(response.raw_output_contents[outputs["LABEL"]])
    assert [label.decode() for label in served_labels] == [r.label for r in answer.results]
