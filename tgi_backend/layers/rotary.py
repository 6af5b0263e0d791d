"""Rotary position embedding (rotate-half / GPT-NeoX layout, as in Llama), with the scaling schemes
registered by their `rope_type` name: default, linear, llama3."""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import torch
from torch import nn


def _default_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _linear(inv_freq: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    # positions / factor is the same as inv_freq / factor
    return inv_freq / float(params["factor"])


def _llama3(inv_freq: torch.Tensor, params: Mapping[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the middle band interpolated.
    factor = float(params["factor"])
    low, high = float(params["low_freq_factor"]), float(params["high_freq_factor"])
    old_len = float(params["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


ROPE_SCALINGS: dict[str, Callable[[torch.Tensor, Mapping[str, Any]], torch.Tensor]] = {
    "default": lambda inv_freq, params: inv_freq,
    "linear": _linear,
    "llama3": _llama3,
}


def rope_inv_freq(head_dim: int, theta: float, rope_type: str = "default", params: Mapping[str, Any] | None = None) -> torch.Tensor:
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"unsupported rope_type {rope_type!r}; supported: {sorted(ROPE_SCALINGS)}")
    return ROPE_SCALINGS[rope_type](_default_inv_freq(head_dim, theta), params or {})


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Precomputes cos/sin for positions [0, max_positions) in float32; applies them in the model's dtype.

    forward(positions, q, k) with q: [tokens, heads, head_dim], k: [tokens, kv_heads, head_dim].
    """

    def __init__(
        self,
        head_dim: int,
        max_positions: int,
        theta: float = 10000.0,
        rope_type: str = "default",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, rope_type, params)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)  # [positions, head_dim]
        self.register_buffer("cos_cached", emb.cos(), persistent=False)
        self.register_buffer("sin_cached", emb.sin(), persistent=False)
        sign = torch.ones(head_dim)
        sign[: head_dim // 2] = -1.0
        self.register_buffer("signed_sin_cached", emb.sin() * sign, persistent=False)  # for apply_rolled

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [tokens, 1, head_dim]; the model computes them once per step and shares them."""
        cos = self.cos_cached.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.sin_cached.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin

    def cos_signed_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin as cos_sin, with sin's first half negated: what `apply_rolled` takes."""
        cos = self.cos_cached.index_select(0, positions).to(dtype).unsqueeze(1)
        sin = self.signed_sin_cached.index_select(0, positions).to(dtype).unsqueeze(1)
        return cos, sin

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    @staticmethod
    def apply_rolled(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """`apply` with the sign of rotate_half moved into signed_sin: bit-identical, 4 ops instead of 6
        (each op costs ~10 us in a decode step whose weights have just swept the caches)."""
        return x * cos + x.roll(x.shape[-1] // 2, -1) * signed_sin

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin(positions, q.dtype)
        return self.apply(q, cos, sin), self.apply(k, cos, sin)
