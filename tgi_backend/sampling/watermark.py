"""Kirchenbauer et al. (2023) green-list watermark, batched, and its z-score detector.

The green list of a step depends on the previous token only: token v is green after token p when a keyed
integer hash of (p, v) falls below gamma * 2^32. That is the paper's "hash the previous token, seed a PRF"
scheme with the PRF evaluated per (p, v) instead of through a seeded permutation, so a whole batch's green
lists are one tensor expression (TGI draws a randperm per row, in a Python loop). Green logits get +delta.
Detection needs only the token ids: count green tokens and compare with gamma * T (a one-proportion z-test).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

HASH_KEY = 15485863  # TGI's key (the millionth prime)
_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche (lowbias32) on int64 tensors holding values < 2^32; wraps are masked away."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def green_mask(prev_tokens: torch.Tensor, vocab_ids: torch.Tensor, gamma: float, key: int = HASH_KEY) -> torch.Tensor:
    """prev_tokens: [rows] int64, vocab_ids: [cols] int64 -> [rows, cols] bool, True where green."""
    seed = _mix32((prev_tokens.to(torch.int64) * HASH_KEY + key) & _M32)  # [rows]
    x = _mix32((seed.unsqueeze(1) ^ (vocab_ids.to(torch.int64).unsqueeze(0) * 0x9E3779B1)) & _M32)
    return x < int(gamma * (1 << 32))


class Watermark:
    """The logits processor: +delta on each row's green list (rows with `watermark` on)."""

    def __init__(self, gamma: float = 0.5, delta: float = 2.0) -> None:
        self.gamma = gamma
        self.delta = delta
        self._vocab_ids = torch.empty(0, dtype=torch.int64)

    def active(self, params) -> bool:
        return params.watermark

    def __call__(self, logits: torch.Tensor, rows: Sequence) -> torch.Tensor:
        # logits: [rows, vocab]; each row's previous token is the last of its history
        vocab = logits.shape[-1]
        if self._vocab_ids.numel() != vocab:
            self._vocab_ids = torch.arange(vocab, dtype=torch.int64)
        prev = torch.tensor([r.last_token for r in rows], dtype=torch.int64)
        green = green_mask(prev, self._vocab_ids, self.gamma)
        return logits + green.to(logits.dtype) * self.delta


def detect(
    token_ids: Sequence[int], gamma: float = 0.5, prompt_last_token: int | None = None
) -> tuple[float, int, int]:
    """z-score of a token sequence: (z, green count, scored tokens). z > 4 means watermarked (p < 3e-5).

    Each token is scored against the green list of the token before it; the first one against
    `prompt_last_token` when given, else it is only context.
    """
    ids = list(token_ids) if prompt_last_token is None else [prompt_last_token, *token_ids]
    if len(ids) < 2:
        return 0.0, 0, 0
    prev = torch.tensor(ids[:-1], dtype=torch.int64)
    cur = torch.tensor(ids[1:], dtype=torch.int64)
    seed = _mix32((prev * HASH_KEY + HASH_KEY) & _M32)
    green = _mix32((seed ^ (cur * 0x9E3779B1)) & _M32) < int(gamma * (1 << 32))
    t, g = len(cur), int(green.sum())
    z = (g - gamma * t) / math.sqrt(t * gamma * (1 - gamma))
    return z, g, t


def detect_text(text: str, tokenizer, gamma: float = 0.5) -> tuple[float, int, int]:
    """z-score of a text, tokenized without special tokens (re-tokenizing may differ slightly from generation)."""
    return detect(tokenizer.encode(text, add_special_tokens=False), gamma)
