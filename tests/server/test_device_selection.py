"""Every way CUDA can fail a model, and what each does under ``--device auto`` and ``cuda``.

The GPU is faked (``harness.fake_gpu``): its sessions run the real tiny models on CPU and report
what onnxruntime-gpu reports. The fp16 re-gate therefore measures real probabilities, and a
fake fp16 that computes differently (``perturb``) must lose it.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from harness.fake_gpu import FakeCudaFactory, library_report
from harness.server import server_settings
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.client import from_model_info
from service.repo.layout import latest_version
from service.repo.manifest import MANIFEST_FILE
from service.server.cuda_libraries import DriverStatus
from service.server.metrics import ModelLabels, ServingMetrics
from service.server.planning import choose_artifact
from service.server.registry import ModelRegistry
from service.server.runtime import (
    CPU,
    CUDA,
    LoadedVersion,
    LoadError,
    SessionBuilder,
)
from service.server.runtime import load_version as real_load_version
from service.server.transport.native import to_model_info


def _builder(repo: Path, factory: FakeCudaFactory, *, report: Any = None,
             **settings: Any) -> SessionBuilder:
    reports = report if callable(report) else (lambda: report or library_report())
    return SessionBuilder(server_settings(repo, **({"device": "auto", "precision": "auto"}
                                                   | settings)), factory,
                          [CUDA, CPU], probe_libraries=reports)


def _load(repo: Path, builder: SessionBuilder, name: str = LSTM_NAME) -> LoadedVersion:
    return real_load_version(latest_version(repo, name), builder.settings, builder)


# --- the fp16 re-gate on the device ---------------------------------------------------------


@pytest.mark.parametrize("name", [LSTM_NAME, TRANSFORMER_NAME])
def test_fp16_that_agrees_on_the_device_is_served(tiny_repository: Path, name: str) -> None:
    factory = FakeCudaFactory(perturb={"fp16": 1e-3})  # close to fp32, not identical
    loaded = _load(tiny_repository, _builder(tiny_repository, factory), name)
    session, gate = loaded.session, loaded.session.selection.gate
    assert (session.device, session.precision) == ("cuda:0", "fp16")
    assert gate is not None and gate.passed and gate.chosen == "fp16"
    assert gate.comparison is not None and gate.comparison.agreement >= 0.995
    assert gate.comparison.examples == loaded.manifest.evaluation_slice.examples
    assert 0 < gate.comparison.max_abs_diff < 0.01
    # The device's fp32 is the export's fp32 (the fake runs the same kernels on CPU).
    assert gate.fp32_vs_export_max_abs_diff is not None
    assert gate.fp32_vs_export_max_abs_diff < 1e-5


def test_fp16_that_disagrees_on_the_device_falls_back_to_fp32_on_cuda(
        tiny_repository: Path) -> None:
    factory = FakeCudaFactory(perturb={"fp16": 1.0})  # flips the label of every other text
    loaded = _load(tiny_repository, _builder(tiny_repository, factory))
    session, gate = loaded.session, loaded.session.selection.gate
    assert (session.device, session.precision) == ("cuda:0", "fp32")
    assert gate is not None and not gate.passed and gate.chosen == "fp32"
    assert gate.comparison is not None and gate.comparison.agreement < 0.8
    assert "serving fp32" in gate.detail
    # The fp32 session that served as the reference is the one served: no third session.
    assert factory.calls == [("cuda", "model.fp16.onnx"), ("cuda", "model.fp32.onnx")]
    info = to_model_info(_view(loaded))
    assert info.precision == "fp32" and info.device_gate.candidate_precision == "fp16"
    assert not info.device_gate.passed and info.device_gate.agreement < 0.8
    assert info.device_gate.min_agreement == pytest.approx(0.995)


def test_the_gate_thresholds_are_settings(tiny_repository: Path) -> None:
    factory = FakeCudaFactory(perturb={"fp16": 1.0})
    builder = _builder(tiny_repository, factory, device_gate_min_agreement=0.0,
                       device_gate_max_accuracy_drop=1.0)
    assert _load(tiny_repository, builder).session.precision == "fp16"


def test_without_an_evaluation_slice_fp16_stays_unproven_and_fp32_is_served(
        repository_copy: Path) -> None:
    manifest_path = latest_version(repository_copy, LSTM_NAME).manifest_path
    document = json.loads(manifest_path.read_text())
    document["evaluation_slice"] = None
    manifest_path.write_text(json.dumps(document))
    loaded = _load(repository_copy, _builder(repository_copy, FakeCudaFactory()))
    gate = loaded.session.selection.gate
    assert (loaded.session.device, loaded.session.precision) == ("cuda:0", "fp32")
    assert gate is not None and gate.comparison is None and "no evaluation slice" in gate.detail


def test_a_forced_precision_is_served_without_a_re_gate(tiny_repository: Path) -> None:
    factory = FakeCudaFactory(perturb={"fp16": 1.0})
    loaded = _load(tiny_repository, _builder(tiny_repository, factory, precision="fp16"))
    assert (loaded.session.device, loaded.session.precision) == ("cuda:0", "fp16")
    assert loaded.session.selection.gate is None
    assert factory.calls == [("cuda", "model.fp16.onnx")]


# --- libraries, sessions and runs that fail -------------------------------------------------


def test_a_missing_library_is_named_and_cuda_is_not_even_tried(tiny_repository: Path) -> None:
    calls: list[int] = []

    def probe() -> Any:
        calls.append(1)
        return library_report(missing=("libcublasLt.so.13",))

    factory = FakeCudaFactory()
    builder = _builder(tiny_repository, factory, report=probe)
    first = _load(tiny_repository, builder).session
    second = _load(tiny_repository, builder, TRANSFORMER_NAME).session
    for session, name in ((first, LSTM_NAME), (second, TRANSFORMER_NAME)):
        # On the CPU fallback, what auto serves on CPU (int8 where its gates passed).
        manifest = latest_version(tiny_repository, name).load_manifest()
        expected = choose_artifact(manifest, "auto", "cpu")[0].precision
        assert (session.device, session.precision) == ("cpu", expected)
        assert "libcublasLt.so.13" in session.selection.fallback_reason
        assert "nvidia-cublas" in session.selection.fallback_reason
        assert session.selection.fallback_kind == "missing_cuda_library"
        assert ("libcublasLt.so.13", False) in session.selection.libraries
    assert all(device == "cpu" for device, _ in factory.calls)
    assert len(calls) == 1  # probed once; the machine's verdict is remembered
    builder.retry_cuda()
    _load(tiny_repository, builder)
    assert len(calls) == 2


def test_device_cuda_refuses_a_model_naming_the_missing_library(tiny_repository: Path) -> None:
    builder = _builder(tiny_repository, FakeCudaFactory(), device="cuda",
                       report=library_report(missing=("libcudnn.so.9",)))
    with pytest.raises(LoadError, match=r"device=cuda requested.*libcudnn\.so\.9"):
        _load(tiny_repository, builder)


@pytest.mark.parametrize("report, kind", [
    (library_report(missing=("libcuda.so.1",)), "no_gpu_driver"),
    (library_report(driver=DriverStatus(12040, 1)), "cuda_driver_error"),
    (library_report(driver=DriverStatus(13000, 0, "CUDA_ERROR_NO_DEVICE (100) from cuInit")),
     "cuda_driver_error"),
], ids=["no-driver", "driver-too-old", "no-device"])
def test_driver_problems_fall_back_with_their_reason(tiny_repository: Path, report: Any,
                                                     kind: str) -> None:
    session = _load(tiny_repository, _builder(tiny_repository, FakeCudaFactory(),
                                              report=report)).session
    assert session.device == "cpu" and session.selection.fallback_kind == kind
    assert session.selection.fallback_reason == report.reason()


def test_a_silent_cpu_session_is_caught_and_remembered(tiny_repository: Path) -> None:
    factory = FakeCudaFactory("cpu")
    builder = _builder(tiny_repository, factory)
    session = _load(tiny_repository, builder).session
    assert session.device == "cpu" and session.selection.fallback_kind == "cuda_session_on_cpu"
    _load(tiny_repository, builder, TRANSFORMER_NAME)
    assert [device for device, _ in factory.calls].count("cuda") == 1


def test_an_error_creating_one_session_does_not_condemn_the_gpu(tiny_repository: Path) -> None:
    factory = FakeCudaFactory("raises")
    builder = _builder(tiny_repository, factory)
    session = _load(tiny_repository, builder).session
    assert session.device == "cpu" and session.selection.fallback_kind == "cuda_session_error"
    assert "out of memory" in session.selection.fallback_reason
    _load(tiny_repository, builder, TRANSFORMER_NAME)  # the next model tries CUDA again
    assert [device for device, _ in factory.calls].count("cuda") == 4  # fp16, fp32 each


# --- the fallback chain: CUDA fp16, CUDA fp32, CPU ------------------------------------------


@pytest.mark.parametrize("mode, why", [
    ("raises", "creating the CUDA session failed: RuntimeError: CUDA failure 2: out of memory"),
    ("run-fails", "failed on CUDA running the evaluation slice: RuntimeError: CUDNN failure"),
], ids=["at-creation", "at-the-re-gate"])
@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_fp16_that_fails_on_cuda_is_followed_by_fp32_on_cuda(tiny_repository: Path, mode: str,
                                                             why: str, device: str) -> None:
    factory = FakeCudaFactory(fails={"fp16": mode})
    loaded = _load(tiny_repository, _builder(tiny_repository, factory, device=device))
    session = loaded.session
    assert (session.device, session.precision) == ("cuda:0", "fp32")
    assert session.selection.fallback_reason == "" and not session.fell_back_from_cuda
    reason = session.selection.precision_reason
    assert reason.startswith(f"fp32: fp16 failed on CUDA ({why}")
    assert reason.endswith("); the reference precision")
    assert factory.calls[-1] == ("cuda", "model.fp32.onnx")
    assert all(device == "cuda" for device, _ in factory.calls)
    assert to_model_info(_view(loaded)).precision_reason == reason


def test_when_fp32_fails_on_cuda_too_each_step_is_named(tiny_repository: Path) -> None:
    factory = FakeCudaFactory(fails={"fp16": "raises", "fp32": "run-fails"})
    session = _load(tiny_repository, _builder(tiny_repository, factory)).session
    assert session.device == "cpu" and session.selection.fallback_kind == "cuda_run_error"
    reason = session.selection.fallback_reason
    assert reason.startswith("fp16: creating the CUDA session failed: RuntimeError: CUDA")
    assert "; fp32: failed on CUDA at warm-up: RuntimeError: CUDNN failure" in reason
    assert factory.calls == [("cuda", "model.fp16.onnx"), ("cuda", "model.fp32.onnx"),
                             ("cpu", "model.fp32.onnx")]
    with pytest.raises(LoadError, match=r"device=cuda requested but CUDA cannot serve it: "
                                        r"fp16: creating.*; fp32: failed on CUDA at warm-up"):
        _load(tiny_repository, _builder(tiny_repository, factory, device="cuda"))


def test_a_forced_precision_that_fails_on_cuda_is_not_substituted(tiny_repository: Path) -> None:
    factory = FakeCudaFactory(fails={"fp16": "raises"})
    session = _load(tiny_repository, _builder(tiny_repository, factory,
                                              precision="fp16")).session
    assert (session.device, session.precision) == ("cpu", "fp16")
    assert factory.calls == [("cuda", "model.fp16.onnx"), ("cpu", "model.fp16.onnx")]
    with pytest.raises(LoadError, match="fp16: creating the CUDA session failed"):
        _load(tiny_repository, _builder(tiny_repository, factory, precision="fp16",
                                        device="cuda"))


def test_a_failed_fp32_reference_is_not_tried_again(tiny_repository: Path) -> None:
    """fp16's re-gate opens fp32 on CUDA: when that fails, the fp32 step is already known."""
    factory = FakeCudaFactory(fails={"fp32": "raises"})
    session = _load(tiny_repository, _builder(tiny_repository, factory)).session
    assert session.device == "cpu"
    assert session.selection.fallback_reason.startswith("fp32: creating the CUDA session")
    assert factory.calls == [("cuda", "model.fp16.onnx"), ("cuda", "model.fp32.onnx"),
                             ("cpu", "model.fp32.onnx")]


