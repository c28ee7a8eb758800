"""A fused ONNX graph for pretrained (BERT-like) encoders: ORT's attention kernels on CPU.

The dynamo exporter writes a Hugging Face encoder's attention as MatMul / Softmax / Transpose
in a shape that neither ONNX Runtime's session optimizer nor its offline optimizer
(``onnxruntime.transformers``) recognises, so the fused ``MultiHeadAttention`` kernel is never
used. The same model exported by torch's TorchScript exporter (eager attention, opset 17) has
the pattern the optimizer was written for: per layer it fuses attention into
``MultiHeadAttention``, the residual adds and LayerNorms into ``SkipLayerNormalization`` and the
FFN's bias and GELU into ``BiasGelu``, plus ``EmbedLayerNormalization`` for the embeddings.
``MultiHeadAttention`` (not ``Attention``) keeps the Q, K and V projections as plain MatMuls,
so the int8 artifact still quantizes them.

Like every export, this runs in a fresh process, its dims must be symbolic and ONNX Runtime
must reproduce PyTorch at other shapes; the export gates then check parity on real texts with
heavy padding. Anything that goes wrong leaves the caller with the plain dynamo graph.

    python -m export.fused_export --config '{...}' --weights model.pt --out fused.onnx
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from export.onnx_export import (
    SUBPROCESS_TIMEOUT_S,
    OnnxExportError,
    check_exported_graph,
    check_parity_at_other_shapes,
    quiet_exporter,
)
from service.repo.graph import INPUT_NAMES, OUTPUT_NAMES

log = logging.getLogger(__name__)

#: TorchScript export's opset: the attention fusion was written against its patterns.
FUSED_OPSET = 17
#: Hugging Face model types whose layers ORT's BERT fusion matches.
FUSABLE_MODEL_TYPES = frozenset({"bert", "roberta", "electra", "xlm-roberta"})
#: At least one of these must appear, or the "fused" graph is not worth serving.
ATTENTION_OPS = ("MultiHeadAttention", "Attention")


def fusion_shape(encoder: dict[str, Any]) -> tuple[int, int] | None:
    """(heads, hidden size) for an encoder config ORT's BERT fusion handles, else None."""
    if encoder.get("model_type") not in FUSABLE_MODEL_TYPES:
        return None
    heads, hidden = encoder.get("num_attention_heads"), encoder.get("hidden_size")
    return (int(heads), int(hidden)) if heads and hidden else None


def fused_op_counts(graph: Any) -> dict[str, int]:
    """ONNX Runtime's own (com.microsoft) ops in a model or at a path, and how many."""
    import onnx

    model = onnx.load(str(graph)) if isinstance(graph, str | Path) else graph
    counts: dict[str, int] = {}
    for node in model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def export_fused(model: Any, out: Path, heads: int, hidden: int) -> dict[str, int]:
    """Export ``model`` (a PretrainedClassifier) fused to ``out``; the fused op counts."""
    import torch

    from export.fp16 import ort_transformers_path

    model.eval()
    input_ids = torch.randint(1, 100, (3, 11), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 7:] = 0
    dynamic = {"batch": 0, "sequence": 1}
    axes = {name: {index: dim for dim, index in dynamic.items()} for name in INPUT_NAMES}
    axes[OUTPUT_NAMES[0]] = {0: "batch"}
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        plain = Path(scratch) / "traced.onnx"
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(model, (input_ids, attention_mask), str(plain), dynamo=False,
                              opset_version=FUSED_OPSET, input_names=list(INPUT_NAMES),
                              output_names=list(OUTPUT_NAMES), dynamic_axes=axes)
        with ort_transformers_path(), quiet_exporter():
            from onnxruntime.transformers import optimizer
            from onnxruntime.transformers.fusion_options import FusionOptions

            options = FusionOptions("bert")
            options.use_multi_head_attention = True
            optimized = optimizer.optimize_model(
                str(plain), model_type="bert", num_heads=heads, hidden_size=hidden,
                optimization_options=options, opt_level=0)
            staged = Path(scratch) / "fused.onnx"
            optimized.save_model_to_file(str(staged))
        counts = fused_op_counts(staged)
        if not any(counts.get(op) for op in ATTENTION_OPS):
            raise OnnxExportError(f"the optimizer fused no attention (fused: {counts})")
        import onnx

        check_exported_graph(onnx.load(str(staged)))
        onnx.checker.check_model(str(staged), full_check=True)
        check_parity_at_other_shapes(model, staged)
        os.replace(staged, out)
    return counts


def export_fused_in_subprocess(config: dict[str, Any], weights: Path, out: Path, *,
                               timeout_s: float = SUBPROCESS_TIMEOUT_S) -> dict[str, int]:
    """``export_fused`` in a fresh process; raises OnnxExportError (with the child's last
    line) when it fails."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "export.fused_export", "--config", json.dumps(config),
               "--weights", str(weights), "--out", str(out)]
    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True,
                                timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        raise OnnxExportError(f"fused export did not finish within {timeout_s:.0f} s") from None
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise OnnxExportError(f"fused export failed (exit {result.returncode}): {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


PLAIN_FP32_FILE = ".plain.fp32.onnx"


def fuse_staged_graph(staging: Path, fp32_file: str, config: dict[str, Any],
                      weights: Path) -> Path | None:
    """Put the fused graph at ``staging/fp32_file`` and move the plain dynamo graph aside
    (``PLAIN_FP32_FILE``, the fp16 source: fused ops have no fp16 CPU kernels to gate with);
    returns the plain graph's path, or None (and changes nothing) when the encoder does not
    fuse. The caller deletes the plain graph before publishing."""
    if fusion_shape(config.get("encoder", {})) is None:
        return None
    fused = staging / ".fused.fp32.onnx"
    try:
        counts = export_fused_in_subprocess(config, weights, fused)
    except OnnxExportError as error:
        log.warning("serving the plain graph: %s", error)
        fused.unlink(missing_ok=True)
        return None
    plain = staging / PLAIN_FP32_FILE
    os.replace(staging / fp32_file, plain)
    os.replace(fused, staging / fp32_file)
    log.info("fused graph: %s", ", ".join(f"{op} x{n}" for op, n in sorted(counts.items())))
    return plain


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m export.fused_export",
                                     description="Export a pretrained encoder as a fused graph.")
    parser.add_argument("--config", required=True, help="the pretrained model config (JSON)")
    parser.add_argument("--weights", required=True, type=Path, help="state_dict (.pt)")
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)

    import torch

    from models import create_model

    config = json.loads(args.config)
    shape = fusion_shape(config.get("encoder", {}))
    if shape is None:
        print("error: not a BERT-like encoder ORT can fuse", file=sys.stderr)
        return 2
    try:
        model = create_model("pretrained", config)
        model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
        counts = export_fused(model, args.out, *shape)
    except (OnnxExportError, ValueError, OSError, RuntimeError) as error:
        print(f"error: {type(error).__name__}: {error}".splitlines()[0], file=sys.stderr)
        return 1
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
