"""The architectures keep the shared contract: shapes, padding invariance, registry errors."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import pytest
import torch
from harness.synthetic import tiny_encoder

from models import ARCHITECTURES, CONFIGS, LSTMClassifier, create_model, default_config
from models.lstm import reverse_within_lengths
from models.pooling import lengths_and_mask

VOCAB, LABELS = 50, 3
TINY: dict[str, dict[str, Any]] = {
    "lstm": {"embed_dim": 16, "hidden_dim": 12},
    "transformer": {"d_model": 16, "num_heads": 2, "num_layers": 2, "ff_dim": 32},
    "bow": {"embed_dim": 16},
    "pretrained": tiny_encoder(VOCAB),
}


def tiny_model(architecture: str, **overrides: Any) -> torch.nn.Module:
    config = asdict(default_config(architecture, vocab_size=VOCAB, num_labels=LABELS))
    config.update(TINY[architecture], **overrides)
    torch.manual_seed(0)
    return create_model(architecture, config)


def right_padded(lengths: list[int], total: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch with these row lengths, padded with id 0 to `total` (default: longest)."""
    total = total or max(lengths)
    generator = torch.Generator().manual_seed(sum(lengths) + total)
    input_ids = torch.randint(1, VOCAB, (len(lengths), total), generator=generator)
    attention_mask = (torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]).long()
    return input_ids * attention_mask, attention_mask


@pytest.fixture
def restore_lstm_packing() -> Iterator[None]:
    """Tests may force the LSTM's packed or unpacked path; put the default back afterwards."""
    default = LSTMClassifier.pack_sequences
    try:
        yield
    finally:
        LSTMClassifier.pack_sequences = default


def test_registry_covers_the_four_architectures() -> None:
    assert set(ARCHITECTURES) == set(CONFIGS) == {"lstm", "transformer", "bow", "pretrained"}
    for architecture in ARCHITECTURES:
        config = default_config(architecture, vocab_size=VOCAB, num_labels=LABELS)
        config = type(config)(**{**asdict(config), **TINY[architecture]})
        assert (config.vocab_size, config.num_labels, config.pad_id) == (VOCAB, LABELS, 0)
        assert isinstance(create_model(architecture, asdict(config)), ARCHITECTURES[architecture])


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_output_shape_and_dtype(architecture: str) -> None:
    model = tiny_model(architecture).eval()
    for lengths in ([5, 2, 7], [1]):
        with torch.no_grad():
            logits = model(*right_padded(lengths))
        assert logits.shape == (len(lengths), LABELS)
        assert logits.dtype == torch.float32
        assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("architecture", "pack"),
    [("bow", None), ("lstm", False), ("lstm", True), ("transformer", None)],
)
def test_padding_never_changes_a_rows_logits(
    architecture: str, pack: bool | None, restore_lstm_packing: None
) -> None:
    LSTMClassifier.pack_sequences = pack
    model = tiny_model(architecture).eval()
    lengths = [40, 4, 1, 17, 4]  # 40× the shortest: most of the batch is padding
    input_ids, attention_mask = right_padded(lengths, total=48)
    with torch.no_grad():
        batched = model(input_ids, attention_mask)
        for row, length in enumerate(lengths):
            alone = model(input_ids[row : row + 1, :length], attention_mask[row : row + 1, :length])
            torch.testing.assert_close(batched[row : row + 1], alone, atol=1e-5, rtol=0)


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_all_padding_row_stays_finite(architecture: str) -> None:
    # Outside the contract, but one bad row must not poison a served batch with NaN.
    model = tiny_model(architecture).eval()
    input_ids, attention_mask = right_padded([6, 3])
    input_ids[1], attention_mask[1] = 0, 0
    with torch.no_grad():
        assert torch.isfinite(model(input_ids, attention_mask)).all()


def test_reverse_within_lengths_reverses_only_valid_steps() -> None:
    x = torch.arange(10.0).view(2, 5, 1).clone()
    lengths = torch.tensor([5, 3])
    reversed_x = reverse_within_lengths(x, lengths)
    assert reversed_x[:, :, 0].tolist() == [[4, 3, 2, 1, 0], [7, 6, 5, 8, 9]]
    torch.testing.assert_close(reverse_within_lengths(reversed_x, lengths), x)


def test_lengths_and_mask_count_an_empty_row_as_one_step() -> None:
    lengths, mask = lengths_and_mask(torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert lengths.tolist() == [2, 1]
    assert mask.tolist() == [[True, True, False], [True, False, False]]


def test_lstm_packed_and_export_paths_agree(restore_lstm_packing: None) -> None:
    # No dropout, so that training-mode outputs and gradients are comparable between paths.
    model = tiny_model("lstm", embed_dropout=0.0, dropout=0.0)
    input_ids, attention_mask = right_padded([30, 3, 1, 12, 29, 7])

    def outputs_and_grads(pack: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        LSTMClassifier.pack_sequences = pack
        model.zero_grad()
        logits = model(input_ids, attention_mask)
        logits.square().sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    packed_logits, packed_grads = outputs_and_grads(pack=True)
    unpacked_logits, unpacked_grads = outputs_and_grads(pack=False)
    torch.testing.assert_close(unpacked_logits, packed_logits, atol=1e-5, rtol=0)
    assert len(packed_grads) == len(unpacked_grads) > 0
    for unpacked, packed in zip(unpacked_grads, packed_grads, strict=True):
        torch.testing.assert_close(unpacked, packed, atol=1e-5, rtol=1e-4)


def test_transformer_embeddings_start_small() -> None:
    # The init that made the difference on rotten-tomatoes (0.766 vs 0.678, DESIGN.md).
    model = tiny_model("transformer", d_model=64, num_heads=4)
    weight = model.embed.weight.detach()
    assert weight[0].abs().max() == 0  # the [PAD] row
    assert abs(weight[1:].std().item() - 64**-0.5) < 0.02


def test_unknown_architecture_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="bow, lstm, pretrained, transformer"):
        create_model("gru", {"vocab_size": VOCAB, "num_labels": LABELS})
    with pytest.raises(ValueError, match="valid: bow, lstm, pretrained, transformer"):
        default_config("gru", vocab_size=VOCAB, num_labels=LABELS)


def test_bad_config_keys_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown lstm config keys: hiden_dim"):
        create_model("lstm", {"vocab_size": VOCAB, "num_labels": LABELS, "hiden_dim": 8})
    with pytest.raises(ValueError, match="num_labels"):
        create_model("bow", {"vocab_size": VOCAB})
    with pytest.raises(ValueError, match="not divisible"):
        create_model("transformer", {"vocab_size": VOCAB, "num_labels": LABELS, "num_heads": 3})
