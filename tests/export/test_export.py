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
from service.repo.manifest import Manifest, ManifestError, sha256_file

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
    assert [a.precision for a in manifest.artifacts] == ["fp32", "fp16", "int8"]
    for artifact in manifest.artifacts:
        assert sha256_file(model_version.directory / artifact.file) == artifact.sha256
        assert artifact.passed_gates and artifact.opset >= 18
    evaluation = manifest.evaluation
    assert evaluation.fp32.accuracy > 0.9 and evaluation.fp16_agreement >= 0.995
    assert evaluation.int8_agreement >= 0.98 and evaluation.int8 is not None
    assert manifest.schema_version == 2 and manifest.source.kind == "trained"
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


def test_int8_gate_retries_with_fewer_ops_and_a_failed_int8_is_published_marked(
        runs, tmp_path, monkeypatch):
    real_convert = gating.convert_to_int8
    calls: list[list[str] | None] = []

    def broken_unless_limited(source, target, *, op_types=None, always=False):
        calls.append(op_types)
        real_convert(source, target, op_types=op_types)
        if op_types is None or always:  # a quantization that ruins the model
            shutil.copyfile(source, target)
            perturb_largest_initializer(target, scale=5.0)

    monkeypatch.setattr(gating, "convert_to_int8", broken_unless_limited)
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m")
    assert [a["passed"] for a in result.int8_attempts] == [False, True]
    assert calls == [None, GateSettings().int8_retry_op_types]
    int8 = result.manifest.artifact("int8")
    assert int8.passed_gates and result.manifest.evaluation.int8_agreement >= 0.98

    monkeypatch.setattr(gating, "convert_to_int8",
                        lambda s, t, *, op_types=None: broken_unless_limited(s, t, always=True,
                                                                             op_types=op_types))
    result = pipeline.export_run(runs["transformer"], tmp_path / "repo", "m")
    # int8 is an optional speed-up: its failure publishes it marked, the export succeeds.
    assert [a["passed"] for a in result.int8_attempts] == [False, False]
    assert not result.manifest.artifact("int8").passed_gates
    assert result.manifest.artifact("fp16").passed_gates


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