@pytest.mark.parametrize("precision", ["auto", "fp16"], ids=["at-the-re-gate", "at-warm-up"])
def test_a_session_that_fails_on_its_first_run_is_a_cuda_failure(tiny_repository: Path,
                                                                 precision: str) -> None:
    """cuDNN opens lazily: the session creates fine and fails when it first runs."""
    factory = FakeCudaFactory("run-fails")
    session = _load(tiny_repository, _builder(tiny_repository, factory,
                                              precision=precision)).session
    assert (session.device, session.precision) == ("cpu", precision.replace("auto", "fp32"))
    assert session.selection.fallback_kind == "cuda_run_error"
    assert "CUDNN_STATUS_NOT_INITIALIZED" in session.selection.fallback_reason
    builder = _builder(tiny_repository, factory, precision=precision, device="cuda")
    with pytest.raises(LoadError, match="CUDNN_STATUS_NOT_INITIALIZED"):
        _load(tiny_repository, builder)


# --- node placement -------------------------------------------------------------------------


def test_shape_ops_on_cpu_are_fine_even_under_device_cuda(tiny_repository: Path) -> None:
    for name in (LSTM_NAME, TRANSFORMER_NAME):
        loaded = _load(tiny_repository, _builder(tiny_repository, FakeCudaFactory(),
                                                 device="cuda"), name)
        placement = loaded.session.selection.placement
        assert placement.nodes[CPU] > 0 and placement.nodes[CUDA] > placement.nodes[CPU]
        assert placement.cpu_compute_nodes == []


