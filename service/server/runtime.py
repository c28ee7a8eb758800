"""Which artifact on which device: verified, created, placed, re-gated and warmed up.

The device is decided from what a session *really* does. ``onnxruntime-gpu`` lists
``CUDAExecutionProvider`` as available even where the CUDA libraries are missing, and then
creates a CPU session without raising; and cuDNN opens lazily, so a Transformer session can
create fine and fail on its first run. So a CUDA attempt is honoured only when the libraries
load (``cuda_libraries.py``, which names the missing one), the session reports CUDA first, its
compute ops landed on CUDA (``placement.py``), fp16 passes its re-gate on the device
(``device_gate.py``) and warm-up runs. The attempts go in the order ``planning.py`` plans:
under ``auto``, CUDA fp16, then CUDA fp32 when fp16 failed there for this model, then CPU
(int8 where it passed every gate, else fp32); ``cuda`` the same without CPU, refusing the model
when no CUDA attempt serves it. A failure of the machine (libraries, driver, a silent CPU
session) skips the remaining CUDA attempts and is remembered for later loads. Every step that
failed is recorded: the served session's ``precision_reason``, a CPU fallback's
``fallback_reason``. Under ``auto`` a compute op ORT left on CPU is served but said in
``precision_reason`` (and counted in the placement metrics); ``cuda`` refuses it.

ORT logs at its own level (WARNING) while CUDA sessions are created, so its "Memcpy nodes are
added" warning reaches the log: a CUDA session is only attempted once the libraries loaded
(``cuda_libraries.py``), so on a machine without CUDA no alarming error is printed.

Nothing here touches asyncio: loading runs in a worker thread, inference in the batcher's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import onnxruntime as ort

from service.repo.layout import ModelVersion, verify_artifact, verify_file
from service.repo.manifest import PRECISIONS, Artifact, Manifest, ManifestError
from service.repo.serving_config import ServingConfig, read_serving_config
from service.repo.tokenization import TextTokenizer
from service.server import cuda_libraries
from service.server.device_gate import (
    DeviceGateResult,
    GateThresholds,
    not_measured,
    read_evaluation_slice,
    regate,
)
from service.server.placement import read_placement
from service.server.planning import Attempt, after_failures, effective_precision, plan_attempts
from service.server.sessions import (
    CPU,
    CUDA,
    DeviceSelection,
    LoadError,
    ModelSession,
    SessionFactory,
    length_buckets,
    ort_session_factory,
    pin_tf32_override,
    providers_for,
    session_options,
    warm_up,
)
from service.server.settings import ServeSettings
from service.server.threads import choose_threads

__all__ = ["CPU", "CUDA", "LoadError", "LoadedVersion", "ModelSession", "SessionBuilder",
           "length_buckets", "load_version", "session_options"]

log = logging.getLogger(__name__)


class CudaUnavailable(Exception):
    """A CUDA attempt that failed. ``kind`` is one of ``sessions.FALLBACK_REASONS``; ``sticky``
    when the machine, not this model, is at fault, so later loads skip CUDA under ``auto``;
    ``precision``: the artifact whose session failed ("" when no session was involved)."""

    def __init__(self, reason: str, kind: str, *, sticky: bool,
                 libraries: tuple[tuple[str, bool], ...] = (), precision: str = "") -> None:
        super().__init__(reason)
        self.reason, self.kind, self.sticky, self.libraries = reason, kind, sticky, libraries
        self.precision = precision


def _steps(failures: list[CudaUnavailable]) -> str:
    """Each failed CUDA step, "fp16: ...; fp32: ..." (a machine's failure has no precision)."""
    return "; ".join(f"{f.precision}: {f.reason}" if f.precision else f.reason
                     for f in failures)


def _combined(failures: list[CudaUnavailable]) -> CudaUnavailable | None:
    """The failures of every CUDA step as one: the reason lists them, the kind is the last's
    (the one that sent the model to CPU)."""
    if not failures:
        return None
    last = failures[-1]
    if len(failures) == 1 and not last.precision:
        return last
    return CudaUnavailable(_steps(failures), last.kind, sticky=last.sticky,
                           libraries=last.libraries, precision=last.precision)


def _library_failure(report: cuda_libraries.CudaLibraryReport) -> CudaUnavailable:
    kind = ("no_gpu_driver" if report.driver_missing else
            "missing_cuda_library" if report.missing else "cuda_driver_error")
    libraries = tuple((s.library.soname, s.loaded) for s in report.statuses
                      if s.library.required)
    return CudaUnavailable(report.reason(), kind, sticky=True, libraries=libraries)


@dataclass
class SessionBuilder:
    """Creates sessions under the device policy; remembers a machine whose CUDA cannot start
    (trying again for every model would only repeat a slow, noisy failure) until
    ``retry_cuda`` (SIGHUP) forgets it."""

    settings: ServeSettings
    factory: SessionFactory = ort_session_factory
    available: Sequence[str] = field(default_factory=ort.get_available_providers)
    # Finds and loads the CUDA libraries; tests pass a report of a machine with a GPU.
    probe_libraries: Callable[[], cuda_libraries.CudaLibraryReport] = cuda_libraries.probe
    cuda_failure: CudaUnavailable | None = None
    _libraries: cuda_libraries.CudaLibraryReport | None = field(default=None, repr=False)

    @property
    def cuda_failed(self) -> bool:
        return self.cuda_failure is not None

    def retry_cuda(self) -> None:
        """Forget an earlier CUDA failure and the library probe: the next load tries again."""
        self.cuda_failure, self._libraries = None, None

    def cuda_may_start(self) -> bool:
        """Whether a CUDA attempt now has a chance: the provider exists, the libraries load."""
        return (self.settings.device != "cpu" and CUDA in self.available
                and self.cuda_failure is None and self._cuda_libraries().usable)

    def create(self, model: ModelVersion, manifest: Manifest, tokenizer: TextTokenizer,
               config: ServingConfig | None = None) -> ModelSession:
        """A verified, warmed-up session; raises LoadError (or ManifestError) when none can
        be served under the policy (``config``: the model's serving.json overrides)."""
        config = config or ServingConfig()
        available = list(self.available)
        machine = self.cuda_failure if self.settings.device == "auto" else None
        if machine is not None:
            available.remove(CUDA)
        elif self.settings.device == "auto" and CUDA not in available:
            machine = CudaUnavailable(
                f"this onnxruntime has no {CUDA} (available: {', '.join(available)}); "
                "install seqserve[gpu] on Linux x86_64", "no_cuda_provider", sticky=True)
        plan = plan_attempts(manifest, self.settings, available, config)
        failures: list[CudaUnavailable] = []  # each CUDA step that failed, in order
        for index, attempt in enumerate(plan):
            if attempt.device == "cuda" and not _worth_trying(attempt, failures):
                continue
            if not attempt.artifact.passed_gates:
                log.warning("%s/%s: serving %s, which failed its export gates (forced)",
                            model.name, model.version, attempt.artifact.precision)
            if attempt.device == "cpu":
                return self._on_cpu(model, manifest, attempt, machine or _combined(failures),
                                    config)
            try:
                return self._on_cuda(model, manifest, attempt, tokenizer, config, failures)
            except CudaUnavailable as failure:
                failures.append(failure)
                retry = next((a for a in plan[index + 1:] if a.device == "cuda"
                              and _worth_trying(a, failures)), None)
                self._cuda_failed(model, failures, retry)
        if self.settings.device == "cuda" and failures:
            raise LoadError(f"{model.name}/{model.version}: device=cuda requested but CUDA "
                            f"cannot serve it: {_steps(failures)}")
        fallback = machine or _combined(failures)
        reason = f": {fallback.reason}" if fallback else ""
        raise LoadError(f"{model.name}/{model.version}: no session could be created{reason}")

    def _cuda_failed(self, model: ModelVersion, failures: list[CudaUnavailable],
                     retry: Attempt | None) -> None:
        where, failure = f"{model.name}/{model.version}", failures[-1]
        if retry is not None:
            log.warning("%s: %s failed on CUDA (%s); trying %s on CUDA", where,
                        failure.precision, failure.reason, retry.artifact.precision)
            return
        if self.settings.device == "cuda":
            return  # refused by the caller, with every step's reason
        first = self.cuda_failure is None
        if failure.sticky:
            self.cuda_failure = failure
        # A machine without a GPU is normal under auto; a GPU machine that cannot use it is not.
        level = logging.INFO if failure.kind == "no_gpu_driver" or not first else logging.WARNING
        log.log(level, "%s: CUDA not used (%s); serving on CPU (`seqserve doctor --device "
                "cuda` explains)", where, _steps(failures))

    def _on_cpu(self, model: ModelVersion, manifest: Manifest, attempt: Attempt,
                fallback: CudaUnavailable | None, config: ServingConfig) -> ModelSession:
        artifact = attempt.artifact
        path = str(verify_artifact(model, artifact))
        threads = choose_threads(manifest, setting=self.settings.intra_op_threads,
                                 config=config)
        raw = self.factory(path, session_options(self.settings, threads=threads.threads),
                           providers_for("cpu", self.settings))
        selection = DeviceSelection(
            fallback_reason=fallback.reason if fallback else "",
            fallback_kind=fallback.kind if fallback else "",
            libraries=fallback.libraries if fallback else (),
            placement=read_placement(raw, path), precision_reason=attempt.reason,
            threads=threads.threads, threads_reason=threads.reason)
        log.info("%s/%s on cpu: %s; %d intra-op threads (%s)", model.name, model.version,
                 attempt.reason, threads.threads, threads.reason)
        session = ModelSession(raw, "cpu", artifact.precision, path=path, selection=selection)
        self._warm_up(session, manifest)
        return session

    def _cuda_libraries(self) -> cuda_libraries.CudaLibraryReport:
        if self._libraries is None:
            # Before anything loads cuBLAS or cuDNN: they read it once, when they initialise.
            pin_tf32_override(self.settings)
            cuda_libraries.preload_onnxruntime_libraries()
            self._libraries = self.probe_libraries()
        return self._libraries

    def _on_cuda(self, model: ModelVersion, manifest: Manifest, attempt: Attempt,
                 tokenizer: TextTokenizer, config: ServingConfig,
                 failures: list[CudaUnavailable]) -> ModelSession:
        libraries = self._cuda_libraries()
        if not libraries.usable:
            raise _library_failure(libraries)
        artifact = attempt.artifact
        threads = choose_threads(manifest, setting=self.settings.intra_op_threads,
                                 config=config, cuda=True)
        session = self._open_cuda(model, artifact, threads.threads)
        forced = effective_precision(self.settings, config)[0] in PRECISIONS
        gate, session = self._regate(model, manifest, artifact, session, tokenizer,
                                     threads.threads, forced=forced)
        loaded = tuple((s.library.soname, True) for s in libraries.statuses
                       if s.library.required)
        reason = after_failures(attempt, [(f.precision or "cuda", f.reason) for f in failures])
        if gate is not None and not gate.passed:
            reason = f"fp32: {artifact.precision} failed its re-gate on the device"
        if session.selection.placement.cpu_compute_nodes:  # served under auto, but said
            reason += (f"; {session.selection.placement.cpu_compute()} (each batch copies "
                       "between devices)")
        session.selection = DeviceSelection(libraries=loaded, gate=gate,
                                            placement=session.selection.placement,
                                            precision_reason=reason, threads=threads.threads,
                                            threads_reason=threads.reason)
        try:
            self._warm_up(session, manifest)
        except LoadError:
            raise  # a wrong output shape is the model's fault on any device
        except Exception as exc:  # ORT's RuntimeException: cuDNN missing, out of memory
            raise CudaUnavailable(f"failed on CUDA at warm-up: {_one_line(exc)}",
                                  "cuda_run_error", sticky=False,
                                  precision=session.precision) from exc
        return session

    def _open_cuda(self, model: ModelVersion, artifact: Artifact, threads: int
                   ) -> ModelSession:
        path = str(verify_artifact(model, artifact))
        # ORT keeps its own level here: the libraries loaded, so what it says (a Memcpy
        # warning, a kernel it lacks) is about this model on this GPU, not noise.
        try:
            raw = self.factory(path, session_options(self.settings, threads=threads),
                               providers_for("cuda", self.settings))
        except Exception as exc:  # ORT raises its own Fail/RuntimeException types
            raise CudaUnavailable(f"creating the CUDA session failed: {_one_line(exc)}",
                                  "cuda_session_error", sticky=False,
                                  precision=artifact.precision) from exc
        if raw.get_providers()[:1] != [CUDA]:
            raise CudaUnavailable(
                f"onnxruntime created a CPU session although the CUDA libraries loaded "
                f"(providers {raw.get_providers()})", "cuda_session_on_cpu", sticky=True,
                precision=artifact.precision)
        placement = read_placement(raw, path)
        where = f"{model.name}/{model.version} {artifact.precision}"
        if placement.cpu_compute_nodes:
            if self.settings.device == "cuda":
                raise LoadError(f"{where}: device=cuda requested but ONNX Runtime placed "
                                f"compute ops on CPU ({placement.summary()})")
            log.warning("%s on CUDA with compute ops on CPU (each batch copies between "
                        "devices): %s", where, placement.summary())
        else:
            log.info("%s on CUDA, %s", where, placement.summary())
        device = f"cuda:{self.settings.cuda_device_id}"
        return ModelSession(raw, device, artifact.precision, path=path,
                            selection=DeviceSelection(placement=placement))

    def _regate(self, model: ModelVersion, manifest: Manifest, artifact: Artifact,
                candidate: ModelSession, tokenizer: TextTokenizer, threads: int, *,
                forced: bool) -> tuple[DeviceGateResult | None, ModelSession]:
        """fp16 under an auto policy is re-gated against fp32 on this device: the result, and
        the session to serve (the candidate if it passed, else the fp32 one)."""
        precision = artifact.precision
        if forced or precision == "fp32":
            return None, candidate  # forced precisions are served as asked
        thresholds = GateThresholds(self.settings.device_gate_min_agreement,
                                    self.settings.device_gate_max_accuracy_drop)
        where = f"{model.name}/{model.version}"
        fp32 = manifest.artifact("fp32")
        if fp32 is None or not fp32.passed_gates:
            raise LoadError(f"{where}: no gated fp32 artifact to re-gate {precision} against "
                            "on CUDA; force --precision to serve it unchecked")
        data = read_evaluation_slice(model, manifest)
        reference = self._open_cuda(model, fp32, threads)
        if data is None:
            result = not_measured(precision, thresholds, "no evaluation slice in the manifest "
                                  f"to re-gate {precision} on this device")
            log.warning("%s: %s", where, result.detail)
            return result, reference
        try:
            result = regate(reference.run, candidate.run, tokenizer, data, thresholds,
                            candidate_precision=precision,
                            fp32_op_types=artifact.fp32_op_types,
                            device=candidate.device)
        except Exception as exc:
            raise CudaUnavailable(f"failed on CUDA running the evaluation slice: "
                                  f"{_one_line(exc)}", "cuda_run_error", sticky=False,
                                  precision=precision) from exc
        log.log(logging.INFO if result.passed else logging.WARNING, "%s: %s", where,
                result.detail)
        return result, candidate if result.passed else reference

    def _warm_up(self, session: ModelSession, manifest: Manifest) -> None:
        if self.settings.warmup:
            spec = manifest.tokenizer
            warm_up(session, len(manifest.labels), spec.max_length, self.settings,
                    pad_id=spec.pad_id)


def _worth_trying(attempt: Attempt, failures: list[CudaUnavailable]) -> bool:
    """Whether a CUDA attempt still has a chance after ``failures``: not once the machine
    failed, nor for an artifact whose session already failed (fp32 as fp16's reference)."""
    if any(f.sticky for f in failures):
        return False
    return not any(f.precision == attempt.artifact.precision for f in failures)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".splitlines()[0]


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
        config = read_serving_config(model.directory.parent)
        session = builder.create(model, manifest, tokenizer, config)
    except (ManifestError, LoadError):
        raise
    except Exception as exc:  # ORT and tokenizers errors: keep the reason, one line
        raise LoadError(f"{model.directory}: {_one_line(exc)}") from exc
    return LoadedVersion(model, manifest, tokenizer, session, time.monotonic() - started)
