"""The prepared GPU check: what the CUDA path claims, measured on one GPU, stage by stage.

Run by ``check.sh`` on the GPU host once the bundle is unpacked (see README.md here). Stages,
in order, each writing ``OUT/stage-N-NAME.json`` when it ends and ``OUT/gpu_check.json`` (all
so far), so a stage cut short by the call's time limit loses only itself:

1. ``smoke`` (``gpu_smoke.py``): nvidia-smi, driver, cuDNN, the ORT build, the tree's
   requirements, a tiny LSTM + MatMul graph on CUDA in fp32 and fp16 with the server's options
   (providers, placement, Memcpy nodes). If it fails, the check stops with its one-line reason
   (exit 4): nothing after it could mean anything.
2. ``doctor``: ``seqserve doctor --device cuda --json``, one model per run, so a timeout loses
   one model: libraries, per precision the provider, placement, fp16 against fp32 on the GPU.
3. ``serve`` (``gpu_serve.py``): ``seqserve serve --device auto --precision auto``, the
   server's default path with the fp16 re-gate on the device, and ``GetModel`` for every model.
4. ``torch`` (``gpu_torch.py``): PyTorch fp32 (TF32 off) against ``half()`` and autocast.
5. ``bench``: ``seqserve bench`` per model and precision on CUDA, each cell bounded by time
   (``--bench-duration``), at 16 and 256 tokens, 1 and 32 callers.

Then ``summary.txt`` (``gpu_summary.py``), one screen, also printed. Sized for <= 8 minutes on
one H100/H200 with the two default models, under one time budget (``--budget-s``): a stage or
run that would not fit is recorded as skipped, never silently dropped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpu_common import Budget, newest_versions, run_command
from gpu_serve import stage_serve
from gpu_smoke import stage_smoke
from gpu_summary import summary_lines
from gpu_torch import stage_torch

STAGES = ("smoke", "doctor", "serve", "torch", "bench")
PRECISIONS = ("fp32", "fp16")
BENCH_LENGTHS = "16,256"
BENCH_CONCURRENCY = "1,32"
# A bench run is its cells of --bench-duration each plus a server start with warm-up (and
# ORT's CUDA start-up): what the budget check reserves before starting one.
BENCH_START_S = 20.0
DOCTOR_TIMEOUT_S = 120.0  # per model
SERVE_TIMEOUT_S = 150.0
SMOKE_FAILED = 4


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--runs", type=Path, help="training run directories (for PyTorch)")
    parser.add_argument("--out", type=Path, required=True,
                        help="directory for the stage files, gpu_check.json and summary.txt")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu only to test this script on a machine without a GPU")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)} (default: all)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="wall-clock budget for all stages (default: %(default)s)")
    parser.add_argument("--seqserve", default=f"{sys.executable} -m service",
                        help="how to run seqserve (default: this Python's -m service)")
    parser.add_argument("--doctor-runs", type=int, default=10)
    parser.add_argument("--torch-runs", type=int, default=20)
    parser.add_argument("--bench-duration", type=float, default=4.0,
                        help="seconds each bench cell measures (default: %(default)s)")
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown or 'none given'}; choose from {STAGES}")
    args.stages = stages
    for name in ("budget_s", "doctor_runs", "torch_runs", "bench_duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not args.repository.is_dir():
        parser.error(f"--repository {args.repository}: not a directory")
    return args


def stage_doctor(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    results = []
    for version in newest_versions(args.repository):
        model = version.parent.name
        if budget.left() < 15:
            results.append({"model": model, "skipped": f"budget: {budget.left():.0f}s left"})
            continue
        command = [*shlex.split(args.seqserve), "doctor", "--repository", str(args.repository),
                   "--model", model, "--device", args.device, "--json",
                   "--runs", str(args.doctor_runs)]
        timeout = max(10.0, min(DOCTOR_TIMEOUT_S, budget.left()))
        results.append({"model": model, **run_command(command, timeout=timeout)})
    return results


def plan_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One bench run per model and precision, fp32 first; every cell bounded by time."""
    plans = []
    for version in newest_versions(args.repository):
        for precision in PRECISIONS:
            plans.append({"model": version.parent.name, "precision": precision, "command": [
                *shlex.split(args.seqserve), "bench", "--repository", str(args.repository),
                "--models", version.parent.name, "--serve-args", f"--device {args.device}",
                "--precisions", precision, "--lengths", BENCH_LENGTHS,
                "--concurrency", BENCH_CONCURRENCY, "--requests", "1000000",
                "--duration", str(args.bench_duration), "--texts", "synthetic", "--json"]})
    return plans


def stage_bench(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    cells = len(BENCH_LENGTHS.split(",")) * len(BENCH_CONCURRENCY.split(","))
    needed = cells * (args.bench_duration + 1.0) + BENCH_START_S
    results = []
    for plan in plan_bench(args):
        if budget.left() < needed:
            results.append({**plan, "skipped": f"budget: {budget.left():.0f}s left, a run "
                                               f"needs ~{needed:.0f}s"})
            continue
        outcome = run_command(plan["command"], timeout=min(budget.left(), needed * 3))
        document = outcome.pop("json", None)
        if document is not None:  # keep what compares; the full bench.json is large
            outcome["cells"] = [{key: cell.get(key) for key in (
                "length", "concurrency", "precision", "device", "ok", "errors", "requests",
                "texts_per_s", "latency_ms", "server")} for cell in document.get("cells", [])]
            outcome["models"] = document.get("models")
        results.append({**plan, **outcome})
    return results


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "NVIDIA_TF32_OVERRIDE": os.environ.get("NVIDIA_TF32_OVERRIDE")}


def _write(path: Path, document: Any) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(document, indent=2, default=str) + "\n", encoding="utf-8")
    temporary.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    started = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"environment": environment(), "budget_s": args.budget_s,
                                "device": args.device, "stages": {}, "seconds": {}}
    runners: dict[str, Callable[[], Any]] = {
        "smoke": lambda: stage_smoke(args.device),
        "doctor": lambda: stage_doctor(args, budget),
        "serve": lambda: stage_serve(args.repository, min(SERVE_TIMEOUT_S, budget.left())),
        "torch": lambda: stage_torch(args.runs, args.repository, args.device,
                                     args.torch_runs, budget),
        "bench": lambda: stage_bench(args, budget)}
    code = 0
    for number, stage in enumerate(STAGES, start=1):
        if stage not in args.stages:
            continue
        begun = time.monotonic()
        if budget.left() <= 0:
            result: Any = {"skipped": "budget: no time left"}
        else:
            try:
                result = runners[stage]()
            except Exception as exc:  # a broken stage must not lose the ones after it
                result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        document["stages"][stage] = result
        document["seconds"][stage] = round(time.monotonic() - begun, 1)
        _write(args.out / f"stage-{number}-{stage}.json", result)
        _write(args.out / "gpu_check.json", document)
        print(f"gpu_check: {stage} done in {document['seconds'][stage]:.0f}s", file=sys.stderr)
        if stage == "smoke" and result.get("failure"):
            print(f"gpu_check: smoke failed, stopping: {result['failure']}", file=sys.stderr)
            code = SMOKE_FAILED
            break
    document["seconds"]["total"] = round(time.monotonic() - started, 1)
    _write(args.out / "gpu_check.json", document)
    lines = summary_lines(document)
    (args.out / "summary.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))
    return code


if __name__ == "__main__":
    sys.exit(main())
