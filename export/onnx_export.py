"""PyTorch → ONNX export with dynamic batch and sequence dimensions.

Every model is exported by torch's dynamo exporter (`torch.onnx.export(dynamo=True)`) in
eval mode, to one self-contained `.onnx` file with inputs `input_ids`, `attention_mask`
(int64 `[batch, sequence]`) and output `logits` (float32 `[batch, num_labels]`).

Two things learned the hard way (torch 2.13) shape this module:

- Run each export in a fresh process (`export_onnx_in_subprocess`). The first export of an
  `nn.LSTM` keeps `aten.lstm` whole and translates it to the native ONNX `LSTM` op; in the same
  process a later one decomposes it into an unrolled loop, which specialises the sequence length
  to the example's. `torch.export` reports that as a constraint violation, but the ONNX exporter
  falls back and writes a graph with a fixed sequence length without a word.
- So never trust the exporter: the written graph's input and output dims are checked to be
  symbolic, the file passes `onnx.checker` with `full_check`, and ONNX Runtime must reproduce
  the PyTorch outputs at shapes other than the example's before the file is put in place.

Usage as a program (what `export_onnx_in_subprocess` runs):
    python -m export.onnx_export --architecture lstm --config '{"vocab_size": ...}'
        --weights model.pt --out model.fp32.onnx [--opset 18]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from service.repo.graph import (
    DEFAULT_OPSET,
    INPUT_NAMES,
    OUTPUT_NAME,
    OUTPUT_NAMES,
    open_session,
    run_logits,
)
from service.repo.probabilities import softmax

# An export of these small models takes 2–15 s; the margin covers a loaded 2-core machine.
SUBPROCESS_TIMEOUT_S = 600.0
# Example input shape for tracing. Neither dim may be 0 or 1 (torch.export specialises those),
# and they differ from each other so that no accidental equality between batch and sequence
# can be assumed while tracing.
_EXAMPLE_BATCH, _EXAMPLE_LENGTH = 3, 11
# Shapes (batch, length) run through ONNX Runtime and PyTorch after export; none is the
# example shape, so a dimension fixed inside the graph fails here even if the input dims look
# symbolic. Probabilities must agree to _PARITY_TOLERANCE.
_SMOKE_SHAPES = ((1, 4), (5, 23))
_PARITY_TOLERANCE = 1e-4
_STDERR_TAIL_LINES = 40


class OnnxExportError(RuntimeError):
    """The export failed or produced a graph that breaks the serving contract."""


def export_onnx(model: nn.Module, path: Path, *, opset: int = DEFAULT_OPSET) -> None:
    """Export `model` to `path` and verify the result; `path` is only written if it verifies.

    Prefer `export_onnx_in_subprocess` unless this is the only export in the process.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Beside the target so that the final rename cannot cross file systems.
    tmp_path = path.with_name(f".{path.name}.partial")
    was_training = model.training
    model.eval()
    try:
        device = _device_of(model)
        input_ids, attention_mask = _example_inputs(_vocab_size_of(model), device)
        batch = torch.export.Dim("batch")
        sequence = torch.export.Dim("sequence")
        dims = {0: batch, 1: sequence}
        with quiet_exporter():
            torch.onnx.export(
                model,
                (input_ids, attention_mask),
                tmp_path,
                dynamo=True,
                opset_version=opset,
                input_names=list(INPUT_NAMES),
                output_names=list(OUTPUT_NAMES),
                dynamic_shapes={"input_ids": dims, "attention_mask": dims},
                # The models are megabytes: one file is simpler to hash, publish and serve.
                external_data=False,
                verbose=False,
                report=False,
            )
        check_exported_graph(onnx.load(tmp_path))
        onnx.checker.check_model(str(tmp_path), full_check=True)
        check_parity_at_other_shapes(model, tmp_path)
        os.replace(tmp_path, path)
    finally:
        tmp_path.unlink(missing_ok=True)
        model.train(was_training)


def check_exported_graph(model: onnx.ModelProto) -> None:
    """Raise OnnxExportError unless the graph has the contract's names, types and dynamic dims."""
    graph = model.graph
    inputs = [v.name for v in graph.input]
    outputs = [v.name for v in graph.output]
    if tuple(inputs) != INPUT_NAMES or tuple(outputs) != OUTPUT_NAMES:
        raise OnnxExportError(
            f"exported graph has inputs {inputs} and outputs {outputs}; "
            f"expected {list(INPUT_NAMES)} and {list(OUTPUT_NAMES)}"
        )
    expected_types = {name: onnx.TensorProto.INT64 for name in INPUT_NAMES}
    expected_types[OUTPUT_NAME] = onnx.TensorProto.FLOAT
    for value in [*graph.input, *graph.output]:
        elem_type = value.type.tensor_type.elem_type
        if elem_type != expected_types[value.name]:
            raise OnnxExportError(
                f"exported {value.name!r} has type {onnx.TensorProto.DataType.Name(elem_type)}; "
                f"expected {onnx.TensorProto.DataType.Name(expected_types[value.name])}"
            )

    def dims_of(value: onnx.ValueInfoProto) -> list[str | int]:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    for value in graph.input:
        dims = dims_of(value)
        if len(dims) != 2 or not all(isinstance(d, str) and d for d in dims):
            raise OnnxExportError(
                f"exported input {value.name!r} has dims {dims}; both batch and sequence must "
                "be symbolic. The exporter specialised a dimension to the example input (a "
                "second LSTM export in one process does this): export in a fresh process"
            )
    first_dims = dims_of(graph.input[0])
    if first_dims[0] == first_dims[1]:
        raise OnnxExportError(f"exported batch and sequence share one symbol: {first_dims}")
    if any(dims_of(v) != first_dims for v in graph.input[1:]):
        raise OnnxExportError(
            f"exported inputs disagree on their dims: {[dims_of(v) for v in graph.input]}"
        )
    logits_dims = dims_of(graph.output[0])
    if len(logits_dims) != 2 or logits_dims[0] != first_dims[0]:
        raise OnnxExportError(
            f"exported logits have dims {logits_dims}; expected [{first_dims[0]}, num_labels]"
        )


