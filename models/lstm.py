"""Bidirectional LSTM classifier.

    e_t      = Embed(x_t)                                  (dropout on e)
    →h_t     = LSTM→(e_1 … e_t)                            forward direction
    ←h_t     = LSTM←(e_n … e_t)                            backward direction, n = row length
    h_t      = [→h_t ; ←h_t]
    z        = [max_t h_t ; mean_t h_t ; →h_n ; ←h_1]      over valid steps t = 1 … n only
    logits   = W · dropout(z) + b

The two directions are two one-direction `nn.LSTM`s; the backward one runs forward over a copy
of each row reversed *within its own length*, so its padding, like the forward one's, comes
after the real steps. That gives two execution paths with the same result on valid steps:

- packed sequences (`pack_padded_sequence`), which skip padded steps: used on CUDA, where
  cuDNN takes packed input natively (not timed here: no GPU was at hand);
- plain padded tensors: used on CPU and always under ONNX export. A packed LSTM does not export
  with its lengths, and an unpacked bidirectional `nn.LSTM` would start its backward pass in
  the padding; with padding only ever *after* the real steps, padded steps cannot influence
  valid ones, and the pooling below never reads a padded step. On CPU this path is also the
  faster one (torch 2.13, B64, fwd+bwd, 1 thread: T64 full 102 vs 111 ms packed; lengths 6–64
  97 vs 148 ms; 48–64 106 vs 224 ms): packing's per-step narrowing batches cost more than the
  padded steps they save, all the more with the length-bucketed batches training uses.

Outputs and gradients of the two paths agree (tests/test_models.py).

Final states are read from the output sequence at each row's last valid step, not from `h_n`,
which on the unpacked path would be the state after the padding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from models.pooling import gather_steps, lengths_and_mask, masked_max, masked_mean


@dataclass
class LSTMConfig:
    vocab_size: int
    num_labels: int
    pad_id: int = 0
    embed_dim: int = 128
    hidden_dim: int = 128  # per direction
    num_layers: int = 1
    embed_dropout: float = 0.25
    dropout: float = 0.4  # on the pooled features, before the classifier


def reverse_within_lengths(x: Tensor, lengths: Tensor) -> Tensor:
    """Reverse the first `lengths[b]` steps of every row of `x` `[B, T, D]`; padding stays put.

    It is its own inverse, so the same call maps the backward outputs back to positions.
    """
    positions = torch.arange(x.size(1), device=x.device).unsqueeze(0)  # [1, T]
    last = (lengths - 1).unsqueeze(1)  # [B, 1]
    source = torch.where(positions <= last, last - positions, positions)  # [B, T]
    return x.gather(1, source.unsqueeze(-1).expand(-1, -1, x.size(2)))


def exporting() -> bool:
    """True while a graph is captured for export. Under torch 2.13's `torch.onnx.export(
    dynamo=True)` both flags are set (checked); the first also covers a plain `torch.export`,
    the second the legacy TorchScript exporter."""
    return torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export()


class LSTMClassifier(nn.Module):
    # None: pack on CUDA only (see the module docstring). Tests set True/False to compare the
    # two paths on one device; nothing else should need to touch it. Export never packs.
    pack_sequences: bool | None = None

    def __init__(self, config: LSTMConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.embed_dropout = nn.Dropout(c.embed_dropout)
        inter_layer_dropout = c.dropout if c.num_layers > 1 else 0.0
        self.lstm_fwd = nn.LSTM(c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                                dropout=inter_layer_dropout)
        self.lstm_bwd = nn.LSTM(c.embed_dim, c.hidden_dim, c.num_layers, batch_first=True,
                                dropout=inter_layer_dropout)
        self.dropout = nn.Dropout(c.dropout)
        # max and mean of h (2·hidden each) and the two final states (hidden each)
        self.classifier = nn.Linear(6 * c.hidden_dim, c.num_labels)

    def _run(self, lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
        """Outputs `[B, T, H]` of a one-direction LSTM; only valid steps are meaningful."""
        pack = x.is_cuda if self.pack_sequences is None else self.pack_sequences
        if not pack or exporting():
            out, _ = lstm(x)
            return out
        # pack_padded_sequence wants the lengths on the CPU whatever the device of x.
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.size(1))
        return out

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        lengths, mask = lengths_and_mask(attention_mask)
        e = self.embed_dropout(self.embed(input_ids))  # [B, T, E]

        h_fwd = self._run(self.lstm_fwd, e, lengths)  # [B, T, H]
        h_bwd_reversed = self._run(self.lstm_bwd, reverse_within_lengths(e, lengths), lengths)

        # Each direction's final state sits at the row's last valid step of its own sequence.
        last = lengths - 1
        final = torch.cat([gather_steps(h_fwd, last), gather_steps(h_bwd_reversed, last)], dim=-1)

        h = torch.cat([h_fwd, reverse_within_lengths(h_bwd_reversed, lengths)], dim=-1)
        z = torch.cat([masked_max(h, mask), masked_mean(h, mask), final], dim=-1)  # [B, 6H]
        return self.classifier(self.dropout(z))
