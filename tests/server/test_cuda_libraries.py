"""The CUDA library probe, element types read from ONNX files, and node placement.

The probe loads real shared objects: a Python extension module copied under the name of a
CUDA library into a pip-wheel-shaped directory stands in for the library (the loader does not
care about the name), and a file that is no ELF object stands for a broken install. Only the
driver API's answers are faked (there is no GPU to give them).
"""

from __future__ import annotations

import _ctypes
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import onnxruntime as ort
import pytest
from harness.fake_gpu import FakeCudaSession
from harness.tiny_models import LSTM_NAME, TRANSFORMER_NAME

from service.repo.graph import CPU_PROVIDER, open_session
from service.repo.layout import latest_version
from service.server import cuda_libraries
from service.server.cuda_libraries import (
    DriverStatus,
    nvidia_wheel_dirs,
    probe,
    query_driver,
    required_libraries,
)
from service.server.graph_dtypes import WireFormatError, read_graph_types
from service.server.placement import enable_recording, is_compute_op, read_placement

A_SHARED_OBJECT = Path(_ctypes.__file__)


def _wheel_site(tmp_path: Path, libraries: dict[str, bytes | None]) -> Path:
    """``site/nvidia/cu13/lib/`` holding a loadable copy (None) or the given bytes per name."""
    lib = tmp_path / "site" / "nvidia" / "cu13" / "lib"
    lib.mkdir(parents=True)
    for name, content in libraries.items():
        if content is None:
            shutil.copyfile(A_SHARED_OBJECT, lib / name)
        else:
            (lib / name).write_bytes(content)
    return tmp_path / "site"


def test_libraries_in_pip_wheel_dirs_are_found_loaded_and_missing_ones_named(
        tmp_path: Path) -> None:
    site = _wheel_site(tmp_path, {"libcudart.so.13": None, "libcublasLt.so.13": None,
                                  "libcurand.so.10": b"not an ELF object"})
    dirs = nvidia_wheel_dirs([str(site)])
    assert dirs == [site / "nvidia" / "cu13" / "lib"]
    report = probe("13", dirs)
    by_name = {s.library.soname: s for s in report.statuses}
    assert by_name["libcudart.so.13"].path == str(dirs[0] / "libcudart.so.13")
    assert by_name["libcudart.so.13"].found_in == "pip wheel"
    assert by_name["libcublasLt.so.13"].loaded
    broken = by_name["libcurand.so.10"]
    assert not broken.loaded and broken.error and "did not load" in broken.describe()
    assert not report.usable
    reason = report.reason()
    assert "libcurand.so.10" in reason and "libcudart.so.13" not in reason.split("also")[-1]
    if report.driver_missing:  # a machine without an NVIDIA driver, like CI
        assert reason.startswith("no NVIDIA driver: libcuda.so.1 not found")


def test_cuda_12_builds_look_for_the_suffixed_wheels() -> None:
    sources = {lib.soname: lib.source for lib in required_libraries("12")}
    assert sources["libcublas.so.12"] == "pip nvidia-cublas-cu12"
    assert sources["libcudnn.so.9"] == "pip nvidia-cudnn-cu12"
    assert {lib.soname for lib in required_libraries("13") if not lib.required} == {
        "libnvrtc.so.13"}


class _Driver:
    """What libcuda.so.1 answers; there is no GPU here to answer for real."""

    def __init__(self, version: int, init: int, count: int) -> None:
        self._version, self._init, self._count = version, init, count

    def cuDriverGetVersion(self, out: Any) -> int:
        out._obj.value = self._version
        return 0

    def cuInit(self, flags: int) -> int:
        return self._init

    def cuDeviceGetCount(self, out: Any) -> int:
        out._obj.value = self._count
        return 0


@pytest.mark.parametrize("driver, expected", [
    (_Driver(13000, 0, 2), DriverStatus(13000, 2)),
    (_Driver(13000, 100, 0), DriverStatus(13000, 0, "CUDA_ERROR_NO_DEVICE (100) from cuInit")),
    (_Driver(13000, 0, 0), DriverStatus(13000, 0, "no CUDA device visible")),
])
def test_the_driver_api_answers_are_reported(driver: _Driver, expected: DriverStatus) -> None:
    assert query_driver(lambda name: driver) == expected


def test_a_driver_too_old_for_this_cuda_is_the_reason() -> None:
    from harness.fake_gpu import library_report

    report = library_report(driver=DriverStatus(12040, 1))
    assert not report.usable
    assert report.reason() == ("the NVIDIA driver supports CUDA 12.4, but this onnxruntime-gpu "
                               "needs CUDA 13: upgrade the driver")
    assert library_report().usable and library_report().reason() == ""


