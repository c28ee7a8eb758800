"""ONNX Runtime sessions: which artifact on which device, verified, configured and warmed up.

The device policy is decided from what a session *really* runs on: ``onnxruntime-gpu`` lists
``CUDAExecutionProvider`` as available even where the CUDA libraries are missing, and then
creates a CPU session without raising. So every CUDA attempt reads ``session.get_providers()``
afterwards; ``auto`` falls back to CPU + fp32, an explicit ``cuda`` fails the load.

Nothing here touches asyncio: loading runs in a worker thread, inference in the batcher's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

from service.repo.graph import (
    ATTENTION_MASK,
    CPU_PROVIDER,
    CUDA_PROVIDER,
    INPUT_IDS,
    OUTPUT_NAME,
    GraphContractError,
    check_signature,
    open_session,
    run_logits,
)
from service.repo.graph import session_options as graph_session_options
from service.repo.layout import ModelVersion, verify_artifact, verify_file
from service.repo.manifest import PRECISIONS, Artifact, Manifest, ManifestError, Precision
from service.repo.tokenization import TextTokenizer, pad_batch
from service.server.ort_logging import quiet_ort_logging
from service.server.settings import ServeSettings

log = logging.getLogger(__name__)

CUDA = CUDA_PROVIDER
CPU = CPU_PROVIDER


class LoadError(Exception):
    """A model version that cannot be served; the message is one line and says why."""


class SessionLike(Protocol):
    def get_providers(self) -> list[str]: ...
    def get_inputs(self) -> list[Any]: ...
    def get_outputs(self) -> list[Any]: ...
    def run(self, output_names: Sequence[str], feed: dict[str, np.ndarray]) -> list[Any]: ...
    def io_binding(self) -> Any: ...
    def run_with_iobinding(self, binding: Any) -> None: ...


# (model path, options, providers with their options) -> session. Tests inject a fake one to
# exercise the GPU branches on a machine without a GPU.
SessionFactory = Callable[[str, ort.SessionOptions, list[Any]], SessionLike]


def ort_session_factory(
    path: str, options: ort.SessionOptions, providers: list[Any]
) -> SessionLike:
    return open_session(path, options, providers)


def session_options(settings: ServeSettings) -> ort.SessionOptions:
    return graph_session_options(
        intra_op_threads=settings.intra_op_threads, inter_op_threads=settings.inter_op_threads,
        optimization=settings.graph_optimization, allow_spinning=settings.allow_spinning)


@dataclass(frozen=True)
class Attempt:
    device: str  # "cpu" or "cuda"
    artifact: Artifact


def plan_attempts(
    manifest: Manifest, settings: ServeSettings, available: Sequence[str]
) -> list[Attempt]:
    """The (device, artifact) pairs to try, in order; raises LoadError when none can work."""
    if settings.device == "cuda" and CUDA not in available:
        raise LoadError(
            f"device=cuda requested but this onnxruntime has no {CUDA} (available: "
            f"{', '.join(available)})"
        )
    devices = ["cpu"] if settings.device == "cpu" or CUDA not in available else ["cuda"]
    if settings.device == "auto" and devices == ["cuda"]:
        devices.append("cpu")
    attempts = []
    for device in devices:
        artifact = _choose_artifact(manifest, settings.precision, device)
        if artifact is not None:
            attempts.append(Attempt(device, artifact))
    if not attempts:
        have = ", ".join(f"{a.precision} (gates {'passed' if a.passed_gates else 'failed'})"
                         for a in manifest.artifacts)
        raise LoadError(
            f"{manifest.name}/{manifest.version}: no servable artifact for precision="
            f"{settings.precision} (artifacts: {have}); force --precision to serve one that "
            "failed its gates"
        )
    return attempts


# Which gated artifact each policy tries first, per device. fp16 pays only on a GPU: on CPU ORT
# casts back to fp32 around most ops. int8 (dynamic quantization) has kernels on CPU only, and
# loses a little accuracy, so it is served only when the operator opts in with auto-int8.
PREFERENCES: dict[tuple[str, str], tuple[Precision, ...]] = {
    ("auto", "cuda"): ("fp16", "fp32"),
    ("auto", "cpu"): ("fp32", "fp16"),
    ("auto-int8", "cuda"): ("fp16", "fp32"),
    ("auto-int8", "cpu"): ("int8", "fp32", "fp16"),
}


def _choose_artifact(manifest: Manifest, precision: str, device: str) -> Artifact | None:
    if precision in PRECISIONS:
        # Forced: served even when it failed its gates (the operator asked for it).
        return manifest.artifact(precision)  # type: ignore[arg-type]
    order = PREFERENCES[(precision, device)]
    for wanted in order:
        artifact = manifest.artifact(wanted)
        if artifact is not None and artifact.passed_gates:
            return artifact
    return None


class ModelSession:
    """One ORT session and how to run it; ``run`` is called from one worker thread at a time."""

    def __init__(
        self, session: SessionLike, device: str, precision: str, *, cuda_device_id: int = 0
    ) -> None:
        self.session = session
        self.device = device  # "cpu" or "cuda:N"
        self.precision = precision
        self.providers = list(session.get_providers())
        self._cuda_device_id = cuda_device_id
        try:
            check_signature(session)
        except GraphContractError as error:
            raise LoadError(str(error)) from None

    def run(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        if self.device.startswith("cuda"):
            return self._run_bound(input_ids, attention_mask)
        return run_logits(self.session, input_ids, attention_mask)

    def _run_bound(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        # Per ORT's IOBinding docs: binding lets ORT copy the inputs to the device once and
        # allocate the output in device memory, instead of the implicit copies and host
        # allocation that Run() does on every call; the small logits come back in one copy.
        # Not exercised in this repository's CI (no GPU there).
        binding = self.session.io_binding()
        binding.bind_cpu_input(INPUT_IDS, np.ascontiguousarray(input_ids))
        binding.bind_cpu_input(ATTENTION_MASK, np.ascontiguousarray(attention_mask))
        binding.bind_output(OUTPUT_NAME, "cuda", self._cuda_device_id)
        self.session.run_with_iobinding(binding)
        return np.asarray(binding.copy_outputs_to_cpu()[0], dtype=np.float32)


@dataclass
class SessionBuilder:
    """Creates sessions under the device policy; remembers a CUDA provider that failed to start.

    Trying CUDA again for every model would only repeat a slow, noisy failure.
    """

    settings: ServeSettings
    factory: SessionFactory = ort_session_factory
    available: Sequence[str] = field(default_factory=ort.get_available_providers)
    cuda_failed: bool = False

    def create(self, model: ModelVersion, manifest: Manifest) -> ModelSession:
        available = list(self.available)
        if self.cuda_failed and self.settings.device == "auto":
            available.remove(CUDA)
        for attempt in plan_attempts(manifest, self.settings, available):
            path = verify_artifact(model, attempt.artifact)
            if not attempt.artifact.passed_gates:
                log.warning("%s/%s: serving %s, which failed its export gates (forced)",
                            model.name, model.version, attempt.artifact.precision)
            if attempt.device == "cpu":
                session = self.factory(str(path), session_options(self.settings), [CPU])
                return ModelSession(session, "cpu", attempt.artifact.precision)
            session = self._try_cuda(model, str(path))
            if session is not None:
                return ModelSession(session, f"cuda:{self.settings.cuda_device_id}",
                                    attempt.artifact.precision,
                                    cuda_device_id=self.settings.cuda_device_id)
        raise LoadError(f"{model.name}/{model.version}: no session could be created")

    def _try_cuda(self, model: ModelVersion, path: str) -> SessionLike | None:
        providers: list[Any] = [(CUDA, {"device_id": self.settings.cuda_device_id}), CPU]
        # Under `auto` a CPU-only machine is normal, and ORT's multi-line red error about the
        # missing CUDA libraries would alarm for nothing: quiet ORT for this one attempt.
        # `--device cuda` keeps ORT's diagnostics.
        with quiet_ort_logging(self.settings.device == "auto"):
            try:
                session = self.factory(path, session_options(self.settings), providers)
                reason = "" if session.get_providers()[:1] == [CUDA] else (
                    f"session providers are {session.get_providers()}")
            except Exception as exc:  # ORT raises its own Fail/RuntimeException types
                reason = f"{type(exc).__name__}: {exc}".splitlines()[0]
        if not reason:
            return session
        self.cuda_failed = True
        if self.settings.device == "cuda":
            raise LoadError(f"{model.name}/{model.version}: device=cuda requested but the "
                            f"CUDA provider did not start ({reason})")
        log.warning("%s/%s: CUDA provider did not start (%s); falling back to CPU + fp32 "
                    "(--device cuda shows ONNX Runtime's reason)", model.name, model.version,
                    reason)
        return None


def length_buckets(max_length: int) -> list[int]:
    """Powers of two from 8 up to max_length, and max_length itself."""
    buckets, length = [], 8
    while length < max_length:
        buckets.append(length)
        length *= 2
    return [*buckets, max_length]


@dataclass
class LoadedVersion:
    model: ModelVersion
    manifest: Manifest
    tokenizer: TextTokenizer
    session: ModelSession
    load_seconds: float


def load_version(
    model: ModelVersion, settings: ServeSettings, builder: SessionBuilder
) -> LoadedVersion:
    """Verify, create the session, warm it up. Blocking: call it from a worker thread."""
    started = time.monotonic()
    try:
        manifest = model.load_manifest()
        manifest.check_contract()
        spec = manifest.tokenizer
        tokenizer = TextTokenizer.from_file(
            verify_file(model.directory, spec.file, spec.sha256), spec.max_length, spec.pad_id)
        session = builder.create(model, manifest)
        if settings.warmup:
            warm_up(session, len(manifest.labels), spec.max_length, settings,
                    pad_id=spec.pad_id)
    except (ManifestError, LoadError):
        raise
    except Exception as exc:  # ORT and tokenizers errors: keep the reason, one line
        raise LoadError(f"{model.directory}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc
    return LoadedVersion(model, manifest, tokenizer, session, time.monotonic() - started)


def warm_up(
    session: ModelSession, num_labels: int, max_length: int, settings: ServeSettings, *,
    pad_id: int = 0,
) -> None:
    """Run each length bucket at batch 1 and at the largest batch the budget allows.

    The first run of a shape allocates memory (and on CUDA picks kernels); doing it here keeps
    that cost out of the first requests, and checks the graph's output shape.
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
