"""What ``seqserve serve`` would do with one model on this CUDA machine, from the doctor's
sessions: the server's own plan (``planning.plan_attempts``: CUDA fp16, CUDA fp32, CPU) walked
with what each precision's session did here, so the prediction follows the same order and
the same rules (a silent CPU session ends the CUDA attempts; ``--device cuda`` refuses compute
ops on CPU, ``auto`` serves them with a warning).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from service.repo.manifest import PRECISIONS, Manifest
from service.repo.serving_config import ServingConfig
from service.server.device_gate import Comparison, EvaluationSliceData, GateThresholds
from service.server.placement import Placement
from service.server.planning import after_failures, effective_precision, plan_attempts
from service.server.sessions import CPU, CUDA, LoadError
from service.server.settings import ServeSettings

# The doctor's note for ORT's silent CPU session; the server treats it as the machine's fault.
CPU_SESSION = "asked for CUDA, onnxruntime created a CPU session"
REFUSED = "nothing: `seqserve serve --device cuda` refuses it"


class PrecisionReport(Protocol):
    """What the doctor saw of one precision's session (``doctor.PrecisionReport``)."""

    precision: str
    device: str
    placement: Placement
    vs_fp32: Comparison | None
    error: str


@dataclass
class Prediction:
    served: str  # "fp16 on cuda:0 (...)", "int8 on cpu — ... (CUDA failed: ...)", "nothing..."
    refusals: list[str] = field(default_factory=list)  # why --device cuda refuses the model
    warnings: list[str] = field(default_factory=list)  # served, but worth an operator's look


def predict_cuda(entries: Mapping[str, PrecisionReport], settings: ServeSettings,
                 manifest: Manifest, config: ServingConfig,
                 data: EvaluationSliceData | None) -> Prediction:
    """Walk the server's plan under ``settings.device`` with the sessions opened on CUDA."""
    try:
        plan = plan_attempts(manifest, settings, [CUDA, CPU], config)
    except LoadError as exc:
        return Prediction(f"nothing ({exc})", [str(exc)])
    forced = effective_precision(settings, config)[0] in PRECISIONS
    thresholds = GateThresholds(settings.device_gate_min_agreement,
                                settings.device_gate_max_accuracy_drop)
    failed: list[tuple[str, str]] = []  # (precision, why) of each CUDA step that failed
    warnings: list[str] = []
    for attempt in plan:
        precision = attempt.artifact.precision
        if attempt.device == "cpu":
            steps = "; ".join(f"{p}: {why}" for p, why in failed)
            return Prediction(f"{precision} on cpu — {attempt.reason} (CUDA failed: {steps})",
                              warnings=warnings)
        if any(why == CPU_SESSION for _, why in failed) or any(p == precision
                                                                for p, _ in failed):
            continue
        regated = not forced and precision != "fp32"
        opened = [entries[p] for p in ((precision, "fp32") if regated else (precision,))]
        # As the server meets them: each session created and placed, then the runs.
        broken = None
        for entry in opened:  # created, then placed, one session after the other
            if entry.error and not entry.error.startswith("run:"):
                broken = entry
                break
            if settings.device == "cuda" and entry.placement.cpu_compute_nodes:
                return Prediction(REFUSED, [_compute_on_cpu(entry)])  # the server's LoadError
        broken = broken or next((e for e in opened if e.error), None)  # then the runs
        if broken is not None:
            failed.append((broken.precision, broken.error))
            continue
        if failed:
            warnings.append(f"{'; '.join(f'{p} failed on CUDA: {why}' for p, why in failed)}"
                            f"; serving {precision} on CUDA")
        served, detail = entries[precision], f"— {after_failures(attempt, failed)}"
        if regated:
            comparison = served.vs_fp32
            if data is not None and comparison is not None and thresholds.passes(comparison):
                detail = "(re-gate passed on this device)"
            else:
                why = "no evaluation slice" if data is None else "its re-gate fails on this device"
                served, detail = entries["fp32"], f"({precision}: {why})"
        if served.placement.cpu_compute_nodes:
            warnings.append(f"{_compute_on_cpu(served)}: served anyway under --device auto, "
                            "each batch copies between devices")
        return Prediction(f"{served.precision} on {served.device} {detail}", warnings=warnings)
    return Prediction(REFUSED, [f"{p}: {why}" for p, why in failed], warnings)


def _compute_on_cpu(entry: PrecisionReport) -> str:
    return (f"{entry.precision}: compute ops on CPU "
            f"({', '.join(entry.placement.cpu_compute_nodes[:4])})")
