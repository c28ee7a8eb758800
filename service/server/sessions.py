"""ONNX Runtime sessions as the server runs them: options per device, the wrapper, warm-up.

Each session's intra-op thread count is decided per model (``threads.py``: by compute per
token on CPU, one on CUDA, where the CPU runs only ORT's shape arithmetic). CUDA sessions get
TF32 off unless asked for (on Ampere and later it makes fp32 MatMul/Gemm round
to 10 mantissa bits, and the export's 1e-4 parity no longer holds), and the arena settings,
which matter because a hot reload holds two versions of a model on the GPU at once. ORT's
``use_tf32=0`` reaches only its own cuBLAS calls: the LSTM runs on cuDNN's RNN kernels, which
pick TF32 on their own, so ``NVIDIA_TF32_OVERRIDE=0`` (read by cuBLAS and cuDNN when they
initialise) goes into the environment before the first CUDA library loads
(``pin_tf32_override``). fp16's fused SkipLayerNormalization runs in strict mode: without it
the CUDA kernel accumulates in fp16 (onnxruntime issue #29034); other graphs are unaffected.

There is no IOBinding: binding the int64 inputs (a few KiB) and the logits (batch x labels
floats) saves one small host-device copy each way per batch, which is noise next to the
kernels; no measurement here could show otherwise (no GPU), so the plain ``run`` path is the
one path, on every device.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.repo.graph import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    GraphContractError,
    check_signature,
    open_session,
    run_logits,
)
from service.repo.graph import session_options as graph_session_options
from service.repo.tokenization import pad_batch
from service.server import cpu_memory
from service.server.device_gate import DeviceGateResult
from service.server.placement import Placement, enable_recording
from service.server.settings import ServeSettings

log = logging.getLogger(__name__)

CUDA = CUDA_PROVIDER
CPU = CPU_PROVIDER
# Read by cuBLAS and cuDNN when they initialise: "0" keeps both off TF32; any other value
# leaves each library to its own default.
TF32_OVERRIDE = "NVIDIA_TF32_OVERRIDE"
# Why a model that could have run on CUDA runs on CPU: closed set, the metric's label values.
FALLBACK_REASONS = (
    "no_cuda_provider",  # this onnxruntime build has no CUDA provider (CPU wheel)
    "no_gpu_driver",  # libcuda.so.1 absent: no GPU, or a container without the NVIDIA runtime
    "missing_cuda_library",  # a CUDA/cuDNN library the provider needs was not found
    "cuda_driver_error",  # the driver loaded but cannot run this CUDA (no device, too old)
    "cuda_session_on_cpu",  # ORT created a CPU session anyway
    "cuda_session_error",  # creating the CUDA session raised (out of memory, ...)
    "cuda_run_error",  # the session failed on its first runs (cuDNN opened lazily, ...)
)


class LoadError(Exception):
    """A model version that cannot be served; the message is one line and says why."""


class SessionLike(Protocol):
    def get_providers(self) -> list[str]: ...
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[Any]: ...


# (model path, options, providers with their options) -> session. Tests inject a fake one to
# exercise the GPU branches on a machine without a GPU.
SessionFactory = Callable[[str, ort.SessionOptions, list[Any]], SessionLike]


def ort_session_factory(
    path: str, options: ort.SessionOptions, providers: list[Any]
) -> SessionLike:
    return open_session(path, options, providers)


def session_options(settings: ServeSettings, *, threads: int) -> ort.SessionOptions:
    """The server's session options with ``threads`` intra-op threads (``threads.py``)."""
    options = graph_session_options(
        intra_op_threads=threads, inter_op_threads=settings.inter_op_threads,
        optimization=settings.graph_optimization, allow_spinning=settings.allow_spinning)
    cpu_memory.apply(options, settings.cpu_arena)
    enable_recording(options)
    return options


def cuda_provider_options(settings: ServeSettings) -> dict[str, str]:
    options = {
        "device_id": str(settings.cuda_device_id),
        "use_tf32": "1" if settings.cuda_use_tf32 else "0",
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
        # fp32 accumulation in the fused SkipLayerNormalization of fp16 graphs; a no-op for
        # graphs without the op.
        "enable_skip_layer_norm_strict_mode": "1",
    }
    if settings.cuda_mem_limit_bytes:
        options["gpu_mem_limit"] = str(settings.cuda_mem_limit_bytes)
    return options


