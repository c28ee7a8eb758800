"""One screen from the GPU check's JSON: what ran where, and the numbers the README waits for."""

from __future__ import annotations

from typing import Any


def _num(value: Any, digits: int = 3) -> str:
    return "-" if not isinstance(value, int | float) else f"{value:.{digits}g}"


def _smoke(stage: dict[str, Any]) -> list[str]:
    gpus = stage.get("nvidia_smi", {}).get("gpus") or [{}]
    gpu = gpus[0]
    torch = stage.get("torch", {})
    ort = stage.get("onnxruntime", {})
    lines = [f"smoke: {gpu.get('name', '-')} driver {gpu.get('driver_version', '-')}, "
             f"torch {torch.get('version', '-')} CUDA {torch.get('cuda', '-')} cuDNN "
             f"{torch.get('cudnn', '-')}, onnxruntime {ort.get('version', '-')} "
             f"{'+CUDA' if 'CUDAExecutionProvider' in ort.get('providers', []) else 'no CUDA'}"]
    for name in ("fp32", "fp16"):
        run = stage.get(name, {})
        placement = run.get("placement", {})
        lines.append(f"  tiny LSTM+MatMul {name}: " + (run["error"] if "error" in run else
                     f"{run.get('providers', ['-'])[0]}, {run.get('summary', '-')}, Memcpy "
                     f"{placement.get('memcpy_nodes', '-')}"))
    if "fp16_max_abs_diff" in stage:
        lines.append(f"  fp16 vs fp32 max abs diff {_num(stage['fp16_max_abs_diff'])}")
    if stage.get("failure"):
        lines.append(f"  FAILED: {stage['failure']}")
    return lines


def _doctor(results: list[dict[str, Any]]) -> list[str]:
    lines = ["doctor (per model and precision on the device: agreement with fp32, accuracy):"]
    for result in results:
        if "skipped" in result or "json" not in result:
            reason = result.get("skipped") or result.get("error") or \
                f"exit {result.get('exit_code')}"
            lines.append(f"  {result.get('model')}: {reason}")
            continue
        for model in result["json"].get("models", []):
            cells = []
            for precision in model.get("precisions", []):
                versus = precision.get("vs_fp32") or {}
                cells.append(f"{precision['precision']} {precision.get('device') or 'failed'}"
                             + (f" agree {_num(versus.get('agreement'))} acc "
                                f"{_num(versus.get('accuracy'))}" if versus else ""))
            lines.append(f"  {model['name']}: serves {model.get('served') or '-'}; "
                         + "; ".join(cells)
                         + (f"; problems: {model['problems']}" if model.get("problems") else ""))
    return lines


def _serve(stage: dict[str, Any]) -> list[str]:
    if "error" in stage:
        return [f"serve --device auto --precision auto: {stage['error']}"]
    lines = ["serve --device auto --precision auto (GetModel):"]
    for model in stage.get("models", []):
        gate = model.get("device_gate") or {}
        lines.append(f"  {model['name']}: {model['device']} {model['precision']} "
                     f"({model.get('precision_reason') or '-'})"
                     + (f", re-gate agreement {_num(gate.get('agreement'))}" if gate else "")
                     + (f", fallback: {model['device_fallback_reason']}"
                        if model.get("device_fallback_reason") else ""))
    return lines


def _torch(stage: dict[str, Any]) -> list[str]:
    lines = ["torch (fp32 with TF32 off against half() and autocast):"]
    for run in stage.get("runs", []):
        if "error" in run or "skipped" in run:
            lines.append(f"  {run.get('run')}: {run.get('error') or run.get('skipped')}")
            continue
        parts = [f"fp32 acc {_num(run['fp32']['accuracy'])}"]
        for name in ("fp16", "autocast_fp16"):
            variant = run.get(name, {})
            parts.append(f"{name} " + (variant["error"] if "error" in variant else
                         f"agree {_num(variant.get('agreement'))} acc "
                         f"{_num(variant.get('accuracy'))}"))
        lines.append(f"  {run['run']}: " + ", ".join(parts))
    return lines


def _bench(results: list[dict[str, Any]]) -> list[str]:
    lines = ["bench (p50/p99 ms at 1 caller, texts/s at 32):",
             "  model                     prec  tokens  p50     p99     texts/s"]
    for result in results:
        if "cells" not in result:
            reason = result.get("skipped") or result.get("error") or \
                f"exit {result.get('exit_code')}"
            lines.append(f"  {result['model']:<25} {result['precision']:<5} {reason}")
            continue
        by_length: dict[int, dict[int, dict[str, Any]]] = {}
        for cell in result["cells"]:
            by_length.setdefault(cell["length"], {})[cell["concurrency"]] = cell
        for length, cells in sorted(by_length.items()):
            single = (cells.get(1) or {}).get("latency_ms") or {}
            busy = cells.get(32) or {}
            lines.append(f"  {result['model']:<25} {result['precision']:<5} {length:>6}  "
                         f"{_num(single.get('p50')):<7} {_num(single.get('p99')):<7} "
                         f"{_num(busy.get('texts_per_s'), 4)}")
    return lines


def summary_lines(document: dict[str, Any]) -> list[str]:
    stages = document.get("stages", {})
    lines = [f"== GPU check on {document.get('device')}: "
             f"{document.get('seconds', {}).get('total', '-')} s"]
    renderers = {"smoke": _smoke, "doctor": _doctor, "serve": _serve, "torch": _torch,
                 "bench": _bench}
    for name, render in renderers.items():
        if name not in stages:
            continue
        stage = stages[name]
        if isinstance(stage, dict) and set(stage) <= {"skipped", "error"} and stage:
            lines.append(f"{name}: {stage.get('skipped') or stage.get('error')}")
            continue
        try:
            lines.extend(render(stage))
        except (KeyError, TypeError, AttributeError) as exc:  # a shape no stage promised
            lines.append(f"{name}: (cannot summarise: {type(exc).__name__} {exc})")
    return lines
