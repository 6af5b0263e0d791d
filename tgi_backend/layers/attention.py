"""Paged attention in plain PyTorch.

Each layer owns a K and a V cache of shape [num_blocks, block_size, kv_heads, head_dim]. A step first writes
the new K/V to their slots, then attends: decode rows all at once (gather each row's blocks, pad, mask, one
SDPA), prefill chunks one SDPA each (a chunk with history reads it back from the cache).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from tgi_backend.engine.forward_context import DecodeBatch, ForwardContext, PrefillSegment, get_forward_context
from tgi_backend.layers.rotary import RotaryEmbedding


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    # k, v: [tokens, kv_heads, head_dim]; caches viewed as [slots, kv_heads, head_dim]
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slot_mapping, v)


def split_rotated(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k (rotated, `RotaryEmbedding.apply_rolled`: sin signed) and v of a packed qkv projection."""
    # qkv: [tokens, (heads + 2 * kv_heads) * dim] -> [tokens, heads | kv_heads | kv_heads, dim]
    dim = qkv.shape[1] // (heads + 2 * kv_heads)
    n_qk = heads + kv_heads
    qk = RotaryEmbedding.apply_rolled(qkv[:, : n_qk * dim].view(-1, n_qk, dim), cos, sin)  # q and k at once
    q, k = qk.split([heads, kv_heads], dim=1)
    return q, k, qkv[:, n_qk * dim :].view(-1, kv_heads, dim)


def torch_rope_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The op-set contract rope_store in PyTorch: split_rotated, then store_kv (the native kernel's reference,
    and its fallback for shapes it does not take)."""
    q, k, v = split_rotated(qkv, cos, sin, heads, kv_heads)
    store_kv(k_cache, v_cache, k, v, slot_mapping)
    return q, k, v


def gather_blocks(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """cache[block_table] as [..., kv_heads, blocks * block_size, head_dim] (SDPA's layout)."""
    g = cache.index_select(0, block_table.reshape(-1))  # [n * blocks, block_size, kv_heads, head_dim]
    g = g.view(*block_table.shape[:-1], -1, *cache.shape[2:])  # [..., ctx, kv_heads, head_dim]
    return g.transpose(-3, -2)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    seg: PrefillSegment, scale: float, window: int | None,
) -> torch.Tensor:
    # q: [len, heads, dim]; k, v: [len, kv_heads, dim] (this chunk's own, already stored in the cache)
    qh = q.transpose(0, 1).unsqueeze(0)
    if seg.block_table is None:
        kh, vh = k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0)
    else:  # history in the cache: read positions [0, ctx_len) back
        kh = gather_blocks(k_cache, seg.block_table)[:, : seg.ctx_len].unsqueeze(0)
        vh = gather_blocks(v_cache, seg.block_table)[:, : seg.ctx_len].unsqueeze(0)
    mask = seg.mask(window)
    out = F.scaled_dot_product_attention(
        qh, kh, vh, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out.squeeze(0).transpose(0, 1)  # [len, heads, dim]


def prefill_segments_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    segments: Sequence[PrefillSegment], scale: float, window: int | None, out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Every prefill chunk of the flat batch, one SDPA each; writes the chunks' rows of `out` only."""
    # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim]
    if out is None:
        out = torch.empty_like(q)
    for seg in segments:
        a, b = seg.q_start, seg.q_end
        out[a:b] = prefill_attention(q[a:b], k[a:b], v[a:b], k_cache, v_cache, seg, scale, window)
    return out


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, dec: DecodeBatch, scale: float,
    window: int | None,
) -> torch.Tensor:
    """One query per row over its gathered blocks, in one SDPA call with an additive mask per group of rows of
    similar length (DecodeBatch.sdpa_groups; usually one group).

    A KV head's query heads are folded into the query length (SDPA sees `group` queries per KV head), so each
    gathered K/V block is read once per KV head; 1.2x (1 row) to 6x (32 rows) faster here than baddbmm +
    softmax + bmm in float32, and 5-12% faster than SDPA's own enable_gqa.
    """
    # q: [rows, heads, dim] -> [rows, heads, dim]
    groups = dec.sdpa_groups(window, q.dtype)
    if len(groups) == 1:
        _, table, mask = groups[0]
        return _decode_sdpa(q, k_cache, v_cache, table, mask, scale)
    out = torch.empty_like(q)  # rows of very different lengths: one SDPA per group, each padded to its own
    for rows, table, mask in groups:
        out.index_copy_(0, rows, _decode_sdpa(q.index_select(0, rows), k_cache, v_cache, table, mask, scale))
    return out


def _decode_sdpa(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor, mask: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    # mask: [rows, 1, 1, ctx], the same for every query head
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    k = k_cache.index_select(0, table.reshape(-1)).view(rows, -1, kv_heads, dim).transpose(1, 2)
    v = v_cache.index_select(0, table.reshape(-1)).view(rows, -1, kv_heads, dim).transpose(1, 2)
    qg = q.view(rows, kv_heads, heads // kv_heads, dim)  # [rows, kv_heads, group, dim]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(rows, heads, dim)


class PagedAttention(nn.Module):
    """Attention over this layer's paged cache; the runner binds the cache with `bind_kv_cache`."""

    fuses_rope_store = True  # forward_packed may hand rotary and the store to the op set (not for subclasses
    # whose forward attends differently)

    def __init__(
        self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.k_cache: torch.Tensor | None = None
        self.v_cache: torch.Tensor | None = None

    def bind_kv_cache(self, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        self.k_cache, self.v_cache = k_cache, v_cache

    def forward_packed(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotary on q and k of a packed qkv projection, the cache store, then the attention; the op set's
        rope_store does the first two in one pass where it has one (the cpu set)."""
        # qkv: [tokens, (heads + 2 * kv_heads) * dim]; cos, sin: [tokens, 1, dim], sin signed -> [tokens, heads, dim]
        ctx = get_forward_context()
        rope_store = ctx.ops.rope_store if ctx.ops is not None and self.fuses_rope_store else None
        if rope_store is None:
            return self(*split_rotated(qkv, cos, sin, self.num_heads, self.num_kv_heads))
        q, k, v = rope_store(qkv, cos, sin, self.num_heads, self.num_kv_heads, self.k_cache, self.v_cache,
                             ctx.slot_mapping)
        return self._attend(ctx, q, k, v)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> [tokens, heads, dim]
        ctx = get_forward_context()
        store = ctx.ops.store_kv if ctx.ops else store_kv
        store(self.k_cache, self.v_cache, k, v, ctx.slot_mapping)
        return self._attend(ctx, q, k, v)

    def _attend(self, ctx: ForwardContext, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention of a step whose K/V are in the cache already (k, v: this chunk's, for prefill)."""
        ops = ctx.ops  # the platform's op set, which the runner picks from the device; None: this module's
        decode = ops.decode_attention if ops else decode_attention
        prefill = ops.prefill_attention if ops else prefill_segments_attention
        kc, vc, w = self.k_cache, self.v_cache, self.sliding_window
        if ctx.decode is not None and not ctx.prefills:
            return decode(q, kc, vc, ctx.decode, self.scale, w)
        out = torch.empty_like(q)
        if ctx.decode is not None:
            n = ctx.decode.num_rows
            out[:n] = decode(q[:n], kc, vc, ctx.decode, self.scale, w)
        if ctx.prefills:
            meta = ctx.prefill_meta if ctx.prefill_meta is not None else ctx.prefills
            out = prefill(q, k, v, kc, vc, meta, self.scale, w, out=out)
        return out
