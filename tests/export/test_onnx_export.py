"""Exported graphs have dynamic dims and match PyTorch at many shapes, padding included.

Each architecture is exported once (in its own process, as in production) with a tiny config
and random weights; the tests then compare ONNX Runtime with PyTorch on that file.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from harness.synthetic import tiny_encoder

from export.onnx_export import (
    OnnxExportError,
    check_exported_graph,
    export_onnx_in_subprocess,
)
from models import ARCHITECTURES, create_model, default_config
from service.repo.probabilities import softmax

VOCAB, LABELS = 60, 4
TINY: dict[str, dict[str, Any]] = {
    "lstm": {"embed_dim": 16, "hidden_dim": 12},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 2, "ff_dim": 32},
    "bow": {"embed_dim": 16},
    "pretrained": tiny_encoder(VOCAB),
}


class Exported:
    def __init__(self, model: torch.nn.Module, path: Path) -> None:
        self.model = model.eval()
        self.path = path
        self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module", params=sorted(ARCHITECTURES))
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    architecture: str = request.param
    config = asdict(default_config(architecture, vocab_size=VOCAB, num_labels=LABELS))
    config.update(TINY[architecture])
    torch.manual_seed(1)
    model = create_model(architecture, config)
    with torch.no_grad():  # random weights of a trained model's scale, not just the init's
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    directory = tmp_path_factory.mktemp(architecture)
    torch.save(model.state_dict(), directory / "model.pt")
    out = directory / "model.onnx"
    export_onnx_in_subprocess(architecture, config, directory / "model.pt", out)
    return Exported(model, out)


def batch_with_lengths(lengths: list[int], total: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    attention_mask = (np.arange(total)[None, :] < np.array(lengths)[:, None]).astype(np.int64)
    input_ids = rng.integers(1, VOCAB, size=(len(lengths), total)) * attention_mask
    return {"input_ids": input_ids.astype(np.int64), "attention_mask": attention_mask}


def max_probability_difference(exported: Exported, feed: dict[str, np.ndarray]) -> float:
    (onnx_logits,) = exported.session.run(["logits"], feed)
    with torch.no_grad():
        torch_logits = exported.model(*(torch.from_numpy(feed[k]) for k in feed))
    assert onnx_logits.shape == tuple(torch_logits.shape)
    return float(np.abs(softmax(onnx_logits) - torch_logits.softmax(-1).numpy()).max())


def test_graph_has_symbolic_batch_and_sequence(exported: Exported) -> None:
    model = onnx.load(exported.path)
    check_exported_graph(model)
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*model.graph.input, *model.graph.output]
    }
    assert dims == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "logits": ["batch", LABELS],
    }


def test_export_is_one_self_contained_file(exported: Exported) -> None:
    model = onnx.load(exported.path, load_external_data=False)
    assert not any(onnx.external_data_helper.uses_external_data(t) for t in model.graph.initializer)
    assert sorted(p.name for p in exported.path.parent.iterdir()) == ["model.onnx", "model.pt"]


@pytest.mark.parametrize("batch", [1, 7, 32])
@pytest.mark.parametrize("length", [3, 17, 64])
def test_onnx_runtime_matches_pytorch(exported: Exported, batch: int, length: int) -> None:
    rng = np.random.default_rng(batch * 100 + length)
    lengths = rng.integers(1, length + 1, size=batch).tolist()
    lengths[0] = length  # the padded length is the longest row's, as the tokenizer pads
    feed = batch_with_lengths(lengths, length, seed=batch + length)
    assert max_probability_difference(exported, feed) <= 1e-4


@pytest.mark.parametrize("batch", [2, 7, 32])
def test_onnx_runtime_matches_pytorch_under_heavy_padding(exported: Exported, batch: int) -> None:
    # One long row and the rest 10× shorter: most of the tensor is padding.
    lengths = [64] + [6] * (batch - 1)
    feed = batch_with_lengths(lengths, 64, seed=batch)
    assert max_probability_difference(exported, feed) <= 1e-4
    # And each short row gives what it gives without the padding.
    (padded,) = exported.session.run(["logits"], feed)
    alone = batch_with_lengths([6], 6, seed=0)
    alone["input_ids"][0] = feed["input_ids"][-1, :6]
    (unpadded,) = exported.session.run(["logits"], alone)
    np.testing.assert_allclose(padded[-1], unpadded[0], atol=1e-5, rtol=0)


def test_fixed_dimension_is_rejected(exported: Exported) -> None:
    model = onnx.load(exported.path)
    dim = model.graph.input[0].type.tensor_type.shape.dim[1]
    dim.dim_value = 11  # what a silently specialised export looks like
    with pytest.raises(OnnxExportError, match="must be symbolic"):
        check_exported_graph(model)


def test_subprocess_failure_surfaces_the_childs_error(tmp_path: Path) -> None:
    model = create_model("bow", {"vocab_size": VOCAB, "num_labels": LABELS, "embed_dim": 8})
    torch.save(model.state_dict(), tmp_path / "model.pt")
    out = tmp_path / "model.onnx"
    with pytest.raises(OnnxExportError, match=r"(?s)failed \(exit 1\).*size mismatch"):
        # Weights of an 8-wide model into a 16-wide one.
        export_onnx_in_subprocess(
            "bow", {"vocab_size": VOCAB, "num_labels": LABELS, "embed_dim": 16},
            tmp_path / "model.pt", out,
        )
    assert not out.exists()
