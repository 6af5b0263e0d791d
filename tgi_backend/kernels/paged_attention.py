"""Paged attention for the GPU in the Triton language: split-K decode and packed varlen prefill.

The cache layout is the PyTorch path's (layers/attention.py): [num_blocks, block_size, kv_heads, head_dim] per
layer, read token by token through a block table, so any block size works and the tables need no alignment.

- Decode: one program per (row, kv head, context partition). It takes the whole GQA group of query heads
  sharing that KV head (padded to 16 rows so `tl.dot` is legal on tensor cores) and keeps an online softmax over
  its partition. With more than one partition a second kernel merges the partials by log-sum-exp, so a long
  context spreads over many programs instead of serialising in one (flash-decoding).
- Prefill: one launch for every chunk of the step. The host turns the `PrefillSegment`s into a flat list of
  query tiles (segment, first row); a program owns one tile and one head, reads the chunk's history (positions
  [0, start_pos)) from the cache through the segment's block table and the chunk's own keys from the batch.

Softmax runs in base 2 (scale folded with log2(e)) and accumulates in float32. On the CPU (TRITON_INTERPRET=1,
set before triton is imported) the operands of `tl.dot` are upcast to float32: the interpreter's 16-bit dot
is wrong. Verified there against layers/attention.py (tests/test_gpu_kernels.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from tgi_backend.engine.forward_context import DecodeBatch, PrefillSegment

LOG2E = 1.4426950408889634
MIN_DOT = 16  # tl.dot wants every dimension >= 16 on the GPU


@triton.jit
def _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, UPCAST: tl.constexpr):
    """One online-softmax step. q: [M, D]; k, v: [N, D]; visible: [M, N] -> updated (m_i, l_i, acc)."""
    if UPCAST:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale  # [M, N], log2 units
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet must not make NaN
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return m_new, l_i, acc


# ---- decode -------------------------------------------------------------------------------------------
@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, table_ptr, pos_ptr,
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr,
    qk_scale, window, block_size,
    stride_qr, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_tr, stride_or, stride_oh,
    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
    PARTITION: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr, UPCAST: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    part = tl.program_id(2)
    num_parts = tl.num_programs(2)
    pos = tl.load(pos_ptr + row)
    lo = tl.where(window > 0, tl.maximum(pos - window + 1, 0), 0)  # keys j with pos - window < j <= pos
    start = lo + part * PARTITION  # partitions count from the first visible key: a window costs no more
    end = tl.minimum(start + PARTITION, pos + 1)

    g = tl.arange(0, GROUP_P2)
    heads = kvh * GROUP + g
    head_ok = g < GROUP
    d = tl.arange(0, DIM_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + row * stride_qr + heads[:, None] * stride_qh + d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # [GROUP_P2, DIM_P2]

    m_i = tl.full((GROUP_P2,), float("-inf"), tl.float32)
    l_i = tl.zeros((GROUP_P2,), tl.float32)
    acc = tl.zeros((GROUP_P2, DIM_P2), tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        t_ok = t < end
        # int64: block * stride passes 2**31 in a large cache
        blk = tl.load(table_ptr + row * stride_tr + t // block_size, mask=t_ok, other=0).to(tl.int64)
        slot_off = t % block_size
        kv_mask = t_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kb + slot_off[:, None] * stride_ks + kvh * stride_kh
                    + d[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, DIM_P2]
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vb + slot_off[:, None] * stride_vs + kvh * stride_vh
                    + d[None, :], mask=kv_mask, other=0.0)
        m_i, l_i, acc = _attend_tile(q, k, v, t_ok[None, :], m_i, l_i, acc, qk_scale, UPCAST)

    if SPLIT:  # unnormalised partials: the reduce kernel weighs them by exp2(max - global max)
        ph = (row * tl.num_programs(1) * GROUP + heads) * num_parts + part  # [GROUP_P2] into [rows, heads, parts]
        tl.store(part_max_ptr + ph, m_i, mask=head_ok)
        tl.store(part_sum_ptr + ph, l_i, mask=head_ok)
        tl.store(part_acc_ptr + ph[:, None] * HEAD_DIM + d[None, :], acc, mask=head_ok[:, None] & d_ok[None, :])
    else:  # one partition holds the whole context: finish here
        out = acc / l_i[:, None]
        tl.store(out_ptr + row * stride_or + heads[:, None] * stride_oh + d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=head_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_reduce_kernel(
    out_ptr, part_acc_ptr, part_max_ptr, part_sum_ptr, num_parts, stride_or, stride_oh,
    HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr, PARTS_P2: tl.constexpr,
):
    row = tl.program_id(0)
    h = tl.program_id(1)
    base = (row * tl.num_programs(1) + h) * num_parts
    p = tl.arange(0, PARTS_P2)
    p_ok = p < num_parts
    d = tl.arange(0, DIM_P2)
    d_ok = d < HEAD_DIM
    m = tl.load(part_max_ptr + base + p, mask=p_ok, other=float("-inf"))  # [PARTS_P2]
    l = tl.load(part_sum_ptr + base + p, mask=p_ok, other=0.0)
    acc = tl.load(part_acc_ptr + (base + p)[:, None] * HEAD_DIM + d[None, :],
                  mask=p_ok[:, None] & d_ok[None, :], other=0.0)  # [PARTS_P2, DIM_P2]
    w = tl.exp2(m - tl.max(m, 0))  # empty partitions (max -inf) weigh 0; the query's own key is never empty
    out = tl.sum(acc * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + row * stride_or + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, dec: DecodeBatch, scale: float,
    window: int | None, partition_size: int = 256, block_n: int = 16,
) -> torch.Tensor:
    """Same contract as layers.attention.decode_attention; no host sync, so a CUDA graph can capture it."""
    # q: [rows, heads, dim]; caches: [num_blocks, block_size, kv_heads, dim] -> [rows, heads, dim]
    rows, heads, dim = q.shape
    kv_heads = k_cache.shape[2]
    group = heads // kv_heads
    assert q.stride(2) == 1 and k_cache.stride(3) == 1 and v_cache.stride(3) == 1, "head_dim must be contiguous"
    assert partition_size % block_n == 0
    out = torch.empty_like(q)
    if rows == 0:
        return out
    span = dec.max_ctx if window is None else min(dec.max_ctx, window)  # widest key range of any row
    num_parts = triton.cdiv(span, partition_size)
    table = dec.block_table[:rows]
    split = num_parts > 1
    if split:
        part_acc = q.new_empty((rows, heads, num_parts, dim), dtype=torch.float32)
        part_max = q.new_empty((rows, heads, num_parts), dtype=torch.float32)
        part_sum = q.new_empty((rows, heads, num_parts), dtype=torch.float32)
    else:  # never written: any float32 tensor will do
        part_acc = part_max = part_sum = q.new_empty((1,), dtype=torch.float32)
    dim_p2 = max(MIN_DOT, triton.next_power_of_2(dim))
    _decode_kernel[(rows, kv_heads, num_parts)](
        q, k_cache, v_cache, table, dec.positions, out, part_acc, part_max, part_sum,
        scale * LOG2E, window or 0, dec.block_size,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        table.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_P2=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=dim, DIM_P2=dim_p2,
        PARTITION=partition_size, BLOCK_N=block_n, SPLIT=split, UPCAST=q.device.type != "cuda",
    )
    if split:
        _decode_reduce_kernel[(rows, heads)](
            out, part_acc, part_max, part_sum, num_parts, out.stride(0), out.stride(1),
            HEAD_DIM=dim, DIM_P2=triton.next_power_of_2(dim), PARTS_P2=triton.next_power_of_2(num_parts),
        )
    return out


# ---- prefill ------------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class PackedPrefill:
    """The step's prefill chunks as int tensors, built once per step and shared by every layer."""

    seg_q_start: torch.Tensor  # [segs] first row of each chunk in the flat batch
    seg_len: torch.Tensor  # [segs]
    seg_start_pos: torch.Tensor  # [segs] position of the chunk's first token (history length)
    seg_table: torch.Tensor  # [segs, max_blocks] history block ids, padded with 0 (never read)
    tile_seg: torch.Tensor  # [tiles] the segment of each query tile
    tile_row: torch.Tensor  # [tiles] the tile's first row within its segment
    block_m: int


