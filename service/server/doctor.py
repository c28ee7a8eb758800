"""``seqserve doctor``: what this node can run, where, how fast, and why not CUDA.

What an operator runs on a new node before serving: the ONNX Runtime build and its providers,
every library the CUDA provider needs (found where, or missing), the driver, and per model the
device each precision's session really lands on, its node placement, each lower precision's
agreement with fp32 *on this device* over the stored evaluation slice, and a short latency
sweep. Sessions are made with the server's own options (``sessions.py``, TF32 pinned the same
way) so what the doctor sees is what ``seqserve serve`` would get, and the verdict per model
walks the server's own plan (``doctor_plan.py``). The text rendering is ``doctor_text.py``.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from service.repo.layout import (
    ModelVersion,
    latest_version,
    model_names,
    verify_artifact,
    verify_file,
)
from service.repo.manifest import Manifest, ManifestError
from service.repo.serving_config import ServingConfig, read_serving_config
from service.repo.tokenization import TextTokenizer
from service.server import cuda_libraries
from service.server.device_gate import (
    Comparison,
    EvaluationSliceData,
    compare,
    predict,
    read_evaluation_slice,
)
from service.server.doctor_plan import CPU_SESSION, predict_cuda
from service.server.ort_logging import quiet_ort_logging
from service.server.placement import Placement, read_placement
from service.server.planning import choose_artifact, effective_precision
from service.server.sessions import (
    CUDA,
    ModelSession,
    SessionFactory,
    ort_session_factory,
    pin_tf32_override,
    providers_for,
    session_options,
)
from service.server.settings import ServeSettings
from service.server.threads import choose_threads

SWEEP_BATCHES = (1, 8, 32)
SWEEP_TOKENS = (16, 64, 256)
NVIDIA_SMI_TIMEOUT_S = 10.0


@dataclass
class PrecisionReport:
    precision: str
    passed_export_gates: bool
    device: str = ""  # where the session really runs: "cpu", "cuda:0"; "" if it failed
    providers: list[str] = field(default_factory=list)
    placement: Placement = field(default_factory=Placement)
    vs_fp32: Comparison | None = None  # on this device, over the evaluation slice
    latency_ms: dict[str, float] = field(default_factory=dict)  # "BxT" -> median ms
    error: str = ""

    def to_dict(self) -> dict[str, Any]:
        c = self.vs_fp32
        return {"precision": self.precision, "passed_export_gates": self.passed_export_gates,
                "device": self.device, "providers": self.providers,
                "placement": self.placement.to_dict(), "latency_ms": self.latency_ms,
                "vs_fp32": None if c is None else {
                    "examples": c.examples, "agreement": c.agreement,
                    "fp32_accuracy": c.fp32_accuracy, "accuracy": c.candidate_accuracy,
                    "accuracy_drop": c.accuracy_drop, "max_abs_diff": c.max_abs_diff,
                    "non_finite_rows": c.non_finite_rows},
                "error": self.error}


@dataclass
class ModelReport:
    name: str
    version: int = 0
    architecture: str = ""
    max_length: int = 0
    precisions: list[PrecisionReport] = field(default_factory=list)
    served: str = ""  # what `seqserve serve` would serve under the device policy
    problems: list[str] = field(default_factory=list)  # why --device cuda would refuse it
    # Served under the policy, but not as well as it could be: compute ops on CPU under auto,
    # fp16 failed on CUDA and fp32 serves.
    warnings: list[str] = field(default_factory=list)
    error: str = ""  # the version could not be read at all

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "architecture": self.architecture,
                "max_length": self.max_length, "served": self.served,
                "problems": self.problems, "warnings": self.warnings, "error": self.error,
                "precisions": [p.to_dict() for p in self.precisions]}


@dataclass
class DoctorReport:
    device_policy: str
    repository: str
    onnxruntime: dict[str, Any]
    libraries: cuda_libraries.CudaLibraryReport | None  # None where no CUDA build can exist
    driver: dict[str, Any]
    cuda_usable: bool
    cuda_reason: str  # why CUDA is not used; "" when it is
    models: list[ModelReport] = field(default_factory=list)

    @property
    def honoured(self) -> bool:
        """Whether every model can be served under the device policy as asked."""
        if self.device_policy != "cuda":
            return all(not m.error for m in self.models)
        return self.cuda_usable and all(not m.problems and not m.error for m in self.models)

    def to_dict(self) -> dict[str, Any]:
        libraries = self.libraries
        return {
            "device_policy": self.device_policy, "repository": self.repository,
            "honoured": self.honoured, "onnxruntime": self.onnxruntime,
            "cuda": {
                "usable": self.cuda_usable, "reason": self.cuda_reason, "driver": self.driver,
                "cuda_major": libraries.cuda_major if libraries else None,
                "search_dirs": libraries.search_dirs if libraries else [],
                "libraries": [] if libraries is None else [
                    {"soname": s.library.soname, "purpose": s.library.purpose,
                     "required": s.library.required, "source": s.library.source,
                     "path": s.path, "found_in": s.found_in, "error": s.error}
                    for s in libraries.statuses],
            },
            "models": [m.to_dict() for m in self.models],
        }


def onnxruntime_facts() -> dict[str, Any]:
    try:
        from onnxruntime.capi import build_and_package_info as build  # type: ignore
        package, cuda = build.package_name, getattr(build, "cuda_version", None)
    except ImportError:
        package, cuda = "onnxruntime", None
    return {"version": ort.__version__, "package": package, "built_for_cuda": cuda,
            "providers": ort.get_available_providers(), "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}"}


def driver_facts(libraries: cuda_libraries.CudaLibraryReport | None) -> dict[str, Any]:
    """nvidia-smi's view and the device nodes: what the driver API alone cannot say."""
    smi = shutil.which("nvidia-smi")
    gpus: list[str] = []
    smi_error = "" if smi else "nvidia-smi not on PATH"
    if smi:
        try:
            out = subprocess.run(
                [smi, "--query-gpu=name,driver_version,memory.total,compute_cap",
                 "--format=csv,noheader"], capture_output=True, text=True,
                timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
            gpus = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            smi_error = "" if out.returncode == 0 else (out.stderr or out.stdout).strip()[:200]
        except (OSError, subprocess.TimeoutExpired) as exc:
            smi_error = f"nvidia-smi failed: {exc}"
    driver = libraries.driver if libraries else cuda_libraries.DriverStatus()
    return {"nvidia_smi": gpus, "nvidia_smi_error": smi_error,
            "device_nodes": sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*")),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "driver_cuda_version": driver.cuda_version, "devices": driver.devices,
            "driver_error": driver.error}


Probe = Callable[[], cuda_libraries.CudaLibraryReport]


def run_doctor(settings: ServeSettings, *, runs: int = 5, models: Sequence[str] = (),
               factory: SessionFactory = ort_session_factory, probe: Probe | None = None,
               available: Sequence[str] | None = None) -> DoctorReport:
    """Everything ``seqserve doctor`` reports. ``factory``/``probe``/``available`` are the
    injection points the CUDA-branch tests use; the defaults are the real ones."""
    providers = list(ort.get_available_providers() if available is None else available)
    facts = onnxruntime_facts() | {"providers": providers}
    libraries: cuda_libraries.CudaLibraryReport | None = None
    if CUDA in providers:
        if settings.device != "cpu":  # as the server does, before cuBLAS/cuDNN can load
            pin_tf32_override(settings)
        cuda_libraries.preload_onnxruntime_libraries()
        libraries = (probe or cuda_libraries.probe)()
    if CUDA not in providers:
        reason = (f"this onnxruntime ({facts['package']} {facts['version']}) has no {CUDA}: "
                  "pip install 'seqserve[gpu]' (Linux x86_64)")
    else:
        reason = libraries.reason() if libraries else ""
    report = DoctorReport(settings.device, str(settings.repository), facts, libraries,
                          driver_facts(libraries), cuda_usable=not reason, cuda_reason=reason)
    if settings.device == "cpu":
        report.cuda_reason = report.cuda_reason or "not asked for (--device cpu)"
    device = "cuda" if settings.device != "cpu" and report.cuda_usable else "cpu"
    names = list(models) or model_names(settings.repository)
    for name in names:
        report.models.append(_examine(settings, name, device, runs, factory))
    if device == "cuda" and any(m.problems and not m.error for m in report.models):
        report.cuda_reason = report.cuda_reason or "CUDA sessions failed (see the models)"
    return report


def _examine(settings: ServeSettings, name: str, device: str, runs: int,
             factory: SessionFactory) -> ModelReport:
    model = latest_version(settings.repository, name)
    if model is None:
        return ModelReport(name, error=f"no complete version in {settings.repository}")
    try:
        manifest = model.load_manifest()
        manifest.check_contract()
        spec = manifest.tokenizer
        tokenizer = TextTokenizer.from_file(verify_file(model.directory, spec.file, spec.sha256),
                                            spec.max_length, spec.pad_id)
        data = read_evaluation_slice(model, manifest)
        config = read_serving_config(model.directory.parent)
    except (ManifestError, OSError, ValueError) as exc:
        return ModelReport(name, model.version, error=str(exc).splitlines()[0])
    report = ModelReport(name, model.version, manifest.architecture, spec.max_length)
    sessions: dict[str, ModelSession] = {}
    for artifact in manifest.artifacts:
        entry = PrecisionReport(artifact.precision, artifact.passed_gates)
        report.precisions.append(entry)
        session = _open(settings, model, artifact.precision, manifest, config, device, factory,
                        entry)
        if session is not None:
            sessions[artifact.precision] = session
    _measure(report, sessions, tokenizer, data, runs)
    _decide(report, settings, device, data, manifest, config)
    return report


def _open(settings: ServeSettings, model: ModelVersion, precision: str, manifest: Manifest,
          config: ServingConfig, device: str, factory: SessionFactory,
          entry: PrecisionReport) -> ModelSession | None:
    artifact = manifest.artifact(precision)  # type: ignore[arg-type]
    try:
        path = str(verify_artifact(model, artifact))  # type: ignore[arg-type]
        threads = choose_threads(manifest, setting=settings.intra_op_threads,
                                 config=config, cuda=device == "cuda")
        # ORT keeps its level for CUDA sessions, as in the server (the libraries loaded, so
        # its warnings are about this model on this GPU).
        with quiet_ort_logging(device != "cuda"):
            raw = factory(path, session_options(settings, threads=threads.threads),
                          providers_for(device, settings))
    except Exception as exc:  # ORT's own exception types, integrity errors
        entry.error = f"session: {type(exc).__name__}: {exc}".splitlines()[0]
        return None
    entry.providers = list(raw.get_providers())
    entry.device = (f"cuda:{settings.cuda_device_id}" if entry.providers[:1] == [CUDA]
                    else "cpu")
    entry.placement = read_placement(raw, path)
    if device == "cuda" and entry.device == "cpu":
        entry.error = CPU_SESSION
    return ModelSession(raw, entry.device, precision, path=path)


def _measure(report: ModelReport, sessions: dict[str, ModelSession],
             tokenizer: TextTokenizer, data: EvaluationSliceData | None, runs: int) -> None:
    fp32_probabilities = None
    if data is not None and "fp32" in sessions:
        try:
            fp32_probabilities = predict(sessions["fp32"].run, tokenizer, data.texts)
        except Exception as exc:
            _entry(report, "fp32").error = f"run: {type(exc).__name__}: {exc}".splitlines()[0]
            sessions.pop("fp32")
    for precision, session in list(sessions.items()):
        entry = _entry(report, precision)
        try:
            if precision != "fp32" and fp32_probabilities is not None and data is not None:
                entry.vs_fp32 = compare(fp32_probabilities,
                                        predict(session.run, tokenizer, data.texts),
                                        data.label_ids)
            entry.latency_ms = sweep(session, report.max_length, tokenizer.vocab_size, runs)
        except Exception as exc:  # a session that created but cannot run (cuDNN, memory)
            entry.error = f"run: {type(exc).__name__}: {exc}".splitlines()[0]


def _entry(report: ModelReport, precision: str) -> PrecisionReport:
    return next(p for p in report.precisions if p.precision == precision)


def sweep(session: ModelSession, max_length: int, vocab_size: int, runs: int
          ) -> dict[str, float]:
    """Median ms of ``runs`` runs (after one unmeasured) per batch x tokens, up to max_length."""
    if runs <= 0:
        return {}
    rng = np.random.default_rng(0)
    timings = {}
    for tokens in SWEEP_TOKENS:
        if tokens > max_length:
            continue
        for batch in SWEEP_BATCHES:
            ids = rng.integers(1, max(2, vocab_size), size=(batch, tokens), dtype=np.int64)
            mask = np.ones_like(ids)
            session.run(ids, mask)
            samples = []
            for _ in range(runs):
                started = time.perf_counter()
                session.run(ids, mask)
                samples.append(time.perf_counter() - started)
            timings[f"{batch}x{tokens}"] = round(statistics.median(samples) * 1000, 3)
    return timings


def _decide(report: ModelReport, settings: ServeSettings, device: str,
            data: EvaluationSliceData | None, manifest: Manifest,
            config: ServingConfig) -> None:
    """What ``seqserve serve --device POLICY`` would serve, what would make ``--device cuda``
    refuse the model, and what deserves a warning; on CUDA by the server's plan."""
    if device != "cuda":
        # The server's own choice (planning.choose_artifact), so the two cannot disagree.
        by_precision = {p.precision: p for p in report.precisions}
        precision, source = effective_precision(settings, config)
        artifact, reason = choose_artifact(manifest, precision, "cpu", source=source)
        entry = by_precision.get(artifact.precision) if artifact is not None else None
        report.served = (f"{artifact.precision} on cpu — {reason}"
                         if artifact is not None and entry is not None and not entry.error
                         else f"nothing ({reason or 'the session failed'})")
        return
    entries = {p.precision: p for p in report.precisions}
    prediction = predict_cuda(entries, settings, manifest, config, data)
    report.served, report.warnings = prediction.served, prediction.warnings
    report.problems = (prediction.refusals if settings.device == "cuda" else predict_cuda(
        entries, settings.model_copy(update={"device": "cuda"}), manifest, config,
        data).refusals)


def describe_platform() -> str:
    return f"{platform.system()} {platform.machine()}, Python {sys.version.split()[0]}"
