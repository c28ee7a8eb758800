"""The GPU check's first stage: is there a GPU this code can use, before spending minutes on it.

``nvidia-smi`` (name, driver, memory), PyTorch's view (CUDA, cuDNN, capability, TF32 flags),
ONNX Runtime's build and providers, whether the bundle and the image together satisfy every
requirement of the tree, and one tiny LSTM + MatMul graph on the device in fp32 and in fp16 with
the server's own session and provider options: the providers the session got, where its nodes
were placed (Memcpy nodes included) and fp16 against fp32. ``failure`` is one line when any of
it rules the other stages out.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
HIDDEN, FEATURES, LABELS = 16, 8, 2


def nvidia_smi() -> dict[str, Any]:
    if shutil.which("nvidia-smi") is None:
        return {"error": "nvidia-smi is not on PATH"}
    fields = "name,driver_version,memory.total,compute_cap"
    done = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                          capture_output=True, text=True, timeout=30, check=False)
    if done.returncode != 0:
        return {"error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    gpus = [dict(zip(fields.split(","), (v.strip() for v in line.split(",")), strict=False))
            for line in done.stdout.strip().splitlines()]
    return {"gpus": gpus}


def torch_facts() -> dict[str, Any]:
    try:
        import torch
    except ImportError as exc:
        return {"error": f"no torch: {exc}"}
    facts: dict[str, Any] = {"version": torch.__version__, "cuda": torch.version.cuda,
                             "cuda_available": torch.cuda.is_available(),
                             "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}
    if torch.cuda.is_available():
        facts.update(device=torch.cuda.get_device_name(0),
                     capability=".".join(map(str, torch.cuda.get_device_capability(0))),
                     cudnn=torch.backends.cudnn.version())
    return facts


def onnxruntime_facts() -> dict[str, Any]:
    import onnxruntime as ort

    facts: dict[str, Any] = {"version": ort.__version__, "file": ort.__file__,
                             "providers": ort.get_available_providers(),
                             "device": ort.get_device()}
    build_info = getattr(ort, "get_build_info", None)
    if build_info is not None:
        facts["build"] = build_info()
    return facts


def cuda_library_facts() -> dict[str, Any]:
    """The server's own library preload and probe (``cuda_libraries``), before any session:
    the tiny graph then finds cuBLAS and cuDNN exactly where the server would."""
    from service.server import cuda_libraries

    preloaded = cuda_libraries.preload_onnxruntime_libraries()
    report = cuda_libraries.probe()
    return {"preload": preloaded, "usable": report.usable, "reason": report.reason(),
            "missing": [status.library.soname for status in report.missing]}


def unmet_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """Every serving requirement of the tree this interpreter does not satisfy, one line each."""
    from packaging.requirements import Requirement

    declared = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["dependencies"]
    unmet = []
    for line in declared:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            version = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            unmet.append(f"{requirement.name}: not installed (wanted {requirement.specifier})")
            continue
        if requirement.specifier and not requirement.specifier.contains(version,
                                                                        prereleases=True):
            unmet.append(f"{requirement.name} {version}: wanted {requirement.specifier}")
    return unmet


def tiny_graph(float16: bool) -> Any:
    """x [batch, seq, FEATURES] -> LSTM -> last hidden state -> MatMul -> logits [batch, 2]."""
    from onnx import TensorProto, helper, numpy_helper

    dtype = np.float16 if float16 else np.float32
    element = TensorProto.FLOAT16 if float16 else TensorProto.FLOAT
    rng = np.random.default_rng(0)
    weights = {
        "W": rng.normal(0, 0.3, (1, 4 * HIDDEN, FEATURES)),
        "R": rng.normal(0, 0.3, (1, 4 * HIDDEN, HIDDEN)),
        "B": rng.normal(0, 0.1, (1, 8 * HIDDEN)),
        "head": rng.normal(0, 0.3, (HIDDEN, LABELS)),
    }
    initializers = [numpy_helper.from_array(value.astype(dtype), name)
                    for name, value in weights.items()]
    nodes = [
        helper.make_node("Transpose", ["x"], ["x_seq_first"], perm=[1, 0, 2]),
        helper.make_node("LSTM", ["x_seq_first", "W", "R", "B"], ["", "h_last"],
                         hidden_size=HIDDEN, name="lstm"),
        helper.make_node("Squeeze", ["h_last", "axis0"], ["h"]),
        helper.make_node("MatMul", ["h", "head"], ["logits"], name="head_matmul"),
    ]
    initializers.append(numpy_helper.from_array(np.array([0], dtype=np.int64), "axis0"))
    graph = helper.make_graph(
        nodes, "seqserve_smoke",
        [helper.make_tensor_value_info("x", element, ["batch", "seq", FEATURES])],
        [helper.make_tensor_value_info("logits", element, ["batch", LABELS])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8)


def run_tiny(device: str, float16: bool, directory: Path) -> dict[str, Any]:
    """The tiny graph in one precision with the server's options; its outputs for comparison."""
    import onnx

    from service.server.placement import read_placement
    from service.server.sessions import ort_session_factory, providers_for, session_options
    from service.server.settings import ServeSettings

    path = directory / f"smoke.{'fp16' if float16 else 'fp32'}.onnx"
    onnx.save(tiny_graph(float16), path)
    settings = ServeSettings()
    session = ort_session_factory(str(path), session_options(settings, threads=1),
                                  providers_for(device, settings))
    x = np.random.default_rng(1).normal(0, 1, (4, 12, FEATURES))
    logits = session.run(None, {"x": x.astype(np.float16 if float16 else np.float32)})[0]
    placement = read_placement(session, str(path))
    return {"providers": session.get_providers(), "placement": placement.to_dict(),
            "summary": placement.summary(), "logits": np.asarray(logits, np.float32)}