def test_preloading_never_prints_on_stdout(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(cuda_libraries, "_preloaded", False)
    cuda_libraries.preload_onnxruntime_libraries()
    assert capsys.readouterr().out == ""
    assert cuda_libraries.preload_onnxruntime_libraries() == ""  # once per process


# --- element types, without the onnx package ------------------------------------------------


# Every artifact the tiny models have: the LSTM gets no int8 (export/int8.py).
@pytest.mark.parametrize(("name", "precision"), [
    (LSTM_NAME, "fp32"), (LSTM_NAME, "fp16"),
    (TRANSFORMER_NAME, "fp32"), (TRANSFORMER_NAME, "fp16"), (TRANSFORMER_NAME, "int8")])
def test_element_types_match_onnx_shape_inference(tiny_repository: Path, name: str,
                                                  precision: str) -> None:
    onnx = pytest.importorskip("onnx")
    path = latest_version(tiny_repository, name).directory / f"model.{precision}.onnx"
    graph = onnx.shape_inference.infer_shapes(onnx.load(path)).graph
    expected = {v.name: v.type.tensor_type.elem_type
                for v in [*graph.value_info, *graph.input, *graph.output]}
    expected |= {t.name: t.data_type for t in graph.initializer}
    types = read_graph_types(path).types
    assert {k: types.get(k) for k in expected} == expected


def test_float_work_is_told_from_int64_mask_and_shape_arithmetic(tiny_repository: Path) -> None:
    types = read_graph_types(latest_version(tiny_repository, LSTM_NAME).directory
                             / "model.fp16.onnx")
    ops = {name: node.op_type for name, node in types.nodes.items()}
    assert ops["node_embedding"] == "Gather"
    assert types.touches_float("node_embedding", data_input_only=True) is True
    reduces = {name: types.touches_float(name, data_input_only=True)
               for name, op in ops.items() if op.startswith("Reduce")}
    assert reduces.pop("node_sum_1") is False  # the sequence lengths, summed over the mask
    assert reduces and all(reduces.values())  # pooling over the LSTM's float outputs
    shapes = [name for name, op in ops.items() if op == "Shape"]
    assert shapes and all(types.types[types.nodes[n].outputs[0]] == 7 for n in shapes)
    assert types.touches_float("no such node") is None


def test_a_file_that_is_not_onnx_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\xff\xff\xff")
    with pytest.raises(WireFormatError):
        read_graph_types(path)


# --- node placement -------------------------------------------------------------------------


def test_a_real_cpu_session_reports_its_placement(tiny_repository: Path) -> None:
    path = str(latest_version(tiny_repository, LSTM_NAME).directory / "model.fp32.onnx")
    options = ort.SessionOptions()
    enable_recording(options)
    placement = read_placement(open_session(path, options), path)
    assert placement.recorded and set(placement.nodes) == {CPU_PROVIDER}
    assert placement.cpu_compute_nodes == []  # a CPU session has nothing misplaced
    unrecorded = read_placement(open_session(path), path)
    assert not unrecorded.recorded and "unknown" in unrecorded.summary()
    assert not read_placement(SimpleNamespace(), path).recorded  # an ORT too old to tell


def test_compute_ops_left_on_cpu_in_a_cuda_session_are_named(tiny_repository: Path) -> None:
    path = str(latest_version(tiny_repository, LSTM_NAME).directory / "model.fp32.onnx")
    session = FakeCudaSession(path, cpu_ops=frozenset({"LSTM", "Gemm"}))
    placement = read_placement(session, path)
    assert sorted(node.split()[0] for node in placement.cpu_compute_nodes) == [
        "Gemm", "LSTM", "LSTM"]
    assert "compute ops on CPU: " in placement.summary()
    # Without the file's types, float-dependent ops cannot be judged: counted, not refused.
    blind = read_placement(FakeCudaSession(path, cpu_ops=frozenset({"Gather"})),
                           str(Path(path).with_name("missing.onnx")))
    assert blind.cpu_compute_nodes == [] and blind.undetermined > 0


def test_which_op_types_count_as_compute() -> None:
    assert all(is_compute_op(op) for op in ("LSTM", "MatMul", "Gemm", "Softmax", "ReduceMean",
                                            "LayerNormalization", "Gather", "Cast"))
    assert not any(is_compute_op(op) for op in ("Shape", "Concat", "Unsqueeze", "Range"))


def test_memcpy_nodes_are_counted_wherever_placement_is_read() -> None:
    def session(providers: list[str], *subgraphs: tuple[str, list[str]]) -> Any:
        nodes = [SimpleNamespace(ep_name=ep, get_nodes=lambda ops=ops: [
            SimpleNamespace(op_type=op, name=f"{op}_{i}") for i, op in enumerate(ops)])
            for ep, ops in subgraphs]
        return SimpleNamespace(get_provider_graph_assignment_info=lambda: nodes,
                               get_providers=lambda: providers)

    cuda = "CUDAExecutionProvider"
    placed = read_placement(session(
        [cuda, CPU_PROVIDER], (cuda, ["MemcpyFromHost", "Add", "MemcpyToHost", "MemcpyToHost"]),
        (CPU_PROVIDER, ["Shape"])), "unused.onnx")  # no CPU compute: the file is not read
    assert placed.memcpy_nodes == 3 and placed.nodes == {cuda: 4, CPU_PROVIDER: 1}
    assert "; 3 Memcpy node(s) between CPU and CUDA" in placed.summary()
    assert placed.to_dict()["memcpy_nodes"] == 3
    none = read_placement(session([cuda, CPU_PROVIDER], (cuda, ["Add"])), "unused.onnx")
    assert none.memcpy_nodes == 0 and "Memcpy" not in none.summary()
