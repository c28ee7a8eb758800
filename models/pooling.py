"""Masks and pooling over right-padded sequences, shared by every architecture.

Rows are right-padded: row b holds `lengths[b]` real steps followed by padding. Each helper
reads only the valid steps, so what a row's padding holds (and how much of it there is) never
reaches the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_and_mask(attention_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Valid lengths `[B]` (int64) and the boolean valid-step mask `[B, T]`.

    An all-padding row breaks the contract, but a bug upstream could still send one; counting it
    as one step (its [PAD] token) keeps every model finite instead of dividing by zero or taking
    a softmax over nothing. Real rows are unaffected: they have at least one step already.
    """
    lengths = attention_mask.sum(dim=1).clamp(min=1)
    positions = torch.arange(attention_mask.size(1), device=attention_mask.device)
    mask = positions.unsqueeze(0) < lengths.unsqueeze(1)
    return lengths, mask


def masked_mean(h: Tensor, mask: Tensor) -> Tensor:
    """Mean of `h` `[B, T, D]` over the valid steps of each row → `[B, D]`."""
    weights = mask.unsqueeze(-1).to(h.dtype)
    return (h * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def masked_max(h: Tensor, mask: Tensor) -> Tensor:
    """Element-wise max of `h` `[B, T, D]` over the valid steps of each row → `[B, D]`."""
    # The dtype's lowest finite value rather than -inf: it survives an fp16 conversion of the
    # exported graph as a plain large negative constant, and every row has a valid step anyway.
    return h.masked_fill(~mask.unsqueeze(-1), torch.finfo(h.dtype).min).amax(dim=1)


def gather_steps(h: Tensor, index: Tensor) -> Tensor:
    """`h[b, index[b]]` for every row: `[B, T, D]`, `[B]` → `[B, D]`."""
    index = index.view(-1, 1, 1).expand(-1, 1, h.size(2))
    return h.gather(1, index).squeeze(1)
