"""Which execution provider ONNX Runtime gave each node of a session, and whether that is fine.

ORT keeps shape arithmetic (``Shape``, int64 ``Gather``/``Concat``/``Slice`` feeding ``Reshape``)
on CPU on purpose even in a CUDA session, so "any node on CPU" is no failure. What matters is
that the model's compute ops run on the GPU: a float ``MatMul`` or the ``LSTM`` on CPU means a
device round trip per batch and CPU speed. ORT 1.31 reports the assignment when the session is
created with ``session.record_ep_graph_assignment_info=1``; the element types that tell a shape
``Gather`` from the embedding come from the model file (``graph_dtypes.py``). Where data crosses
between CPU and CUDA nodes ORT inserts ``MemcpyToHost``/``MemcpyFromHost`` nodes (its warning
"N Memcpy nodes are added to the graph"): they are counted too, each one a copy per run.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnxruntime as ort

from service.repo.graph import CPU_PROVIDER
from service.server.graph_dtypes import WireFormatError, read_graph_types

log = logging.getLogger(__name__)

RECORD_ASSIGNMENT = "session.record_ep_graph_assignment_info"
# Ops that are the model's work whatever their inputs: floating point by definition here.
ALWAYS_COMPUTE = frozenset({
    "LSTM", "GRU", "RNN", "MatMul", "Gemm", "Softmax", "LogSoftmax", "LayerNormalization",
    "FusedMatMul", "Attention", "MultiHeadAttention", "SkipLayerNormalization",
})
# Ops that are compute only on floating-point data: the embedding Gather, not a shape Gather;
# a Reduce over activations, not over the int64 mask; a Cast into or out of a float type.
FLOAT_DATA_OPS = frozenset({"Gather", "GatherElements"})
MEMCPY_OPS = frozenset({"MemcpyToHost", "MemcpyFromHost"})


def is_compute_op(op_type: str) -> bool:
    return (op_type in ALWAYS_COMPUTE or op_type in FLOAT_DATA_OPS or op_type == "Cast"
            or op_type.startswith("Reduce"))


def enable_recording(options: ort.SessionOptions) -> None:
    """Ask ORT to keep the node assignment (ignored by builds that do not know the key)."""
    options.add_session_config_entry(RECORD_ASSIGNMENT, "1")


@dataclass(frozen=True)
class Placement:
    nodes: dict[str, int] = field(default_factory=dict)  # provider -> nodes assigned to it
    cpu_compute_nodes: list[str] = field(default_factory=list)  # "LSTM node_lstm", ...
    undetermined: int = 0  # compute-kind nodes on CPU whose element types could not be read
    error: str = ""  # why no placement could be read
    memcpy_nodes: int = 0  # MemcpyToHost/MemcpyFromHost nodes ORT inserted between devices

    @property
    def recorded(self) -> bool:
        return not self.error

    def summary(self) -> str:
        if self.error:
            return f"node placement unknown ({self.error})"
        parts = [f"{provider.removesuffix('ExecutionProvider')} {count}"
                 for provider, count in sorted(self.nodes.items(), key=lambda kv: -kv[1])]
        text = "nodes: " + ", ".join(parts)
        if self.cpu_compute_nodes:
            text += f"; {self.cpu_compute()}"
        if self.memcpy_nodes:
            text += f"; {self.memcpy_nodes} Memcpy node(s) between CPU and CUDA"
        if self.undetermined:  # nodes ORT's optimiser added (shape Gathers), not in the file
            text += f"; {self.undetermined} node(s) on CPU not in the model file (not judged)"
        return text

    def cpu_compute(self) -> str:
        """"compute ops on CPU: ..." (the first six), or "" when there are none."""
        if not self.cpu_compute_nodes:
            return ""
        shown = ", ".join(self.cpu_compute_nodes[:6])
        more = len(self.cpu_compute_nodes) - 6
        return f"compute ops on CPU: {shown}" + (f" (+{more} more)" if more > 0 else "")

    def to_dict(self) -> dict[str, Any]:
        return {"nodes": dict(self.nodes), "cpu_compute_nodes": list(self.cpu_compute_nodes),
                "memcpy_nodes": self.memcpy_nodes, "undetermined": self.undetermined,
                "error": self.error}


def _assignment(session: Any) -> list[tuple[str, str, str]]:
    """(provider, op type, node name) for every assigned node."""
    rows = []
    for subgraph in session.get_provider_graph_assignment_info():
        for node in subgraph.get_nodes():
            rows.append((subgraph.ep_name, node.op_type, node.name))
    return rows


def read_placement(session: Any, model_path: str) -> Placement:
    """The session's node assignment; in a session that is not CPU-only, the compute nodes ORT
    left on CPU. Never raises: a placement that cannot be read is reported as unknown."""
    if not hasattr(session, "get_provider_graph_assignment_info"):
        return Placement(error=f"onnxruntime {ort.__version__} cannot report it")
    try:
        rows = _assignment(session)
    except Exception as exc:  # ORT's Fail when recording was not enabled
        return Placement(error=f"{type(exc).__name__}: {exc}".splitlines()[0])
    counts = Counter(provider for provider, _, _ in rows)
    memcpy = sum(1 for _, op, _ in rows if op in MEMCPY_OPS)
    providers = list(session.get_providers())
    if providers[:1] == [CPU_PROVIDER]:
        return Placement(dict(counts), memcpy_nodes=memcpy)
    suspects = [(op, name) for provider, op, name in rows
                if provider == CPU_PROVIDER and is_compute_op(op)]
    if not suspects:
        return Placement(dict(counts), memcpy_nodes=memcpy)
    try:
        types = read_graph_types(model_path)
    except (OSError, WireFormatError) as exc:
        log.warning("%s: cannot read element types (%s); node placement not checked",
                    model_path, exc)
        return Placement(dict(counts), undetermined=len(suspects), memcpy_nodes=memcpy)
    on_cpu, undetermined = [], 0
    for op, name in suspects:
        floating = True if op in ALWAYS_COMPUTE else types.touches_float(
            name, data_input_only=op != "Cast")
        if floating is None:
            undetermined += 1
        elif floating:
            on_cpu.append(f"{op} {name}")
    return Placement(dict(counts), on_cpu, undetermined, memcpy_nodes=memcpy)