def test_compute_ops_on_cpu_are_refused_under_cuda_and_reported_under_auto(
        tiny_repository: Path) -> None:
    factory = FakeCudaFactory(cpu_ops=frozenset({"MatMul"}))
    with pytest.raises(LoadError, match=r"placed compute ops on CPU.*MatMul"):
        _load(tiny_repository, _builder(tiny_repository, factory, device="cuda"),
              TRANSFORMER_NAME)
    loaded = _load(tiny_repository, _builder(tiny_repository, factory), TRANSFORMER_NAME)
    assert loaded.session.device == "cuda:0"
    selection = loaded.session.selection
    nodes = selection.placement.cpu_compute_nodes
    assert nodes and all(node.startswith("MatMul ") for node in nodes)
    # Said where an operator looks: the precision reason, the copies ORT put around them.
    assert f"; compute ops on CPU: {nodes[0]}" in selection.precision_reason
    assert selection.placement.memcpy_nodes == 2 * len(nodes)
    assert f"{2 * len(nodes)} Memcpy node(s)" in selection.placement.summary()
    info = to_model_info(_view(loaded))
    assert list(info.cpu_compute_nodes) == nodes
    assert info.precision_reason == selection.precision_reason
    assert info.memcpy_nodes == 2 * len(nodes)
    assert from_model_info(info).memcpy_nodes == 2 * len(nodes)  # the client reads it
    assert {p.provider for p in info.placement} == {CPU, CUDA}
    metrics = ServingMetrics()
    labels = {"model": TRANSFORMER_NAME, "version": "1", "architecture": "transformer",
              "precision": loaded.session.precision, "device": "cuda:0"}
    metrics.model(ModelLabels(**labels)).device_selected(selection)
    sample = metrics.registry.get_sample_value
    assert sample("seqserve_cpu_compute_nodes", labels) == len(nodes)
    assert sample("seqserve_memcpy_nodes", labels) == 2 * len(nodes)
    metrics.remove_model(ModelLabels(**labels))  # a swapped-out version's series go with it
    assert sample("seqserve_memcpy_nodes", labels) is None


