"""The GPU check's PyTorch stage: the talk's precision claim in real half-precision arithmetic.

For every training run brought along, fp32 against ``model.half()`` (pure fp16: cuDNN's LSTM
then computes in half) and against ``autocast`` (what a deployment would use), over the
evaluation slice of the model version exported from that run: agreement, accuracy, max abs
difference, latency. fp32 here is real fp32: TF32 is off for cuBLAS and cuDNN (``torch.backends``
flags, and ``NVIDIA_TF32_OVERRIDE=0`` from check.sh), so the comparison is not fp16 against
TF32's 10-bit mantissa.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from gpu_common import Budget, newest_versions

TORCH_BATCHES = (1, 32)
TORCH_TOKENS = (16, 256)
EVAL_BATCH = 64


def tf32_off() -> dict[str, Any]:
    """Switch PyTorch's TF32 off for matmuls and cuDNN; what it was and is now."""
    import torch

    before = {"matmul": torch.backends.cuda.matmul.allow_tf32,
              "cudnn": torch.backends.cudnn.allow_tf32}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return {"before": before, "now": {"matmul": False, "cudnn": False}}


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


def stage_torch(runs: Path | None, repository: Path, device: str, timed_runs: int,
                budget: Budget) -> dict[str, Any]:
    if runs is None or not runs.is_dir():
        return {"error": f"--runs {runs}: no training runs brought along", "runs": []}
    document: dict[str, Any] = {"tf32": tf32_off(), "runs": []}
    for run_dir in sorted(p for p in runs.iterdir() if (p / "model.pt").is_file()):
        if budget.left() < 10:
            document["runs"].append({"run": run_dir.name, "skipped": "budget"})
            continue
        started = time.monotonic()
        try:
            result = torch_precision_check(run_dir, repository, device, timed_runs)
        except Exception as exc:  # one broken run must not lose the others
            result = {"run": run_dir.name, "error": f"{type(exc).__name__}: {exc}"[:500]}
        result["seconds"] = round(time.monotonic() - started, 1)
        document["runs"].append(result)
    return document
