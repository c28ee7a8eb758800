"""A GPU where there is none: the only thing the device-selection tests fake.

``FakeCudaFactory`` stands where ONNX Runtime would create sessions. Its CUDA sessions wrap a
real CPU session on the same model file, so every run gives the model's real numbers, and
report what a real ``onnxruntime-gpu`` reports: ``CUDAExecutionProvider`` first, and a node
assignment with shape arithmetic on CPU and everything else on CUDA. Each way a real GPU
machine fails is one knob: libraries missing (``library_report``), a silent CPU session, an
exception at creation, a failure on the first run (cuDNN opened lazily), either of those for
one precision only (``fails``), compute ops left on CPU (with the Memcpy nodes ORT inserts
around them), and fp16 that computes differently (``perturb``).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort

from service.repo.graph import CPU_PROVIDER, CUDA_PROVIDER, open_session
from service.server.cuda_libraries import (
    DRIVER_LIBRARY,
    CudaLibraryReport,
    DriverStatus,
    LibraryStatus,
    required_libraries,
)
from service.server.placement import enable_recording

# What ORT keeps on CPU in a CUDA session when they compute shapes (int64), as it does for real.
SHAPE_OPS = frozenset({"Shape", "Gather", "Concat", "Unsqueeze", "Squeeze", "Slice", "Range",
                       "Expand", "Reshape", "Cast", "Less", "ReduceSum", "Clip", "Sub", "Where"})


def library_report(missing: tuple[str, ...] = (), driver: DriverStatus | None = None
                   ) -> CudaLibraryReport:
    """The probe of a GPU machine (CUDA 13 driver, one device), with ``missing`` sonames."""
    statuses = [LibraryStatus(lib) if lib.soname in missing
                else LibraryStatus(lib, f"/site-packages/nvidia/cu13/lib/{lib.soname}",
                                   "pip wheel")
                for lib in required_libraries("13")]
    if driver is None:
        driver = DriverStatus() if DRIVER_LIBRARY in missing else DriverStatus(13000, 1)
    return CudaLibraryReport("13", statuses, driver)


class FakeCudaSession:
    def __init__(self, path: str, *, perturb: float = 0.0, run_error: str = "",
                 cpu_ops: frozenset[str] = frozenset()) -> None:
        options = ort.SessionOptions()
        enable_recording(options)
        self._real = open_session(path, options)
        self._types = _value_types(self._real, path)
        self._perturb, self._run_error, self._cpu_ops = perturb, run_error, cpu_ops
        self.runs = 0

    def get_providers(self) -> list[str]:
        return [CUDA_PROVIDER, CPU_PROVIDER]

    def get_inputs(self) -> list[Any]:
        return self._real.get_inputs()

    def get_outputs(self) -> list[Any]:
        return self._real.get_outputs()

    def run(self, output_names: Any, feed: dict[str, np.ndarray]) -> list[Any]:
        self.runs += 1
        if self._run_error:
            raise RuntimeError(self._run_error)
        (logits,) = self._real.run(output_names, feed)
        if self._perturb:
            # Swap the two leading logits of every other row: the argmax flips there, as a
            # badly overflowing fp16 would flip it; a tiny perturb only nudges the values.
            logits = logits.astype(np.float32).copy()
            if self._perturb >= 1.0:
                logits[::2, [0, 1]] = logits[::2, [1, 0]]
            else:
                logits += self._perturb
                logits[:, 0] += self._perturb
        return [logits]

    def get_provider_graph_assignment_info(self) -> list[Any]:
        """The real assignment, with compute moved to CUDA as a working GPU would place it; a
        compute op kept on CPU gets a copy in and a copy out, on CUDA, as ORT inserts them."""
        subgraphs = []
        for subgraph in self._real.get_provider_graph_assignment_info():
            for node in subgraph.get_nodes():
                on_cpu = node.op_type in self._cpu_ops or (
                    node.op_type in SHAPE_OPS and not self._types.get(node.name, False))
                provider = CPU_PROVIDER if on_cpu else CUDA_PROVIDER
                subgraphs.append(SimpleNamespace(ep_name=provider, get_nodes=lambda n=node: [n]))
                if node.op_type in self._cpu_ops:
                    copies = [SimpleNamespace(op_type=op, name=f"{op}_{node.name}")
                              for op in ("MemcpyToHost", "MemcpyFromHost")]
                    subgraphs.append(SimpleNamespace(ep_name=CUDA_PROVIDER,
                                                     get_nodes=lambda c=copies: c))
        return subgraphs


def _value_types(session: Any, path: str) -> dict[str, bool]:
    from service.server.graph_dtypes import read_graph_types

    types = read_graph_types(path)
    return {name: bool(types.touches_float(name)) for name in types.nodes}


class FakeCudaFactory:
    """Records each session request as (device, file name); ``cuda`` says what CUDA does:
    "works", "cpu" (ORT's silent CPU session), "raises" (at creation), "run-fails";
    ``fails`` says it for one precision ({"fp16": "raises"}), the others doing ``cuda``."""

    def __init__(self, cuda: str = "works", *, perturb: dict[str, float] | None = None,
                 cpu_ops: frozenset[str] = frozenset(),
                 fails: dict[str, str] | None = None) -> None:
        self.cuda = cuda
        self.perturb = perturb or {}
        self.cpu_ops = cpu_ops
        self.fails = fails or {}
        self.calls: list[tuple[str, str]] = []
        self.options: list[tuple[Any, list[Any]]] = []

    def __call__(self, path: str, options: Any, providers: list[Any]) -> Any:
        wants_cuda = any((isinstance(p, tuple) and p[0] == CUDA_PROVIDER) or p == CUDA_PROVIDER
                         for p in providers)
        name = Path(path).name
        precision = name.split(".")[1]
        self.calls.append(("cuda" if wants_cuda else "cpu", name))
        self.options.append((options, providers))
        mode = self.fails.get(precision, self.cuda)
        if not wants_cuda or mode == "cpu":
            return open_session(path, options)  # onnxruntime-gpu without working CUDA: CPU
        if mode == "raises":
            raise RuntimeError("CUDA failure 2: out of memory ; GPU=0")
        return FakeCudaSession(
            path, perturb=self.perturb.get(precision, 0.0), cpu_ops=self.cpu_ops,
            run_error="CUDNN failure 1003: CUDNN_STATUS_NOT_INITIALIZED"
            if mode == "run-fails" else "")
