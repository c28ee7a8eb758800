"""Which precision and how many ORT threads each model gets on CPU, and why: the policy, the
repository's serving.json overrides, and what GetModel and the doctor say about it."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import onnx
import pytest
from harness.server import server_settings
from harness.tiny_models import LSTM_NAME, PRETRAINED_NAME, TRANSFORMER_NAME

from service.repo.layout import latest_version
from service.repo.manifest import ComputeCost, Manifest, ManifestError
from service.repo.serving_config import SERVING_CONFIG_FILE, ServingConfig, read_serving_config
from service.server.doctor import run_doctor
from service.server.planning import choose_artifact, plan_attempts
from service.server.runtime import CPU
from service.server.threads import (
    COMPUTE_BOUND_FLOPS_PER_TOKEN,
    COMPUTE_BOUND_FP32_BYTES,
    choose_threads,
)


def _manifest(repository: Path, name: str) -> Manifest:
    return latest_version(repository, name).load_manifest()


def _with_int8(manifest: Manifest, *, passed: bool = True,
               batch: float | None = 0.0) -> Manifest:
    artifacts = [a.model_copy(update={"passed_gates": passed, "batch_max_abs_diff": batch})
                 if a.precision == "int8" else a for a in manifest.artifacts]
    return manifest.model_copy(update={"artifacts": artifacts})


def test_auto_serves_int8_on_cpu_only_where_every_gate_passed(tiny_repository: Path) -> None:
    manifest = _manifest(tiny_repository, TRANSFORMER_NAME)
    assert manifest.artifact("int8") is not None
    artifact, why = choose_artifact(_with_int8(manifest), "auto", "cpu")
    assert artifact.precision == "int8" and why.startswith("int8: passed its export gates")
    assert "batch-invariant" in why
    artifact, why = choose_artifact(_with_int8(manifest, passed=False), "auto", "cpu")
    assert artifact.precision == "fp32" and "int8 failed its export gates" in why
    # A schema-2 int8 (dynamic quantization, never checked for batch invariance): not by auto,
    # still by auto-int8 and by name.
    old = _with_int8(manifest, batch=None)
    artifact, why = choose_artifact(old, "auto", "cpu")
    assert artifact.precision == "fp32" and "predates the batch-invariance gate" in why
    assert choose_artifact(old, "auto-int8", "cpu")[0].precision == "int8"
    artifact, why = choose_artifact(_with_int8(manifest, passed=False), "int8", "cpu")
    assert artifact.precision == "int8" and why == "int8: forced by --precision int8"
    # On a GPU auto means fp16 (re-gated there), then fp32 there if fp16 fails on CUDA, with
    # int8 only for the CPU fallback.
    plan = plan_attempts(_with_int8(manifest), server_settings(tiny_repository, device="auto",
                                                               precision="auto"),
                         ["CUDAExecutionProvider", CPU])
    assert [(a.device, a.artifact.precision) for a in plan] == [("cuda", "fp16"),
                                                                 ("cuda", "fp32"),
                                                                 ("cpu", "int8")]


def test_a_model_without_int8_is_served_fp32_and_says_so(tiny_repository: Path) -> None:
    manifest = _manifest(tiny_repository, LSTM_NAME)
    assert manifest.artifact("int8") is None  # the LSTM has no batch-invariant int8 kernel
    artifact, why = choose_artifact(manifest, "auto", "cpu")
    assert artifact.precision == "fp32" and why == "fp32: the reference precision (no int8 " \
        "artifact)"
    assert choose_artifact(manifest, "int8", "cpu") == (
        None, "no int8 artifact (forced by --precision int8)")


def test_threads_follow_the_compute_per_token(tiny_repository: Path) -> None:
    manifest = _manifest(tiny_repository, LSTM_NAME)
    assert manifest.compute is not None
    assert 0 < manifest.compute.weight_flops_per_token < COMPUTE_BOUND_FLOPS_PER_TOKEN
    none = ServingConfig()
    light = choose_threads(manifest, setting=0, config=none, cores=4)
    assert light.threads == 3 and light.reason.startswith("light (")
    assert choose_threads(manifest, setting=0, config=none, cores=1).threads == 1
    heavy_manifest = manifest.model_copy(update={"compute": ComputeCost(
        weight_flops_per_token=COMPUTE_BOUND_FLOPS_PER_TOKEN)})
    heavy = choose_threads(heavy_manifest, setting=0, config=none, cores=4)
    assert heavy.threads == 4 and heavy.reason.startswith("compute-bound (4.0 MFLOP per token)")
    # Overrides: serving.json beats the flag, the flag beats the rule; CUDA gets one thread.
    assert choose_threads(heavy_manifest, setting=2, config=none, cores=4).threads == 2
    assert choose_threads(heavy_manifest, setting=2, config=ServingConfig(intra_op_threads=3),
                          cores=4).threads == 3
    assert choose_threads(heavy_manifest, setting=0, config=none, cuda=True).threads == 1
    # A manifest from before the compute figure (schema 2) is judged by its fp32 file.
    old = manifest.model_copy(update={"compute": None})
    assert choose_threads(old, setting=0, config=none, cores=4).threads == 3
    big = old.model_copy(update={"artifacts": [
        a.model_copy(update={"bytes": COMPUTE_BOUND_FP32_BYTES}) if a.precision == "fp32" else a
        for a in old.artifacts]})
    assert choose_threads(big, setting=0, config=none, cores=4).threads == 4


def test_compute_per_token_is_counted_from_the_graph(tiny_repository: Path,
                                                     tiny_pretrained_repository: Path) -> None:
    lstm = _manifest(tiny_repository, LSTM_NAME)
    # The tiny repository's runs sit beside it (harness/tiny_models.py).
    run = tiny_repository.parent / f"{tiny_repository.name}-runs" / LSTM_NAME
    config = json.loads((run / "config.json").read_text())["model"]
    # Two directions x four gates x (input + hidden) x hidden, plus the classifier head.
    embedding, hidden = config["embed_dim"], config["hidden_dim"]
    graph = onnx.load(str(latest_version(tiny_repository, LSTM_NAME).directory
                          / "model.fp32.onnx"))
    head = next(math.prod(init.dims) for init in graph.graph.initializer
                if init.name == "classifier.weight")
    expected = 2 * (2 * 4 * hidden * (embedding + hidden) + head)
    assert lstm.compute.weight_flops_per_token == expected
    pretrained = _manifest(tiny_pretrained_repository, PRETRAINED_NAME)
    assert pretrained.compute.weight_flops_per_token > lstm.compute.weight_flops_per_token


def test_serving_json_overrides_precision_and_threads_for_one_model(
        repository_copy: Path) -> None:
    from service.server.runtime import SessionBuilder, load_version

    (repository_copy / TRANSFORMER_NAME / SERVING_CONFIG_FILE).write_text(
        json.dumps({"precision": "fp32", "intra_op_threads": 2}))
    settings = server_settings(repository_copy, precision="auto", intra_op_threads=0)
    builder = SessionBuilder(settings)
    transformer = load_version(latest_version(repository_copy, TRANSFORMER_NAME), settings,
                               builder)
    selection = transformer.session.selection
    assert transformer.session.precision == "fp32"
    assert selection.precision_reason == "fp32: forced by serving.json fp32"
    assert (selection.threads, selection.threads_reason) == (2, "serving.json intra_op_threads")
    lstm = load_version(latest_version(repository_copy, LSTM_NAME), settings, builder)
    assert lstm.session.selection.threads_reason.startswith("light (")


@pytest.mark.parametrize(("text", "fragment"), [
    ('{"precision": "int4"}', "'precision'"),
    ('{"intra_op_threads": 0}', "'intra_op_threads'"),
    ('{"threads": 2}', "'threads'"),
    ("{not json", "not JSON"),
])
def test_a_bad_serving_json_is_refused_naming_the_field(tmp_path: Path, text: str,
                                                        fragment: str) -> None:
    (tmp_path / SERVING_CONFIG_FILE).write_text(text)
    with pytest.raises(ManifestError, match=r"serving\.json") as caught:
        read_serving_config(tmp_path)
    assert fragment in str(caught.value)
    assert read_serving_config(tmp_path / "elsewhere") == ServingConfig()


def test_a_bad_serving_json_refuses_the_model_not_the_server(repository_copy: Path,
                                                             start_server) -> None:
    (repository_copy / TRANSFORMER_NAME / SERVING_CONFIG_FILE).write_text('{"precision": 8}')
    running = start_server(server_settings(repository_copy, strict_startup=False))
    with running.client() as client:
        names = {m.name for m in client.list_models()}
    assert LSTM_NAME in names and TRANSFORMER_NAME not in names
    # The doctor says the same, naming the file and the field, and examines the others.
    report = run_doctor(server_settings(repository_copy), runs=0)
    errors = {m.name: m.error for m in report.models}
    assert "serving.json" in errors[TRANSFORMER_NAME] and "'precision'" in errors[
        TRANSFORMER_NAME]
    assert errors[LSTM_NAME] == ""


def test_getmodel_says_which_precision_and_threads_and_why(repository_copy: Path,
                                                           start_server) -> None:
    running = start_server(server_settings(repository_copy, precision="auto",
                                           intra_op_threads=0))
    with running.client() as client:
        transformer = client.get_model(TRANSFORMER_NAME)
        lstm = client.get_model(LSTM_NAME)
    manifest = _manifest(repository_copy, TRANSFORMER_NAME)
    expected, why = choose_artifact(manifest, "auto", "cpu")
    assert (transformer.precision, transformer.precision_reason) == (expected.precision, why)
    assert lstm.precision == "fp32" and "no int8 artifact" in lstm.precision_reason
    assert lstm.intra_op_threads >= 1 and lstm.intra_op_threads_reason.startswith("light (")
    if expected.precision == "int8":
        assert "batch_max_abs_diff" in transformer.evaluation


def test_the_doctor_predicts_what_the_server_serves(repository_copy: Path,
                                                    start_server) -> None:
    shutil.copytree(repository_copy / TRANSFORMER_NAME, repository_copy / "copy-of-transformer")
    (repository_copy / "copy-of-transformer" / SERVING_CONFIG_FILE).write_text(
        '{"precision": "fp16"}')
    (repository_copy / "copy-of-transformer" / "1" / "manifest.json").write_text(
        (repository_copy / "copy-of-transformer" / "1" / "manifest.json").read_text()
        .replace(f'"name": "{TRANSFORMER_NAME}"', '"name": "copy-of-transformer"'))
    settings = server_settings(repository_copy, precision="auto", intra_op_threads=0)
    report = run_doctor(settings, runs=0)
    running = start_server(settings)
    with running.client() as client:
        served = {m.name: m for m in client.list_models()}
    assert {m.name for m in report.models} == set(served)
    for model in report.models:
        answer = served[model.name]
        assert model.served.startswith(f"{answer.precision} on cpu")
        assert answer.precision_reason in model.served
    assert served["copy-of-transformer"].precision == "fp16"
