"""The prepared GPU check: everything the CUDA path claims, measured on one GPU, in one JSON.

Run by ``check.sh`` on the GPU host once the bundle is installed (see README.md here):

1. ``seqserve doctor --device cuda --json``: libraries, driver, per model the provider each
   precision lands on, node placement, fp16/int8 agreement with fp32 on the GPU, latency.
2. PyTorch on the GPU, fp16 against fp32, for every training run brought along (the trained
   LSTM and Transformer, the pretrained model if present): the talk's precision claim in real
   half-precision arithmetic, independent of ONNX Runtime. ``model.half()`` is pure fp16
   (cuDNN's LSTM then computes in half); ``autocast`` is what a deployment would use.
3. ``seqserve bench`` for every model, fp32 against fp16 (forced, so both are measured even
   where the re-gate would pick fp32), on the GPU.

Stages run in that order under one time budget (``--budget-s``); a stage that would not fit is
recorded as skipped, never silently dropped. Sized for <= 8 minutes on one H200 with the two
default models (the pretrained one adds about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

STAGES = ("doctor", "torch", "bench")
PRECISIONS = ("fp32", "fp16")
BENCH_LENGTHS = "16,64,256"
BENCH_CONCURRENCY = "1,32"
TORCH_BATCHES = (1, 32)
TORCH_TOKENS = (16, 64, 256)
EVAL_BATCH = 64
# A bench run is 6 cells of --bench-duration each, plus a server start with warm-up and the
# fp16 re-gate on the GPU: what the budget check reserves before starting one.
BENCH_START_S = 30.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repository", type=Path, required=True, help="model repository")
    parser.add_argument("--runs", type=Path, help="training run directories (for PyTorch)")
    parser.add_argument("--out", type=Path, required=True, help="the JSON file to write")
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
    parser.add_argument("--bench-requests", type=int, default=400)
    parser.add_argument("--bench-duration", type=float, default=5.0)
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown or not stages:
        parser.error(f"--stages: unknown {unknown or 'none given'}; choose from {STAGES}")
    args.stages = stages
    for name in ("budget_s", "doctor_runs", "torch_runs", "bench_requests", "bench_duration"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0")
    if not args.repository.is_dir():
        parser.error(f"--repository {args.repository}: not a directory")
    return args


class Budget:
    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def newest_versions(repository: Path) -> list[Path]:
    """The newest complete version directory of every model."""
    found = []
    for model in sorted(p for p in repository.iterdir() if p.is_dir()):
        versions = [v for v in model.iterdir() if v.name.isdigit() and
                    (v / "manifest.json").is_file()]
        if versions:
            found.append(max(versions, key=lambda v: int(v.name)))
    return found


def run_command(command: list[str], timeout: float) -> dict[str, Any]:
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        return {"command": command, "exit_code": None, "seconds": round(timeout, 1),
                "error": f"timed out after {timeout:.0f}s", "stderr_tail": _tail(exc.stderr)}
    result: dict[str, Any] = {"command": command, "exit_code": done.returncode,
                              "seconds": round(time.monotonic() - started, 1),
                              "stderr_tail": _tail(done.stderr)}
    try:
        result["json"] = json.loads(done.stdout)
    except json.JSONDecodeError:
        result["stdout_tail"] = _tail(done.stdout)
    return result


def _tail(text: Any, chars: int = 3000) -> str:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return (text or "")[-chars:]


def stage_doctor(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    command = [*shlex.split(args.seqserve), "doctor", "--repository", str(args.repository),
               "--device", args.device, "--json", "--runs", str(args.doctor_runs)]
    return run_command(command, timeout=max(10.0, min(180.0, budget.left())))


def plan_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One bench run per model and precision, fp32 first."""
    plans = []
    for version in newest_versions(args.repository):
        for precision in PRECISIONS:
            serve_args = f"--device {args.device} --precision {precision}"
            plans.append({"model": version.parent.name, "precision": precision, "command": [
                *shlex.split(args.seqserve), "bench", "--repository", str(args.repository),
                "--models", version.parent.name, "--serve-args", serve_args,
                "--lengths", BENCH_LENGTHS, "--concurrency", BENCH_CONCURRENCY,
                "--requests", str(args.bench_requests), "--duration", str(args.bench_duration),
                "--texts", "synthetic", "--json"]})
    return plans


def stage_bench(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    cells = len(BENCH_LENGTHS.split(",")) * len(BENCH_CONCURRENCY.split(","))
    needed = cells * args.bench_duration + BENCH_START_S
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
                "length", "concurrency", "precision", "device", "ok", "errors",
                "texts_per_s", "latency_ms", "server")} for cell in document.get("cells", [])]
            outcome["models"] = document.get("models")
        results.append({**plan, **outcome})
    return results


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def evaluation_texts(repository: Path, tokenizer_sha256: str) -> dict[str, Any] | None:
    """The evaluation slice of the model version exported from this run (same tokenizer)."""
    for version in newest_versions(repository):
        manifest = json.loads((version / "manifest.json").read_text(encoding="utf-8"))
        spec = manifest.get("evaluation_slice")
        if manifest["tokenizer"]["sha256"] == tokenizer_sha256 and spec:
            data = json.loads((version / spec["file"]).read_text(encoding="utf-8"))
            return {"model": f"{manifest['name']}/{manifest['version']}",
                    "tokenizer": manifest["tokenizer"], **data}
    return None


