"""``seqserve doctor``: for real on this machine's CPU; the CUDA branches with a fake GPU."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import onnxruntime as ort
import pytest
from harness.cli import run_cli
from harness.fake_gpu import FakeCudaFactory, library_report
from harness.server import server_settings
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.cli.doctor import DEVICE_NOT_HONOURED, exit_code
from service.repo.layout import latest_version
from service.server.cuda_libraries import probe
from service.server.doctor import run_doctor
from service.server.doctor_text import render
from service.server.planning import choose_artifact
from service.server.sessions import CPU, CUDA

CUDA_WORKS_HERE = CUDA in ort.get_available_providers() and probe().usable
no_gpu_only = pytest.mark.skipif(CUDA_WORKS_HERE, reason="this machine has a working GPU")


def _doctor(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = run_cli(["doctor", *argv])
    return code, capsys.readouterr().out


def test_doctor_on_this_machine_reports_every_model_and_precision(
        tiny_repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _doctor(capsys, "--repository", str(tiny_repository), "--runs", "1", "--json")
    report = json.loads(out)
    assert code == report["exit_code"] == 0 and report["honoured"]
    assert report["onnxruntime"]["version"] == ort.__version__
    assert [m["name"] for m in report["models"]] == [LSTM_NAME, TRANSFORMER_NAME]
    for model in report["models"]:
        manifest = latest_version(tiny_repository, model["name"]).load_manifest()
        precisions = {p["precision"]: p for p in model["precisions"]}
        assert set(precisions) == {a.precision for a in manifest.artifacts}
        assert {"fp32", "fp16"} <= set(precisions)
        device = "cuda:0" if CUDA_WORKS_HERE else "cpu"
        assert precisions["fp32"]["device"] == device and not precisions["fp32"]["error"]
        assert precisions["fp32"]["placement"]["nodes"]  # ORT told where every node went
        for lower in set(precisions) - {"fp32"}:
            figures = precisions[lower]["vs_fp32"]
            assert figures["examples"] == manifest.evaluation_slice.examples
            assert figures["agreement"] >= 0.95 and figures["non_finite_rows"] == 0
        # Only lengths the model takes: both tiny models stop below 64 tokens.
        assert set(precisions["fp32"]["latency_ms"]) == {"1x16", "8x16", "32x16"}
        assert all(ms > 0 for ms in precisions["fp32"]["latency_ms"].values())
        on_cpu = choose_artifact(manifest, "auto", "cpu")[0].precision  # the server's choice
        assert model["served"].startswith("fp16 on cuda" if CUDA_WORKS_HERE
                                          else f"{on_cpu} on cpu")


@no_gpu_only
def test_without_cuda_the_doctor_explains_why_in_one_screen(
        tiny_repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _doctor(capsys, "--repository", str(tiny_repository), "--runs", "0")
    assert code == 0  # auto is honoured: it falls back to CPU
    lines = out.splitlines()
    assert len(lines) <= 40
    verdict = next(line for line in lines if line.startswith("CUDA is not used: "))
    if CUDA in ort.get_available_providers():
        report = probe()
        assert report.reason() in verdict
        assert all(f"MISSING {s.library.soname}" in out for s in report.missing)
    else:
        assert "has no CUDAExecutionProvider" in verdict
    assert "models run on CPU in fp32" in out and "To use CUDA: " in out


@no_gpu_only
def test_device_cuda_that_cannot_be_honoured_exits_non_zero(
        tiny_repository: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _doctor(capsys, "--repository", str(tiny_repository), "--runs", "0",
                        "--device", "cuda", "--model", LSTM_NAME)
    assert code == DEVICE_NOT_HONOURED == 8
    assert "--device cuda cannot be honoured" in out
    code, out = _doctor(capsys, "--repository", str(tiny_repository), "--runs", "0", "--json",
                        "--device", "cuda", "--model", LSTM_NAME)
    report = json.loads(out)
    assert code == report["exit_code"] == 8 and not report["cuda"]["usable"]
    assert report["cuda"]["reason"]


def test_device_cpu_and_usage_errors(tiny_repository: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _doctor(capsys, "--repository", str(tiny_repository), "--runs", "0",
                        "--device", "cpu", "--model", TRANSFORMER_NAME)
    assert code == 0 and "not asked for (--device cpu)" in out
    assert f"{TRANSFORMER_NAME} v1" in out and LSTM_NAME not in out
    assert run_cli(["doctor", "--repository", str(tiny_repository / "nope")]) == 3
    assert run_cli(["doctor", "--runs", "-1"]) == 2
    assert run_cli(["doctor", "--device", "tpu"]) == 2


# --- the CUDA branches, with a fake GPU -----------------------------------------------------


def _fake_doctor(repo: Path, factory: FakeCudaFactory, device: str = "cuda"):
    return run_doctor(server_settings(repo, device=device, precision="auto"), runs=1,
                      models=[LSTM_NAME,
                                                                            TRANSFORMER_NAME],
                      factory=factory, probe=library_report, available=[CUDA, CPU])


def test_on_a_working_gpu_fp16_is_re_gated_there_and_served(tiny_repository: Path) -> None:
    report = _fake_doctor(tiny_repository, FakeCudaFactory(perturb={"fp16": 1e-3}))
    assert report.cuda_usable and report.honoured and exit_code(report) == 0
    for model in report.models:
        assert model.served.startswith("fp16 on cuda:0")
        fp16 = next(p for p in model.precisions if p.precision == "fp16")
        assert fp16.device == "cuda:0" and fp16.vs_fp32 is not None
        assert fp16.placement.nodes[CUDA] > fp16.placement.nodes[CPU] > 0
    assert "CUDA is usable." in render(report)


def test_fp16_that_fails_on_the_gpu_is_reported_as_served_in_fp32(tiny_repository: Path) -> None:
    report = _fake_doctor(tiny_repository, FakeCudaFactory(perturb={"fp16": 1.0}))
    assert all(m.served.startswith("fp32 on cuda:0 (fp16: its re-gate fails")
               for m in report.models)
    assert report.honoured  # fp32 on CUDA is still CUDA


@pytest.mark.parametrize("factory, problem", [
    (FakeCudaFactory(cpu_ops=frozenset({"MatMul"})), "compute ops on CPU (MatMul"),
    (FakeCudaFactory("cpu"), "onnxruntime created a CPU session"),
    (FakeCudaFactory("run-fails"), "CUDNN_STATUS_NOT_INITIALIZED"),
], ids=["placement", "silent-cpu-session", "first-run-fails"])
def test_what_serve_device_cuda_would_refuse_makes_the_doctor_fail(
        tiny_repository: Path, factory: FakeCudaFactory, problem: str) -> None:
    report = _fake_doctor(tiny_repository, factory)
    assert not report.honoured and exit_code(report) == DEVICE_NOT_HONOURED
    assert any(problem in p for m in report.models for p in m.problems)
    assert "would refuse under --device cuda" in render(report)
    assert exit_code(_fake_doctor(tiny_repository, factory, device="auto")) == 0


@pytest.mark.parametrize("factory", [
    FakeCudaFactory(perturb={"fp16": 1e-3}),
    FakeCudaFactory(perturb={"fp16": 1.0}),
    FakeCudaFactory(fails={"fp16": "raises"}),
    FakeCudaFactory(fails={"fp16": "run-fails"}),
    FakeCudaFactory("raises"),
    FakeCudaFactory("cpu"),
], ids=["fp16", "fp16-fails-its-re-gate", "fp16-fails-at-creation", "fp16-fails-to-run",
        "every-session-fails", "silent-cpu-session"])
@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_the_doctor_predicts_the_servers_cuda_chain(tiny_repository: Path,
                                                    factory: FakeCudaFactory,
                                                    device: str) -> None:
    """The doctor walks the server's plan (CUDA fp16, CUDA fp32, CPU): same outcome."""
    from service.server.runtime import LoadError, SessionBuilder, load_version

    report = _fake_doctor(tiny_repository, factory, device=device)
    settings = server_settings(tiny_repository, device=device, precision="auto")
    for model in report.models:
        builder = SessionBuilder(settings, factory, [CUDA, CPU], probe_libraries=library_report)
        try:
            session = load_version(latest_version(tiny_repository, model.name), settings,
                                   builder).session
        except LoadError:
            assert model.served.startswith("nothing") and model.problems
            continue
        assert model.served.startswith(f"{session.precision} on {session.device}")
        if session.selection.fallback_reason:  # on CPU: the CUDA steps the server named
            steps = re.compile(r"(?:^|; )(fp16|fp32): ")
            named = model.served.split("(CUDA failed: ", 1)[1]
            assert steps.findall(named) == steps.findall(session.selection.fallback_reason)
        if "failed on CUDA" in session.selection.precision_reason:
            assert any("failed on CUDA" in warning for warning in model.warnings)