def stage_smoke(device: str) -> dict[str, Any]:
    result: dict[str, Any] = {
        "nvidia_smi": nvidia_smi() if device == "cuda" else {"skipped": "--device cpu"},
        "torch": torch_facts(), "onnxruntime": onnxruntime_facts(),
        "unmet_requirements": unmet_requirements()}
    failure = ""
    if device == "cuda":
        result["cuda_libraries"] = cuda_library_facts()
    if result["unmet_requirements"]:
        failure = "requirements not met: " + "; ".join(result["unmet_requirements"])
    elif device == "cuda" and "CUDAExecutionProvider" not in result["onnxruntime"]["providers"]:
        failure = (f"onnxruntime {result['onnxruntime']['version']} from "
                   f"{result['onnxruntime']['file']} has no CUDAExecutionProvider")
    elif device == "cuda" and not result["cuda_libraries"]["usable"]:
        failure = f"CUDA libraries: {result['cuda_libraries']['reason']}"
    if not failure:
        with tempfile.TemporaryDirectory() as scratch:
            for name, float16 in (("fp32", False), ("fp16", True)):
                try:
                    result[name] = run_tiny(device, float16, Path(scratch))
                except Exception as exc:  # ORT's own exception types: the reason is the point
                    result[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        failure = _tiny_failure(result, device)
        if "logits" in result.get("fp32", {}) and "logits" in result.get("fp16", {}):
            result["fp16_max_abs_diff"] = float(np.abs(result["fp16"]["logits"]
                                                       - result["fp32"]["logits"]).max())
        for name in ("fp32", "fp16"):
            result.get(name, {}).pop("logits", None)
    result["failure"] = failure
    return result


def _tiny_failure(result: dict[str, Any], device: str) -> str:
    for name in ("fp32", "fp16"):
        run = result.get(name, {})
        if "error" in run:
            if device == "cpu" and name == "fp16":
                continue  # ORT's CPU provider has no fp16 LSTM kernel: expected there
            return f"the tiny LSTM+MatMul graph failed in {name}: {run['error']}"
        if device == "cuda":
            if run["providers"][:1] != ["CUDAExecutionProvider"]:
                return f"the {name} session is not on CUDA (providers {run['providers']})"
            if run["placement"].get("cpu_compute_nodes"):
                return f"{name}: compute ops on CPU: {run['summary']}"
    return ""