def pack_segments(segments: Sequence[PrefillSegment], device: torch.device, block_m: int = 16) -> PackedPrefill:
    """cu_seqlens-style metadata plus a flat tile list, so one launch covers chunks of any lengths."""
    tables = [s.block_table for s in segments]
    width = max([1] + [t.numel() for t in tables if t is not None])
    seg_table = torch.zeros((len(segments), width), dtype=torch.int32)
    for i, t in enumerate(tables):
        if t is not None:
            seg_table[i, : t.numel()] = t.to(torch.int32)
    tile_seg, tile_row = [], []
    for i, s in enumerate(segments):
        for r in range(0, s.length, block_m):
            tile_seg.append(i)
            tile_row.append(r)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return PackedPrefill(
        seg_q_start=ints([s.q_start for s in segments]), seg_len=ints([s.length for s in segments]),
        seg_start_pos=ints([s.start_pos for s in segments]), seg_table=seg_table.to(device),
        tile_seg=ints(tile_seg), tile_row=ints(tile_row), block_m=block_m,
    )


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    seg_q_start_ptr, seg_len_ptr, seg_start_pos_ptr, seg_table_ptr, tile_seg_ptr, tile_row_ptr,
    qk_scale, window, block_size,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    stride_st, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    seg = tl.load(tile_seg_ptr + tile)
    row0 = tl.load(tile_row_ptr + tile)
    q_start = tl.load(seg_q_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    start_pos = tl.load(seg_start_pos_ptr + seg)

    m = row0 + tl.arange(0, BLOCK_M)
    m_ok = m < length
    q_pos = start_pos + m  # [BLOCK_M]
    d = tl.arange(0, DIM_P2)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + (q_start + m)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, DIM_P2]
    hi = start_pos + tl.minimum(row0 + BLOCK_M, length)  # keys past the tile's last query are never seen
    lo = tl.where(window > 0, tl.maximum(start_pos + row0 - window + 1, 0), 0)  # the tile's first visible key

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, DIM_P2), tl.float32)
    n = tl.arange(0, BLOCK_N)
    # history [lo, start_pos): earlier chunks, read from the cache through the segment's block table
    for j0 in range(lo, tl.minimum(start_pos, hi), BLOCK_N):
        j = j0 + n
        j_ok = j < start_pos
        blk = tl.load(seg_table_ptr + seg * stride_st + j // block_size, mask=j_ok, other=0).to(tl.int64)
        off = j % block_size
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + blk[:, None] * stride_kcb + off[:, None] * stride_kcs + kvh * stride_kch
                    + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + blk[:, None] * stride_vcb + off[:, None] * stride_vcs + kvh * stride_vch
                    + d[None, :], mask=kv_mask, other=0.0)
        # history precedes every query (causal holds); only the window can hide it
        visible = j_ok[None, :] & ((window <= 0) | (j[None, :] > q_pos[:, None] - window))
        m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, UPCAST)
    # this chunk's own keys [max(lo, start_pos), hi): straight from the batch, causal
    for j0 in range(tl.maximum(lo, start_pos), hi, BLOCK_N):
        j = j0 + n
        j_ok = j < hi
        rows = q_start + j - start_pos
        kv_mask = j_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + rows[:, None] * stride_kt + kvh * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + rows[:, None] * stride_vt + kvh * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        visible = j_ok[None, :] & (j[None, :] <= q_pos[:, None])
        visible = visible & ((window <= 0) | (j[None, :] > q_pos[:, None] - window))
        m_i, l_i, acc = _attend_tile(q, k, v, visible, m_i, l_i, acc, qk_scale, UPCAST)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows past the chunk saw nothing; they are not stored
    tl.store(out_ptr + (q_start + m)[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    segments: Sequence[PrefillSegment] | PackedPrefill, scale: float, window: int | None,
    out: torch.Tensor | None = None, block_n: int = 16,
) -> torch.Tensor:
    """All prefill chunks in one launch; rows of `out` outside the segments are left as they were.

    q, k, v are the whole flat batch (the segments index it); K/V of the chunks must already be in the cache
    only for the history of later steps: this step's own keys are read from k, v.
    """
    # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> out: [tokens, heads, dim]
    if out is None:
        out = torch.empty_like(q)
    packed = segments if isinstance(segments, PackedPrefill) else pack_segments(segments, q.device)
    num_tiles = packed.tile_seg.numel()
    if num_tiles == 0:
        return out
    tokens, heads, dim = q.shape
    kv_heads = k.shape[1]
    for t in (q, k, v, k_cache, v_cache, out):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    _prefill_kernel[(num_tiles, heads)](
        q, k, v, k_cache, v_cache, out,
        packed.seg_q_start, packed.seg_len, packed.seg_start_pos, packed.seg_table, packed.tile_seg,
        packed.tile_row,
        scale * LOG2E, window or 0, k_cache.shape[1],
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        packed.seg_table.stride(0), out.stride(0), out.stride(1),
        GROUP=heads // kv_heads, HEAD_DIM=dim, DIM_P2=max(MIN_DOT, triton.next_power_of_2(dim)),
        BLOCK_M=packed.block_m, BLOCK_N=block_n, UPCAST=q.device.type != "cuda",
    )
    return out