def pin_tf32_override(settings: ServeSettings,
                      environ: MutableMapping[str, str] | None = None) -> str:
    """Make the process environment agree with ``cuda_use_tf32`` before CUDA initialises;
    returns what was done or found, in one line ("" when nothing needed saying).

    Call it before the CUDA libraries load (the probe, the first CUDA session): cuBLAS and
    cuDNN read the variable once, when they initialise. An operator's own value is kept.
    """
    env = os.environ if environ is None else environ
    current = env.get(TF32_OVERRIDE)
    if not settings.cuda_use_tf32:
        if current is None:
            env[TF32_OVERRIDE] = "0"
            message = (f"{TF32_OVERRIDE}=0 set: TF32 off in cuBLAS and cuDNN (the LSTM's RNN "
                       "kernels too), as cuda_use_tf32 is off")
            log.info("%s", message)
            return message
        if current != "0":
            message = (f"{TF32_OVERRIDE}={current} kept from the environment: cuDNN may use "
                       "TF32 (Ampere and later) although cuda_use_tf32 is off")
            log.warning("%s", message)
            return message
        return ""
    if current == "0":
        message = (f"{TF32_OVERRIDE}=0 in the environment keeps TF32 off in cuBLAS and cuDNN, "
                   "overriding cuda_use_tf32")
        log.warning("%s", message)
        return message
    return ""


def providers_for(device: str, settings: ServeSettings) -> list[Any]:
    if device == "cpu":
        return [CPU]
    return [(CUDA, cuda_provider_options(settings)), CPU]


@dataclass(frozen=True)
class DeviceSelection:
    """How a session's device and precision were decided: GetModel, metrics and logs."""

    fallback_reason: str = ""  # one line; "" when the policy's device was honoured
    fallback_kind: str = ""  # one of FALLBACK_REASONS, or ""
    libraries: tuple[tuple[str, bool], ...] = ()  # (soname, loaded) when CUDA was probed
    gate: DeviceGateResult | None = None
    placement: Placement = field(default_factory=lambda: Placement(error="not recorded"))
    precision_reason: str = ""  # why this artifact: "int8 passed its gates (...)", ...
    threads: int = 0  # ORT intra-op threads (0: not recorded)
    threads_reason: str = ""


class ModelSession:
    """One ORT session and how to run it; ``run`` is called from one worker thread at a time."""

    def __init__(self, session: SessionLike, device: str, precision: str, *, path: str = "",
                 selection: DeviceSelection | None = None) -> None:
        self.session = session
        self.device = device  # "cpu" or "cuda:N"
        self.precision = precision
        self.path = path
        self.providers = list(session.get_providers())
        self.selection = selection if selection is not None else DeviceSelection()
        try:
            check_signature(session)
        except GraphContractError as error:
            raise LoadError(str(error)) from None

    @property
    def fell_back_from_cuda(self) -> bool:
        """On CPU because CUDA failed (not because this onnxruntime build has no CUDA)."""
        return self.device == "cpu" and self.selection.fallback_kind not in (
            "", "no_cuda_provider")

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        return run_logits(self.session, input_ids, attention_mask)


def length_buckets(max_length: int) -> list[int]:
    """Powers of two from 8 up to max_length, and max_length itself."""
    buckets, length = [], 8
    while length < max_length:
        buckets.append(length)
        length *= 2
    return [*buckets, max_length]


def warm_up(
    session: ModelSession, num_labels: int, max_length: int, settings: ServeSettings, *,
    pad_id: int = 0,
) -> None:
    """Run each length bucket at batch 1 and at the largest batch the budget allows.

    The first run of a shape allocates memory (and on CUDA picks kernels and opens cuDNN);
    doing it here keeps that cost out of the first requests, surfaces a provider that created
    its session but cannot run it, and checks the graph's output shape.
    """
    for length in length_buckets(max_length):
        widest = max(1, min(settings.max_batch_texts, settings.max_batch_tokens // length))
        for rows in sorted({1, widest}):
            # Any in-vocabulary id will do; the pad id is one for certain.
            batch = pad_batch([[pad_id] * length for _ in range(rows)], pad_id=pad_id)
            logits = session.run(batch.input_ids, batch.attention_mask)
            if logits.shape != (rows, num_labels):
                raise LoadError(
                    f"warm-up: logits shape {logits.shape}, expected ({rows}, {num_labels})")
