"""Token embedding and the LM head (which may share the embedding's weight)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tgi_backend.layers.linear import MatmulPlan, PackedWeight, bf16_upcast_min_rows, linear, prepack_weight


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [tokens] -> [tokens, hidden]
        return F.embedding(ids, self.weight)


class LMHead(nn.Module):
    """Logits for the rows given only: the runner passes the last hidden state of each sampled chunk."""

    def __init__(self, vocab_size: int, hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden), requires_grad=False)
        self.upcast_rows = bf16_upcast_min_rows()
        self.packed: PackedWeight | None = None
        self.tied = False

    def tie(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight
        self.tied = True

    def prepack(self, plan: MatmulPlan | None) -> None:
        """As Linear.prepack; a tied weight stays, since the embedding reads it."""
        prepack_weight(self, plan, keep_plain=self.tied)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden] -> [rows, vocab] float32
        # float32 logits: sampling wants them, and argmax over bf16 is 2x slower on CPU
        return linear(hidden, self.weight, None, self.upcast_rows, torch.float32, self.packed)