def test_the_embedding_gather_on_cpu_is_compute_but_shape_gathers_are_not(
        tiny_repository: Path) -> None:
    factory = FakeCudaFactory(cpu_ops=frozenset({"Gather"}))
    loaded = _load(tiny_repository, _builder(tiny_repository, factory))
    assert loaded.session.selection.placement.cpu_compute_nodes == ["Gather node_embedding"]


# --- SIGHUP retries CUDA; metrics -----------------------------------------------------------


def test_sighup_moves_a_model_that_fell_back_onto_cuda(tiny_repository: Path) -> None:
    reports = [library_report(missing=("libcurand.so.10",))]
    builder = _builder(tiny_repository, FakeCudaFactory(), report=lambda: reports[-1],
                       model_versions={LSTM_NAME: 1})
    metrics = ServingMetrics()
    registry = ModelRegistry(builder.settings, metrics, builder)
    sample = metrics.registry.get_sample_value
    labels = {"model": LSTM_NAME, "version": "1", "architecture": "lstm"}
    cpu = labels | {"precision": "fp32", "device": "cpu"}
    gpu = labels | {"precision": "fp16", "device": "cuda:0"}

    async def scenario() -> list[str]:
        devices = []
        await registry.scan()
        devices.append(registry.get(LSTM_NAME).device)
        assert sample("seqserve_device_fallback", cpu | {"reason": "missing_cuda_library"}) == 1
        assert sample("seqserve_cuda_library_missing", {"library": "libcurand.so.10"}) == 1
        assert sample("seqserve_cuda_library_missing", {"library": "libcudart.so.13"}) == 0
        first = registry.get(LSTM_NAME)
        await registry.scan(retry_failed=True)  # still missing: nothing is reloaded
        assert registry.get(LSTM_NAME) is first
        reports.append(library_report())  # the library was installed
        await registry.scan()  # a plain poll does not retry CUDA
        devices.append(registry.get(LSTM_NAME).device)
        await registry.scan(retry_failed=True)
        devices.append(registry.get(LSTM_NAME).device)
        await registry.close()  # lets the CPU version's retirement finish
        return devices

    assert asyncio.run(scenario()) == ["cpu", "cpu", "cuda:0"]
    assert sample("seqserve_device_gate_passed", gpu | {"candidate": "fp16"}) == 1
    assert sample("seqserve_device_gate_agreement", gpu | {"candidate": "fp16"}) == 1.0
    assert sample("seqserve_cpu_compute_nodes", gpu) == 0
    assert sample("seqserve_memcpy_nodes", gpu) == 0
    assert sample("seqserve_cuda_library_missing", {"library": "libcurand.so.10"}) == 0
    assert sample("seqserve_device_fallback", cpu | {"reason": "missing_cuda_library"}) is None