def test_fp16_failing_on_cuda_is_a_warning_not_a_refusal(tiny_repository: Path) -> None:
    report = _fake_doctor(tiny_repository, FakeCudaFactory(fails={"fp16": "raises"}))
    assert report.honoured and exit_code(report) == 0
    for model in report.models:
        assert model.served.startswith("fp32 on cuda:0 — fp32: fp16 failed on CUDA (session: ")
        assert model.problems == []
        assert model.warnings[0].startswith("fp16 failed on CUDA: session: RuntimeError")
    assert "    warning: fp16 failed on CUDA" in render(report)


def test_compute_ops_on_cpu_are_a_warning_under_auto(tiny_repository: Path) -> None:
    factory = FakeCudaFactory(cpu_ops=frozenset({"MatMul"}))
    report = _fake_doctor(tiny_repository, factory, device="auto")
    transformer = next(m for m in report.models if m.name == TRANSFORMER_NAME)
    assert transformer.served.startswith("fp16 on cuda:0")
    assert any(w.startswith("fp16: compute ops on CPU (MatMul") for w in transformer.warnings)
    assert any(p.startswith("fp16: compute ops on CPU (MatMul") for p in transformer.problems)
    text = render(report)
    assert "    warning: fp16: compute ops on CPU (MatMul" in text
    assert "Memcpy node(s) between CPU and CUDA" in text  # the copies ORT inserted
    fp16 = next(p for p in transformer.to_dict()["precisions"] if p["precision"] == "fp16")
    assert fp16["placement"]["memcpy_nodes"] > 0
    assert transformer.to_dict()["warnings"] == transformer.warnings


def test_the_doctor_pins_tf32_before_the_cuda_libraries_load(
        tiny_repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.server.sessions import TF32_OVERRIDE

    monkeypatch.setenv(TF32_OVERRIDE, "placeholder")
    monkeypatch.delenv(TF32_OVERRIDE)  # restored to the process's own value afterwards
    seen: list[str | None] = []

    def probe():
        seen.append(os.environ.get(TF32_OVERRIDE))
        return library_report()

    run_doctor(server_settings(tiny_repository, device="cuda", precision="auto"), runs=0,
               models=[LSTM_NAME], factory=FakeCudaFactory(), probe=probe,
               available=[CUDA, CPU])
    assert seen == ["0"]
