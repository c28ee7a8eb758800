"""Which artifact each device attempt serves, and in what order the attempts go.

The server (``runtime.SessionBuilder``) and ``seqserve doctor`` both plan here, so the doctor's
prediction cannot drift from what ``seqserve serve`` does. Under ``--device auto`` on a machine
with CUDA the order is CUDA with the policy's first choice (fp16), CUDA fp32, then CPU; under
``--device cuda`` the same without CPU. The CUDA fp32 step is tried only when the attempt
before it failed for this model (a session that would not create, a run that failed): a
machine whose CUDA cannot start at all goes straight to CPU. Forced precisions are served as
asked, never substituted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.repo.manifest import PRECISIONS, Artifact, Manifest, Precision
from service.repo.serving_config import ServingConfig
from service.server.sessions import CUDA, LoadError
from service.server.settings import ServeSettings


@dataclass(frozen=True)
class Attempt:
    device: str  # "cpu" or "cuda"
    artifact: Artifact
    reason: str = ""  # why this artifact, one line (GetModel's precision_reason)
    # Tried only when the CUDA attempt before it failed for this model (not for the machine).
    after_cuda_failure: bool = False


def plan_attempts(
    manifest: Manifest, settings: ServeSettings, available: Sequence[str],
    config: ServingConfig | None = None,
) -> list[Attempt]:
    """The (device, artifact) pairs to try, in order; raises LoadError when none can work."""
    if settings.device == "cuda" and CUDA not in available:
        raise LoadError(
            f"device=cuda requested but this onnxruntime has no {CUDA} (available: "
            f"{', '.join(available)}); install seqserve[gpu]"
        )
    devices = ["cpu"] if settings.device == "cpu" or CUDA not in available else ["cuda"]
    if settings.device == "auto" and devices == ["cuda"]:
        devices.append("cpu")
    precision, source = effective_precision(settings, config or ServingConfig())
    attempts = []
    for device in devices:
        artifact, reason = choose_artifact(manifest, precision, device, source=source)
        if artifact is None:
            continue
        attempts.append(Attempt(device, artifact, reason))
        fp32 = manifest.artifact("fp32")
        if (device == "cuda" and precision not in PRECISIONS and artifact.precision != "fp32"
                and fp32 is not None and fp32.passed_gates):
            attempts.append(Attempt("cuda", fp32, f"fp32: {_merit(fp32, manifest)}",
                                    after_cuda_failure=True))
    if not attempts:
        have = ", ".join(f"{a.precision} (gates {'passed' if a.passed_gates else 'failed'})"
                         for a in manifest.artifacts)
        raise LoadError(
            f"{manifest.name}/{manifest.version}: no servable artifact for precision="
            f"{precision} (artifacts: {have}); force --precision to serve one that "
            "failed its gates"
        )
    return attempts


def after_failures(attempt: Attempt, failed: Sequence[tuple[str, str]]) -> str:
    """``attempt``'s precision reason once the CUDA steps in ``failed`` ((precision, reason))
    failed: "fp32: fp16 failed on CUDA (...); the reference precision"."""
    if not failed:
        return attempt.reason
    head, _, merit = attempt.reason.partition(": ")
    steps = "; ".join(f"{precision} failed on CUDA ({reason})" for precision, reason in failed)
    return f"{head}: {steps}; {merit}"


def effective_precision(settings: ServeSettings, config: ServingConfig) -> tuple[str, str]:
    """The precision policy for one model and where it came from: its ``serving.json``
    overrides ``--precision``."""
    if config.precision is not None:
        return config.precision, "serving.json"
    return settings.precision, "--precision"


# Which gated artifact each policy tries first, per device. fp16 pays only on a GPU: on CPU ORT
# casts back to fp32 around most ops. int8 has kernels on CPU only; auto serves it there when
# it passed every gate, batch invariance included (a manifest that predates that gate, schema
# 1-2, gets fp32). auto-int8 also takes an int8 artifact without a batch-invariance record.
PREFERENCES: dict[tuple[str, str], tuple[Precision, ...]] = {
    ("auto", "cuda"): ("fp16", "fp32"),
    ("auto", "cpu"): ("int8", "fp32", "fp16"),
    ("auto-int8", "cuda"): ("fp16", "fp32"),
    ("auto-int8", "cpu"): ("int8", "fp32", "fp16"),
}


def choose_artifact(manifest: Manifest, precision: str, device: str, *,
                    source: str = "--precision") -> tuple[Artifact | None, str]:
    """The artifact a policy serves on ``device`` and why (one line); (None, why) if none.
    The server and ``seqserve doctor`` both decide here."""
    if precision in PRECISIONS:
        # Forced: served even when it failed its gates (the operator asked for it).
        artifact = manifest.artifact(precision)  # type: ignore[arg-type]
        if artifact is None:
            return None, f"no {precision} artifact (forced by {source} {precision})"
        return artifact, f"{precision}: forced by {source} {precision}"
    skipped = []
    for wanted in PREFERENCES[(precision, device)]:
        artifact = manifest.artifact(wanted)
        refusal = _refusal(artifact, wanted, precision)
        if refusal is None:
            assert artifact is not None
            because = f" ({'; '.join(skipped)})" if skipped else ""
            return artifact, f"{wanted}: {_merit(artifact, manifest)}{because}"
        if wanted != "fp16" or device == "cuda":
            skipped.append(refusal)
    return None, "; ".join(skipped)


def _refusal(artifact: Artifact | None, precision: str, policy: str) -> str | None:
    """Why ``policy`` will not serve ``artifact``, or None if it will."""
    if artifact is None:
        return f"no {precision} artifact"
    if not artifact.passed_gates:
        return f"{precision} failed its export gates"
    if precision == "int8" and policy == "auto" and artifact.batch_max_abs_diff is None:
        return "int8 predates the batch-invariance gate (re-export it)"
    return None


def _merit(artifact: Artifact, manifest: Manifest) -> str:
    if artifact.precision == "fp32":
        return "the reference precision"
    evaluation = manifest.evaluation
    parts = ["passed its export gates"]
    if evaluation is not None and artifact.precision == "int8" and evaluation.int8 is not None:
        drop = (evaluation.fp32.accuracy - evaluation.int8.accuracy) * 100
        parts.append(f"agreement {evaluation.int8_agreement or 0:.3f}, accuracy "
                     f"{'-' if drop > 0 else '+'}{abs(drop):.2f} points")
    if artifact.batch_max_abs_diff is not None:
        parts.append(f"batch-invariant to {artifact.batch_max_abs_diff:.0e}")
    return ", ".join(parts)