def export_onnx_in_subprocess(
    architecture: str,
    config: dict[str, Any],
    state_dict_path: Path,
    out_path: Path,
    opset: int = DEFAULT_OPSET,
    *,
    timeout_s: float = SUBPROCESS_TIMEOUT_S,
) -> None:
    """Build `architecture` from `config`, load `state_dict_path`, export to `out_path`, all in
    a fresh Python process (see the module docstring for why). Raises OnnxExportError with the
    child's stderr on failure."""
    command = [
        sys.executable, "-m", "export.onnx_export",
        "--architecture", architecture,
        "--config", json.dumps(config),
        "--weights", str(state_dict_path),
        "--out", str(out_path),
        "--opset", str(opset),
    ]  # fmt: skip
    # The child must import this package even where it is not installed (a plain checkout).
    env = dict(os.environ)
    repo_root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (repo_root, env.get("PYTHONPATH")) if p)
    try:
        result = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        raise OnnxExportError(
            f"ONNX export of {architecture} did not finish within {timeout_s:.0f} s"
        ) from None
    if result.returncode != 0:
        tail = "\n".join(result.stderr.strip().splitlines()[-_STDERR_TAIL_LINES:])
        raise OnnxExportError(
            f"ONNX export of {architecture} failed (exit {result.returncode}):\n{tail}"
        )


def _example_inputs(vocab_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, max(vocab_size, 2), (_EXAMPLE_BATCH, _EXAMPLE_LENGTH),
                              generator=generator)
    attention_mask = torch.ones_like(input_ids)
    # One padded row, so that tracing walks the same masking code a real batch does.
    attention_mask[1, _EXAMPLE_LENGTH // 2:] = 0
    input_ids = input_ids * attention_mask
    return input_ids.to(device), attention_mask.to(device)


def _random_batch(vocab_size: int, batch: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded batch whose first row is full and the others of random lengths."""
    rng = np.random.default_rng(batch * 1000 + length)
    lengths = rng.integers(1, length + 1, size=batch)
    lengths[0] = length
    attention_mask = (np.arange(length)[None, :] < lengths[:, None]).astype(np.int64)
    input_ids = rng.integers(1, max(vocab_size, 2), size=(batch, length)) * attention_mask
    return input_ids.astype(np.int64), attention_mask


def check_parity_at_other_shapes(model: nn.Module, path: Path) -> None:
    """Raises OnnxExportError unless ONNX Runtime reproduces ``model`` at shapes other than
    the example's (a graph that fixed a dimension while tracing fails here)."""
    session = open_session(path)
    device = _device_of(model)
    for batch, length in _SMOKE_SHAPES:
        input_ids, attention_mask = _random_batch(_vocab_size_of(model), batch, length)
        try:
            ort_logits = run_logits(session, input_ids, attention_mask)
        except Exception as e:  # ORT raises its own exception types for shape errors
            raise OnnxExportError(
                f"ONNX Runtime cannot run the exported graph at batch {batch}, length {length}: "
                f"{e}"
            ) from None
        with torch.no_grad():
            torch_logits = model(
                torch.from_numpy(input_ids).to(device), torch.from_numpy(attention_mask).to(device)
            )
        diff = float(
            np.abs(softmax(ort_logits) - torch_logits.softmax(-1).cpu().numpy()).max()
        )
        if not diff <= _PARITY_TOLERANCE:  # `not <=` so that NaN fails too
            raise OnnxExportError(
                f"ONNX Runtime and PyTorch disagree at batch {batch}, length {length}: max abs "
                f"probability difference {diff:.2e} > {_PARITY_TOLERANCE:.0e}"
            )


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _vocab_size_of(model: nn.Module) -> int:
    embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
    return embeddings[0].num_embeddings if embeddings else 2


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's warnings and log lines (torchvision ops it cannot register,
    deprecations inside torch, attribute-assignment notes on nn.LSTM). Real failures still
    raise, and the graph is verified afterwards."""
    logger = logging.getLogger("torch.onnx")
    previous_level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(previous_level)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m export.onnx_export",
        description="Export one trained model to ONNX (run once per fresh process).",
    )
    parser.add_argument("--architecture", required=True)
    parser.add_argument("--config", required=True, help="model config as a JSON object")
    parser.add_argument("--weights", required=True, type=Path, help="state_dict (.pt)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET)
    args = parser.parse_args(argv)

    from models import create_model  # here, so that `--help` does not pay for importing models

    try:
        model = create_model(args.architecture, json.loads(args.config))
        state_dict = torch.load(args.weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state_dict)
        export_onnx(model, args.out, opset=args.opset)
    except (OnnxExportError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