def test_a_retry_that_lands_on_cpu_again_keeps_the_serving_version(
        tiny_repository: Path) -> None:
    factory = FakeCudaFactory("raises")  # the GPU's memory is taken, say
    builder = _builder(tiny_repository, factory, model_versions={LSTM_NAME: 1})
    metrics = ServingMetrics()
    registry = ModelRegistry(builder.settings, metrics, builder)
    cpu = {"model": LSTM_NAME, "version": "1", "architecture": "lstm", "precision": "fp32",
           "device": "cpu", "reason": "cuda_session_error"}

    def cuda_calls() -> int:
        return [device for device, _ in factory.calls].count("cuda")

    async def scenario() -> None:
        await registry.scan()
        first, tried = registry.get(LSTM_NAME), cuda_calls()
        await registry.scan(retry_failed=True)
        assert cuda_calls() == 2 * tried  # every model that fell back tried CUDA again...
        assert registry.get(LSTM_NAME) is first  # ...failed again: no swap, no churn
        await registry.close()

    asyncio.run(scenario())
    assert metrics.registry.get_sample_value("seqserve_device_fallback", cpu) == 1


def _view(loaded: LoadedVersion) -> Any:
    from types import SimpleNamespace

    served = SimpleNamespace(
        loaded=loaded, name=loaded.manifest.name, version=loaded.manifest.version,
        architecture=loaded.manifest.architecture, precision=loaded.session.precision,
        device=loaded.session.device, labels=loaded.manifest.labels, state="ready")
    return SimpleNamespace(served=served, available_versions=[1], failed_versions={},
                           max_texts_per_request=64)


def test_the_fallback_reason_reaches_get_model(tiny_repository: Path) -> None:
    builder = _builder(tiny_repository, FakeCudaFactory(),
                       report=library_report(missing=("libcublas.so.13",)))
    info = to_model_info(_view(_load(tiny_repository, builder)))
    assert info.device == "cpu" and "libcublas.so.13" in info.device_fallback_reason
    assert not info.HasField("device_gate")
    assert [(p.provider, p.nodes > 0) for p in info.placement] == [(CPU, True)]
    manifest = json.loads((latest_version(tiny_repository, LSTM_NAME).directory
                           / MANIFEST_FILE).read_text())
    assert manifest["evaluation_slice"]["examples"] > 0  # the slice the re-gate reads


def test_get_model_over_grpc_tells_where_and_why(tiny_repository: Path, start_server) -> None:
    gpu = _builder(tiny_repository, FakeCudaFactory(), model_versions={LSTM_NAME: 1})
    with start_server(gpu.settings, builder=gpu).client() as client:
        model = client.get_model(LSTM_NAME)
    assert (model.device, model.precision, model.device_fallback_reason) == ("cuda:0", "fp16", "")
    assert model.device_gate["passed"] and model.device_gate["chosen_precision"] == "fp16"
    assert model.device_gate["examples"] > 0 and model.device_gate["agreement"] == 1.0
    assert set(model.placement) == {CPU, CUDA} and model.cpu_compute_nodes == []
    assert model.memcpy_nodes == 0 and "compute ops on CPU" not in model.precision_reason
    missing = _builder(tiny_repository, FakeCudaFactory(), model_versions={LSTM_NAME: 1},
                       report=library_report(missing=("libcudnn.so.9",)))
    with start_server(missing.settings, builder=missing).client() as client:
        model = client.get_model(LSTM_NAME)
    assert model.device == "cpu" and "libcudnn.so.9" in model.device_fallback_reason
    assert model.device_gate == {} and model.placement == {CPU: model.placement[CPU]}
