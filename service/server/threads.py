"""How many ONNX Runtime intra-op threads each model's CPU session gets: by what a token costs.

A server process does two kinds of CPU work: the per-call work of the event loop (gRPC,
decoding, admission, tokenizing, batching: ~0.3-1 ms per call) and the model's arithmetic. For
the small LSTM and Transformer (~0.5 MFLOP per token) a text's arithmetic is of the same order
as its call, so the model gets every core but one and the loop keeps its own: on 2 cores one
ORT thread gave the lowest one-caller latency and CPU per text. For a pretrained encoder
(MiniLM-L6: ~21 MFLOP per token) the arithmetic is tens of times the call, the loop idles
while the model computes, and a model held to one core halves its throughput on long
documents: such a model gets every core.

The cost comes from the manifest (``compute.weight_flops_per_token``, counted from the graph at
export); a manifest that predates it is judged by its fp32 file size. ``--intra-op-threads``
sets one count for every model, a model's ``serving.json`` its own (service/repo/serving_config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from service.repo.manifest import Manifest
from service.repo.serving_config import ServingConfig

#: Above this many weight FLOPs per token a model is compute-bound: at 64 tokens a text is then
#: >= 0.25 GFLOP, ~2 ms of one core here, several times the ~0.3-1 ms a call costs the loop.
COMPUTE_BOUND_FLOPS_PER_TOKEN = 4_000_000
#: The same judgement from the fp32 file when the manifest has no cost (schema 1-2): ~10 M fp32
#: weights; the small models here are ~5 MB, MiniLM-L6 92 MB.
COMPUTE_BOUND_FP32_BYTES = 40_000_000
#: A CUDA session's CPU work is shape arithmetic on a few int64 values: one thread is plenty.
CUDA_INTRA_OP_THREADS = 1


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str  # one line, for GetModel and the start-up log


def usable_cores() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def is_compute_bound(manifest: Manifest) -> tuple[bool, str]:
    """Whether the model's arithmetic dwarfs a call's work, and the figure that says so."""
    if manifest.compute is not None:
        flops = manifest.compute.weight_flops_per_token
        return (flops >= COMPUTE_BOUND_FLOPS_PER_TOKEN,
                f"{flops / 1e6:.1f} MFLOP per token")
    fp32 = manifest.artifact("fp32")
    if fp32 is None:
        return False, "no compute figure in the manifest"
    return fp32.bytes >= COMPUTE_BOUND_FP32_BYTES, f"fp32 graph {fp32.bytes / 1e6:.0f} MB"


def choose_threads(manifest: Manifest, *, setting: int, config: ServingConfig,
                   cuda: bool = False, cores: int | None = None) -> ThreadChoice:
    """Intra-op threads for one session of ``manifest``: the model's ``serving.json``, else
    the ``intra_op_threads`` setting (0: decide), else 1 on CUDA, else the rule above."""
    if config.intra_op_threads:
        return ThreadChoice(config.intra_op_threads, "serving.json intra_op_threads")
    if setting:
        return ThreadChoice(setting, "--intra-op-threads")
    if cuda:
        return ThreadChoice(CUDA_INTRA_OP_THREADS, "CUDA session: the CPU only does shape "
                            "arithmetic")
    cores = cores or usable_cores()
    heavy, figure = is_compute_bound(manifest)
    if heavy:
        return ThreadChoice(cores, f"compute-bound ({figure}): every core")
    return ThreadChoice(max(1, cores - 1),
                        f"light ({figure}): every core but one, left to the event loop")