def torch_precision_check(run_dir: Path, repository: Path, device: str,
                          runs: int) -> dict[str, Any]:
    """fp32 vs fp16 (``half()``) vs autocast fp16 of one trained model, in PyTorch."""
    import numpy as np
    import torch

    from models import create_model
    from service.repo.tokenization import TextTokenizer, pad_batch

    config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    result: dict[str, Any] = {"run": run_dir.name, "architecture": config["architecture"],
                              "device": device}
    slice_data = evaluation_texts(repository, _sha256(run_dir / "tokenizer.json"))
    if slice_data is None:
        result["error"] = "no exported model version with this run's tokenizer in the repository"
        return result
    spec = slice_data["tokenizer"]
    tokenizer = TextTokenizer.from_file(run_dir / "tokenizer.json", spec["max_length"],
                                        spec.get("pad_id", 0))
    model = create_model(config["architecture"], config["model"])
    model.load_state_dict(torch.load(run_dir / "model.pt", map_location="cpu",
                                     weights_only=True))
    model = model.eval().to(device)
    ids, _ = tokenizer.token_ids(slice_data["texts"])
    order = np.argsort([len(row) for row in ids], kind="stable")
    batches = [pad_batch([ids[i] for i in order[s:s + EVAL_BATCH]], pad_id=tokenizer.pad_id)
               for s in range(0, len(order), EVAL_BATCH)]

    @torch.no_grad()
    def probabilities(net: Any, autocast: bool = False) -> np.ndarray:
        out = []
        for batch in batches:
            inputs = (torch.from_numpy(batch.input_ids).to(device),
                      torch.from_numpy(batch.attention_mask).to(device))
            with torch.autocast(device, dtype=torch.float16, enabled=autocast):
                logits = net(*inputs)
            out.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
        merged = np.empty((len(ids), out[0].shape[1]), dtype=np.float32)
        merged[order] = np.concatenate(out)
        return merged

    labels = np.asarray(slice_data["label_ids"])
    fp32 = probabilities(model)
    result.update(model=slice_data["model"], examples=len(labels),
                  fp32={"accuracy": float((fp32.argmax(1) == labels).mean()),
                        "latency_ms": torch_latency(model, tokenizer, device, runs)})
    variants = {"autocast_fp16": lambda: probabilities(model, autocast=True),
                "fp16": lambda: probabilities(model.half())}  # half() last: it converts
    for name, run in variants.items():
        try:
            lower = run()
        except Exception as exc:  # e.g. CPU kernels without half support
            result[name] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
            continue
        finite = np.isfinite(lower).all(axis=1)
        result[name] = {
            "agreement": float((lower.argmax(1) == fp32.argmax(1)).mean()),
            "accuracy": float((lower.argmax(1) == labels).mean()),
            "max_abs_diff": float(np.abs(np.nan_to_num(lower) - fp32).max()),
            "non_finite_rows": int((~finite).sum())}
        if name == "fp16":
            result[name]["latency_ms"] = torch_latency(model, tokenizer, device, runs)
    return result


def torch_latency(model: Any, tokenizer: Any, device: str, runs: int) -> dict[str, float]:
    import statistics

    import torch

    timings = {}
    for tokens in TORCH_TOKENS:
        if tokens > tokenizer.max_length:
            continue
        for batch in TORCH_BATCHES:
            ids = torch.randint(1, tokenizer.vocab_size, (batch, tokens), device=device)
            mask = torch.ones_like(ids)
            samples = []
            with torch.no_grad():
                for index in range(runs + 1):
                    _synchronize(device)
                    started = time.perf_counter()
                    model(ids, mask)
                    _synchronize(device)
                    if index:  # the first run of a shape picks kernels
                        samples.append(time.perf_counter() - started)
            timings[f"{batch}x{tokens}"] = round(statistics.median(samples) * 1000, 3)
    return timings


def _synchronize(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def stage_torch(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    if args.runs is None or not args.runs.is_dir():
        return [{"error": f"--runs {args.runs}: no training runs brought along"}]
    results = []
    for run_dir in sorted(p for p in args.runs.iterdir() if (p / "model.pt").is_file()):
        if budget.left() < 10:
            results.append({"run": run_dir.name, "skipped": "budget"})
            continue
        started = time.monotonic()
        try:
            result = torch_precision_check(run_dir, args.repository, args.device,
                                           args.torch_runs)
        except Exception as exc:  # one broken run must not lose the others
            result = {"run": run_dir.name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["seconds"] = round(time.monotonic() - started, 1)
        results.append(result)
    return results


def environment() -> dict[str, Any]:
    facts: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(),
                             "cpu_count": os.cpu_count()}
    try:
        import torch

        facts["torch"] = torch.__version__
        facts["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            facts["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        facts["torch"] = None
    try:
        import onnxruntime

        facts["onnxruntime"] = onnxruntime.__version__
        facts["providers"] = onnxruntime.get_available_providers()
    except ImportError:
        facts["onnxruntime"] = None
    return facts


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    started = time.monotonic()
    document: dict[str, Any] = {"environment": environment(), "budget_s": args.budget_s,
                                "device": args.device, "stages": {}}
    runners = {"doctor": stage_doctor, "torch": stage_torch, "bench": stage_bench}
    for stage in STAGES:
        if stage in args.stages:
            begun = time.monotonic()
            document["stages"][stage] = runners[stage](args, budget)
            print(f"gpu_check: {stage} done in {time.monotonic() - begun:.0f}s",
                  file=sys.stderr)
    document["seconds"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"gpu_check: wrote {args.out} in {document['seconds']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
