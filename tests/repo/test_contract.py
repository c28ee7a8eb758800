"""The model-repository contract: manifest graph signature, tokenizer pad id, graph runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from harness.tiny_models import LSTM_NAME
from tokenizers import Tokenizer, models, pre_tokenizers

from service.repo.graph import GraphContractError, check_signature, open_session, run_logits
from service.repo.layout import latest_version
from service.repo.manifest import ManifestError, TensorSpec
from service.repo.tokenization import TextTokenizer, pad_batch
from service.server import ort_logging


def _word_tokenizer(vocabulary: list[str]) -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocabulary)},
                                           unk_token=vocabulary[-1]))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def test_a_published_manifest_is_the_graph_contract(tiny_repository: Path) -> None:
    manifest = latest_version(tiny_repository, LSTM_NAME).load_manifest()
    manifest.check_contract()
    assert [i.name for i in manifest.inputs] == ["input_ids", "attention_mask"]
    assert manifest.outputs[0].shape == ["batch", len(manifest.labels)]


def test_a_manifest_with_other_inputs_or_label_count_is_refused(tiny_repository: Path) -> None:
    manifest = latest_version(tiny_repository, LSTM_NAME).load_manifest()
    renamed = manifest.model_copy(update={"inputs": [
        TensorSpec(name="ids", dtype="int64", shape=["batch", "sequence"]), manifest.inputs[1]]})
    with pytest.raises(ManifestError, match="inputs"):
        renamed.check_contract()
    more_labels = manifest.model_copy(update={"labels": [*manifest.labels, "extra"]})
    with pytest.raises(ManifestError, match="outputs"):
        more_labels.check_contract()


def test_the_graph_runner_checks_and_runs_the_contract(tiny_repository: Path) -> None:
    directory = latest_version(tiny_repository, LSTM_NAME).directory
    session = open_session(directory / "model.fp32.onnx")
    check_signature(session)
    batch = pad_batch([[3, 4, 5], [6]])
    logits = run_logits(session, batch.input_ids, batch.attention_mask)
    assert logits.dtype == np.float32 and logits.shape == (2, 2)


def test_a_graph_with_other_inputs_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["tokens"], ["logits"])], "wrong",
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["b", 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", 2])])
    path = tmp_path / "wrong.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    with pytest.raises(GraphContractError, match="graph inputs are"):
        check_signature(open_session(path))


def test_padding_uses_the_tokenizers_pad_id() -> None:
    tokenizer = TextTokenizer(_word_tokenizer(["<s>", "<pad>", "good", "film", "<unk>"]),
                              max_length=8, pad_id=1)
    batch = tokenizer.encode_batch(["good film", "good"])
    assert batch.input_ids.tolist() == [[2, 3], [2, 1]]
    assert batch.attention_mask.tolist() == [[1, 1], [1, 0]]


def test_a_pad_id_that_is_not_the_tokenizers_pad_token_is_refused() -> None:
    with pytest.raises(ValueError, match="not the tokenizer's pad token"):
        TextTokenizer(_word_tokenizer(["[PAD]", "good", "[UNK]"]), max_length=8, pad_id=1)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        TextTokenizer(_word_tokenizer(["good", "[UNK]"]), max_length=8, pad_id=7)


def test_quieting_ort_restores_the_level_that_was_set_before() -> None:
    previous = ort_logging.set_severity(3)
    try:
        with ort_logging.quiet_ort_logging():
            assert ort_logging.severity() == ort_logging.SILENT
        assert ort_logging.severity() == 3  # not ORT's default of 2
    finally:
        ort_logging.set_severity(previous)
    assert ort.get_available_providers()  # ORT still answers after the level changes
