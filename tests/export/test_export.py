"""`seqserve export`: gates that fail when they must, manifests, atomic, concurrent publishing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from harness.tiny_runs import train_tiny_run
from onnx import numpy_helper

import export.gating as gating
import export.pipeline as pipeline
from export.gates import GateFailure, GateSettings
from export.publish import VersionExistsError, publish, staging_directory
from service.cli.exit_codes import ExitCode
from service.cli.main import main
from service.repo.layout import latest_version, versions
from service.repo.manifest import SCHEMA_VERSION, Manifest, ManifestError, sha256_file

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    return {arch: train_tiny_run(root, arch) for arch in ("lstm", "transformer", "bow")}


def perturb_largest_initializer(path: Path, scale: float) -> None:
    """Change the largest float weight in an ONNX file: a model that no longer matches."""
    model = onnx.load(str(path))
    floats = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT,
                                                                     onnx.TensorProto.FLOAT16)]
    target = max(floats, key=lambda i: int(np.prod(i.dims)))
    values = numpy_helper.to_array(target)
    rng = np.random.default_rng(0)
    perturbed = values + scale * rng.standard_normal(values.shape).astype(values.dtype)
    target.CopyFrom(numpy_helper.from_array(perturbed.astype(values.dtype), target.name))
    onnx.save(model, str(path))


@pytest.mark.parametrize("architecture", ["lstm", "transformer", "bow"])
def test_export_publishes_gated_fp32_fp16_and_int8(architecture, runs, tmp_path, capsys):
    repo = tmp_path / "repo"
    code = main(["export", str(runs[architecture]), "--repository", str(repo),
                 "--name", f"tiny-{architecture}", "--json"])
    assert code == ExitCode.OK
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["version"] == 1
    assert report["parity"]["max_abs_diff"] <= 1e-4
    assert set(report["parity"]["batch_sizes"]) >= {1, 7, 32}

    model_version = latest_version(repo, f"tiny-{architecture}")
    manifest = model_version.load_manifest()
    assert manifest.architecture == architecture and manifest.labels == ["neg", "pos"]
    # int8 is batch-invariant MatMulNBits: a graph with no MatMul by a weight (the LSTM: its
    # cell and Gemm head) gets no int8 artifact rather than an "int8" that is fp32.
    weight_matmuls = any(
        node.op_type == "MatMul" and node.input[1] in {i.name for i in graph.graph.initializer}
        for graph in [onnx.load(str(model_version.directory / "model.fp32.onnx"))]
        for node in graph.graph.node)
    expected = ["fp32", "fp16", "int8"] if weight_matmuls else ["fp32", "fp16"]
    assert [a.precision for a in manifest.artifacts] == expected
    assert weight_matmuls == (architecture != "lstm") or architecture == "bow"
    for artifact in manifest.artifacts:
        assert sha256_file(model_version.directory / artifact.file) == artifact.sha256
        assert artifact.opset >= 18
        # int8 also has to be faster than fp32 on this machine, which toy models may not be.
        assert artifact.passed_gates or artifact.precision == "int8"
        # Every artifact was checked alone vs in mixed-length batches.
        assert artifact.batch_max_abs_diff is not None
        assert artifact.batch_max_abs_diff <= GateSettings().batch_invariance_tolerance
    evaluation = manifest.evaluation
    assert evaluation.fp32.accuracy > 0.9 and evaluation.fp16_agreement >= 0.995
    if weight_matmuls:
        assert evaluation.int8_agreement >= 0.98 and evaluation.int8 is not None
        last = report["int8_attempts"][-1]
        assert manifest.artifact("int8").quantization == last["quantization"]
        assert manifest.artifact("int8").passed_gates == last["passed"]
        assert last["speedup_vs_fp32"] > 0
    else:
        assert evaluation.int8 is None and evaluation.int8_agreement is None
    assert manifest.compute.weight_flops_per_token > 0
    assert manifest.schema_version == SCHEMA_VERSION and manifest.source.kind == "trained"
    # The stored evaluation slice: texts, labels and fp32 probabilities, hashed.
    stored = manifest.evaluation_slice
    slice_path = model_version.directory / stored.file
    assert sha256_file(slice_path) == stored.sha256
    document = json.loads(slice_path.read_text())
    assert len(document["texts"]) == stored.examples == len(document["fp32_probabilities"])
    assert all(abs(sum(p) - 1) < 1e-4 for p in document["fp32_probabilities"])
    assert evaluation.examples == 60  # 10 % of the 600 rows
    assert manifest.tokenizer.sha256 == sha256_file(model_version.directory / "tokenizer.json")

    # A second export never overwrites: it becomes version 2; pinning an existing one is refused.
    assert main(["export", str(runs[architecture]), "--repository", str(repo),
                 "--name", f"tiny-{architecture}", "--version", "1"]) == ExitCode.IO_ERROR
    assert "already exists" in capsys.readouterr().err


def test_parity_gate_fails_on_a_perturbed_model(runs, tmp_path, monkeypatch, capsys):
    real_export = pipeline.export_onnx_in_subprocess

    def export_then_perturb(*args, **kwargs):
        real_export(*args, **kwargs)
        perturb_largest_initializer(args[3], scale=0.05)

    monkeypatch.setattr(pipeline, "export_onnx_in_subprocess", export_then_perturb)
    repo = tmp_path / "repo"
    code = main(["export", str(runs["lstm"]), "--repository", str(repo), "--name", "m",
                 "--json"])
    assert code == ExitCode.GATE_FAILED
    captured = capsys.readouterr()
    assert "parity gate failed" in captured.err and "batch of" in captured.err
    assert json.loads(captured.out)["parity_max_abs_diff"] > 1e-4
    assert versions(repo, "m") == [] and not list((repo / "m").iterdir())


def test_tightened_parity_tolerance_fails(runs, tmp_path):
    with pytest.raises(GateFailure, match="parity gate failed"):
        pipeline.export_run(runs["bow"], tmp_path / "repo", "m",
                            gates=GateSettings(parity_tolerance=1e-15))


def test_fp16_gate_retries_mixed_precision_then_records_it(runs, tmp_path, monkeypatch):
    real_convert = gating.convert_to_fp16

    def broken_unless_mixed(source, target, *, fp32_op_types=None):
        real_convert(source, target, fp32_op_types=fp32_op_types)
        if not fp32_op_types:
            perturb_largest_initializer(target, scale=5.0)

    monkeypatch.setattr(gating, "convert_to_fp16", broken_unless_mixed)
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m")
    assert [a["passed"] for a in result.fp16_attempts] == [False, True]
    fp16 = result.manifest.artifact("fp16")
    assert fp16.passed_gates and "LayerNormalization" in fp16.fp32_op_types


def test_fp16_gate_failure_stops_or_publishes_marked(runs, tmp_path, monkeypatch, capsys):
    real_convert = gating.convert_to_fp16

    def always_broken(source, target, *, fp32_op_types=None):
        real_convert(source, target, fp32_op_types=fp32_op_types)
        perturb_largest_initializer(target, scale=5.0)

    monkeypatch.setattr(gating, "convert_to_fp16", always_broken)
    repo = tmp_path / "repo"
    args = ["export", str(runs["lstm"]), "--repository", str(repo), "--name", "m"]
    assert main([*args, "--json"]) == ExitCode.GATE_FAILED
    captured = capsys.readouterr()
    assert "fp16 gate failed" in captured.err
    assert len(json.loads(captured.out)["fp16_attempts"]) == 2
    assert versions(repo, "m") == []

    assert main([*args, "--allow-fp16-failure"]) == ExitCode.OK
    manifest = latest_version(repo, "m").load_manifest()
    assert manifest.artifact("fp32").passed_gates and not manifest.artifact("fp16").passed_gates


NO_SPEED_GATE = GateSettings(int8_min_speedup=0.0)  # toy models: speed is not the point


def test_int8_gate_tries_each_form_until_one_passes_and_a_failed_int8_is_published_marked(
        runs, tmp_path, monkeypatch):
    forms: list[str] = []

    def ruined(target: Path, source: Path) -> None:  # a quantization that ruins the model
        shutil.copyfile(source, target)
        perturb_largest_initializer(target, scale=5.0)

    real_calibrated, real_blockwise = gating.convert_to_int8_calibrated, gating.convert_to_int8

    def calibrated(source, target, calibration, *, pad_id, attention_blockwise=False):
        forms.append("calibrated+blockwise" if attention_blockwise else "calibrated")
        count = real_calibrated(source, target, calibration, pad_id=pad_id,
                                attention_blockwise=attention_blockwise)
        ruined(target, source)
        return count

    def blockwise(source, target, *, block_size, always=False):
        forms.append(f"block {block_size}")
        count = real_blockwise(source, target, block_size=block_size)
        if block_size > 32 or always:
            ruined(target, source)
        return count

    monkeypatch.setattr(gating, "convert_to_int8_calibrated", calibrated)
    monkeypatch.setattr(gating, "convert_to_int8", blockwise)
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m",
                                 gates=NO_SPEED_GATE)
    assert forms == ["calibrated", "calibrated+blockwise", "block 64", "block 32"]
    assert [a["passed"] for a in result.int8_attempts] == [False, False, False, True]
    int8 = result.manifest.artifact("int8")
    assert int8.passed_gates and result.manifest.evaluation.int8_agreement >= 0.98
    assert int8.quantization == "MatMulNBits 8-bit, block 32, int8 activations per row"
    assert result.int8_attempts[0]["quantization"].startswith(
        "MatMulInteger u8s8, activation scales calibrated on 256 training texts")

    monkeypatch.setattr(gating, "convert_to_int8",
                        lambda s, t, *, block_size: blockwise(s, t, always=True,
                                                              block_size=block_size))
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m",
                                 gates=NO_SPEED_GATE)
    # int8 is an optional speed-up: its failure publishes it marked, the export succeeds.
    assert [a["passed"] for a in result.int8_attempts] == [False] * 4
    assert not result.manifest.artifact("int8").passed_gates
    assert result.manifest.artifact("fp16").passed_gates


def test_an_int8_that_is_not_faster_than_fp32_fails_its_gate(runs, tmp_path):
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m",
                                 gates=GateSettings(int8_min_speedup=1e6))
    assert result.int8_attempts and not any(a["passed"] for a in result.int8_attempts)
    assert all(0 < a["speedup_vs_fp32"] < 1e6 for a in result.int8_attempts)
    assert not result.manifest.artifact("int8").passed_gates
    # ...and auto then serves fp32 on CPU, saying why.
    from service.server.planning import choose_artifact

    artifact, why = choose_artifact(result.manifest, "auto", "cpu")
    assert artifact.precision == "fp32" and "int8 failed its export gates" in why


def test_an_int8_whose_answers_depend_on_batch_mates_fails_its_gate(runs, tmp_path,
                                                                     monkeypatch):
    """What the old dynamic quantization did (one activation scale over the whole batch),
    exaggerated: the int8 graph here shifts every row by the batch's mean, so a text's
    probabilities move with what it is batched with; the batch-invariance gate measures it."""

    def batch_dependent(source, target, *args, **kwargs):
        count = real_convert(source, target, *args, **kwargs)
        make_batch_dependent(target)
        return count

    real_convert = gating.convert_to_int8
    monkeypatch.setattr(gating, "convert_to_int8", batch_dependent)
    # Block-wise only (no calibration texts): the form whose rows really are independent.
    monkeypatch.setattr(pipeline, "calibration_ids", lambda config, train, tokenizer: [])
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m",
                                 gates=NO_SPEED_GATE)
    attempts = result.int8_attempts
    assert [a["passed"] for a in attempts] == [False, False]
    worst = attempts[-1]["batch_invariance"]
    assert worst["max_abs_diff"] > GateSettings().batch_invariance_tolerance
    assert "in a batch of" in worst["worst_case"]
    int8 = result.manifest.artifact("int8")
    assert not int8.passed_gates and int8.batch_max_abs_diff > 2e-3
    # fp32 and fp16 hold: the same gate, on the same batches.
    assert result.manifest.artifact("fp32").batch_max_abs_diff <= 2e-3


def make_batch_dependent(path: Path) -> None:
    """Add to the logits a term proportional to (batch mean - row) of their first column."""
    model = onnx.load(str(path))
    graph = model.graph
    logits = graph.output[0].name
    inner = f"{logits}_before"
    for node in graph.node:
        node.output[:] = [inner if name == logits else name for name in node.output]
    helper = onnx.helper
    graph.initializer.append(numpy_helper.from_array(np.array(3.0, np.float32), "batch_gain"))
    graph.node.extend([
        helper.make_node("ReduceMean", [inner], ["batch_mean"], axes=[0], keepdims=1),
        helper.make_node("Sub", ["batch_mean", inner], ["batch_shift"]),
        helper.make_node("Mul", ["batch_shift", "batch_gain"], ["batch_term"]),
        helper.make_node("Add", [inner, "batch_term"], [logits]),
    ])
    opset = next(o for o in model.opset_import if o.domain in ("", "ai.onnx"))
    if opset.version >= 18:  # ReduceMean takes its axes as an input from opset 18
        graph.node[-4].CopyFrom(helper.make_node("ReduceMean", [inner, "batch_axes"],
                                                 ["batch_mean"], keepdims=1))
        graph.initializer.append(numpy_helper.from_array(np.array([0], np.int64),
                                                         "batch_axes"))
    onnx.save(model, str(path))


def test_manifest_validation_errors_name_the_field(runs, tmp_path, capsys):
    repo = tmp_path / "repo"
    pipeline.export_run(runs["bow"], repo, "m")
    path = repo / "m" / "1" / "manifest.json"
    data = json.loads(path.read_text())
    data["artifacts"][0]["sha256"] = 12
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"artifacts\.0\.sha256"):
        Manifest.load(path)
    assert main(["repo", "show", "m", "--repository", str(repo)]) == ExitCode.DATA_ERROR
    assert "artifacts.0.sha256" in capsys.readouterr().err

    data["labels"] = ["only-one"]
    data["artifacts"][0]["sha256"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="labels"):
        Manifest.load(path)
    assert main(["repo", "list", "--repository", str(repo)]) == ExitCode.OK
    assert "INVALID" in capsys.readouterr().out


def test_killed_export_leaves_no_visible_version(runs, tmp_path):
    repo = tmp_path / "repo"
    process = subprocess.Popen(
        [sys.executable, "-m", "service.cli.main", "export", str(runs["transformer"]),
         "--repository", str(repo), "--name", "m"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if list(repo.glob("m/.tmp-*/model.fp32.onnx")):
                break
            assert process.poll() is None, "export finished before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the export never started writing")
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    assert versions(repo, "m") == [] and latest_version(repo, "m") is None
    assert all(p.name.startswith(".tmp-") for p in (repo / "m").iterdir())


def test_concurrent_publishes_get_distinct_versions(tmp_path):
    repo = tmp_path / "repo"
    numbers: list[int] = []
    barrier = threading.Barrier(8)

    def write_manifest_stub(directory: Path, number: int) -> None:
        (directory / "manifest.json").write_text(json.dumps({"version": number}))

    def worker() -> None:
        staging = staging_directory(repo, "m")
        barrier.wait()
        number, _ = publish(staging, repo, "m", finalize=write_manifest_stub)
        numbers.append(number)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert sorted(numbers) == list(range(1, 9))
    for number in numbers:
        written = json.loads((repo / "m" / str(number) / "manifest.json").read_text())
        assert written["version"] == number
    with pytest.raises(VersionExistsError):
        publish(staging_directory(repo, "m"), repo, "m", version=3)


def test_gates_fail_on_nan_outputs(runs, tmp_path, monkeypatch):
    """NaN compares false against any tolerance, and argmax calls a NaN row label 0: both gates
    must treat non-finite outputs as failures, not as agreement."""
    real_export = pipeline.export_onnx_in_subprocess

    def export_then_poison(*args, **kwargs):
        real_export(*args, **kwargs)
        perturb_largest_initializer(args[3], scale=float("nan"))

    monkeypatch.setattr(pipeline, "export_onnx_in_subprocess", export_then_poison)
    with pytest.raises(GateFailure, match="parity gate failed") as parity:
        pipeline.export_run(runs["bow"], tmp_path / "repo", "m")
    assert parity.value.report["parity_max_abs_diff"] == float("inf")
    monkeypatch.undo()

    real_convert = gating.convert_to_fp16

    def nan_fp16(source, target, *, fp32_op_types=None):
        real_convert(source, target, fp32_op_types=fp32_op_types)
        perturb_largest_initializer(target, scale=float("nan"))

    monkeypatch.setattr(gating, "convert_to_fp16", nan_fp16)
    with pytest.raises(GateFailure, match="fp16 gate failed") as fp16:
        pipeline.export_run(runs["bow"], tmp_path / "repo", "m")
    attempts = fp16.value.report["fp16_attempts"]
    assert [a["passed"] for a in attempts] == [False, False]
    assert all(a["non_finite_rows"] == 60 for a in attempts)
    assert versions(tmp_path / "repo", "m") == []


def test_export_refuses_a_data_file_changed_since_training(runs, tmp_path, capsys):
    import shutil

    from export.config import RunConfig

    run_dir = Path(shutil.copytree(runs["bow"], tmp_path / "run"))
    config = RunConfig.load(run_dir)
    assert Path(config.data.source).is_absolute() and config.data_sha256
    data = Path(shutil.copyfile(config.data.source, tmp_path / "data.csv"))
    config.model_copy(update={"data": config.data.model_copy(
        update={"source": str(data)})}).save(run_dir)
    with data.open("a", encoding="utf-8") as handle:
        handle.write("9999,an extra review added after training,pos\n")
    code = main(["export", str(run_dir), "--repository", str(tmp_path / "repo"), "--name", "m"])
    assert code == ExitCode.DATA_ERROR
    assert "not the file the run was trained on" in capsys.readouterr().err
    assert versions(tmp_path / "repo", "m") == []
