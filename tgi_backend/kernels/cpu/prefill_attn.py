"""Prefill attention on AMX, or on AVX2 without AVX-512 (prefill_attn.c), for the cpu op set: every chunk of a
step in one call, its history read back from the paged cache. Where the kernel does not take a step (neither
AMX nor AVX2 alone, not bf16, a head dim that is not a multiple of 32, strides it does not read) the step runs
PyTorch's SDPA per chunk, as the torch set does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from tgi_backend.engine.forward_context import PrefillSegment
from tgi_backend.kernels.cpu import library
from tgi_backend.layers import attention


@dataclass(frozen=True, slots=True)
class Chunks:
    """A step's prefill chunks as the kernel reads them; built once per step (prepare)."""

    segments: list[PrefillSegment]
    rows: torch.Tensor  # [n, 4] int64: q_start, length, start_pos, offset of its block ids in block_ids or -1
    block_ids: torch.Tensor  # the chunks' block ids, concatenated (int64)
    max_block: int  # the largest block id (-1: none; a negative id counts as past the cache), checked
    histories: list[tuple[int, int]]  # (block ids, start_pos) of each chunk with a history
    rows_end: int  # the end of the last chunk's rows, checked against the batch


def prepare(segments: Sequence[PrefillSegment], device: torch.device | None = None) -> Chunks:
    rows, ids, histories, at = [], [], [], 0
    for seg in segments:
        table = None if seg.block_table is None else seg.block_table.reshape(-1).to(torch.int64)
        rows.append((seg.q_start, seg.length, seg.start_pos, -1 if table is None else at))
        if table is not None:
            ids.append(table)
            histories.append((table.numel(), seg.start_pos))
            at += table.numel()
    block_ids = torch.cat(ids) if ids else torch.zeros(1, dtype=torch.int64)
    max_block = -1 if not ids else int(block_ids.max()) if int(block_ids.min()) >= 0 else 1 << 62
    return Chunks(list(segments), torch.tensor(rows, dtype=torch.int64).reshape(-1, 4), block_ids.contiguous(),
                  max_block, histories, max((seg.q_end for seg in segments), default=0))


def available() -> bool:
    """The build has a prefill kernel for this CPU (AMX granted to the process, or AVX2 without AVX-512)."""
    lib = library("prefill_attn")
    return lib is not None and bool(lib.prefill_ready())


def _rows_ok(t: torch.Tensor) -> bool:
    # [tokens, heads, dim]: heads packed, dims contiguous; tokens at any stride
    return t.dtype is torch.bfloat16 and t.device.type == "cpu" and t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]


def _history_ok(chunks: Chunks, k_cache: torch.Tensor) -> bool:
    """The block ids the C code indexes the cache with: inside it, and enough of them for each history."""
    block_size = k_cache.shape[1]
    return chunks.max_block < k_cache.shape[0] and all(n * block_size >= start for n, start in chunks.histories)


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      segments: Chunks | Sequence[PrefillSegment], scale: float, window: int | None,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """layers/platform.py's prefill_attention contract: every chunk's rows of `out` written."""
    chunks = segments if isinstance(segments, Chunks) else prepare(segments)
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lib = library("prefill_attn")
    if (lib is not None and chunks.segments and chunks.rows_end <= min(q.shape[0], k.shape[0], v.shape[0], out.shape[0])
            and all(_rows_ok(t) for t in (q, k, v, out))
            and k_cache.dtype is torch.bfloat16 and v_cache.dtype is torch.bfloat16
            and k_cache.is_contiguous() and v_cache.is_contiguous() and _history_ok(chunks, k_cache)):
        heads, dim = q.shape[1], q.shape[2]
        status = lib.prefill_attention(
            q.data_ptr(), q.stride(0), k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), k_cache.data_ptr(),
            v_cache.data_ptr(), k_cache.shape[1], chunks.rows.data_ptr(), chunks.rows.shape[0],
            chunks.block_ids.data_ptr(), out.data_ptr(), out.stride(0), heads, k.shape[1], dim, float(scale),
            window or 0, torch.get_num_threads())
        if status == 0:
            return out
        if status == -2:
            raise MemoryError("prefill_attention: no memory for the packed keys")
    return attention.prefill_segments_attention(q, k, v, k_cache, v_cache, chunks.segments, scale, window, out=out)
