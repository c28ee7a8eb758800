"""Bag-of-embeddings baseline: word order ignored.

    e_t      = Embed(x_t)
    z        = [mean_t e_t ; max_t e_t]          over valid steps only
    logits   = W · Dropout(z) + b

The baseline the comparison starts from: it trains in seconds, and anything the sequence
models gain over it is what word order (or context) is worth on the task.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from models.pooling import lengths_and_mask, masked_max, masked_mean


@dataclass
class BowConfig:
    vocab_size: int
    num_labels: int
    pad_id: int = 0
    embed_dim: int = 128
    dropout: float = 0.3


class BowClassifier(nn.Module):
    def __init__(self, config: BowConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.embed = nn.Embedding(c.vocab_size, c.embed_dim, padding_idx=c.pad_id)
        self.dropout = nn.Dropout(c.dropout)
        self.classifier = nn.Linear(2 * c.embed_dim, c.num_labels)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        _, mask = lengths_and_mask(attention_mask)
        e = self.embed(input_ids)  # [B, T, E]
        z = torch.cat([masked_mean(e, mask), masked_max(e, mask)], dim=-1)
        return self.classifier(self.dropout(z))
