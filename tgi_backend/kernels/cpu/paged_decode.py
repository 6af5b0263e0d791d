"""decode_attention (the op-set contract of layers/platform.py) on the native CPU kernel of paged_decode.c.

It reads each row's K/V where the block table points, so nothing is gathered: the PyTorch path copies every
row's blocks and pads them before one SDPA. Shapes or dtypes the kernel does not take go to that path.
"""
from __future__ import annotations

import torch

from tgi_backend.engine.forward_context import DecodeBatch
from tgi_backend.kernels.cpu import library
from tgi_backend.layers import attention

DTYPES = {torch.bfloat16: 1, torch.float32: 0}  # the kernel's `bf16` flag per dtype


def supports(q: torch.Tensor, k_cache: torch.Tensor, dec: DecodeBatch) -> bool:
    heads, dim, kv_heads = q.shape[1], q.shape[2], k_cache.shape[2]
    return (
        dim % 16 == 0 and dim <= 256 and heads % kv_heads == 0 and heads // kv_heads <= 16  # MAX_VECS, MAX_GROUP
        and q.dtype in DTYPES and k_cache.dtype == q.dtype and q.device.type == "cpu"
        and q.stride(2) == 1 and q.stride(1) == q.shape[2] and k_cache.is_contiguous()
        and dec.block_table.dtype == torch.long and dec.block_table.stride(1) == 1
        and dec.positions.dtype == torch.long and dec.positions.is_contiguous()
    )


def decode_attention(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, dec: DecodeBatch, scale: float,
    window: int | None,
) -> torch.Tensor:
    # q: [rows, heads, dim] (rows may be strided); caches: [blocks, block_size, kv_heads, dim] -> [rows, heads, dim]
    lib = library()
    if lib is None or not supports(q, k_cache, dec) or not v_cache.is_contiguous():
        return attention.decode_attention(q, k_cache, v_cache, dec, scale, window)
    rows, heads, dim = q.shape
    out = torch.empty(rows, heads, dim, dtype=q.dtype)
    if not dec.fits(k_cache.shape[0]):  # the C code indexes memory with them unchecked
        raise ValueError("decode batch out of bounds: a position past its block table, or a block id past the cache")
    status = lib.paged_decode(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), dec.block_table.data_ptr(),
        dec.block_table.stride(0), dec.positions.data_ptr(), out.data_ptr(), rows, heads, k_cache.shape[2], dim,
        k_cache.shape[1], window or 0, scale, torch.get_num_threads(), dec.max_ctx, DTYPES[q.dtype],
    )
    if status == -2:
        raise MemoryError(f"paged_decode: no memory for the scores of {rows} rows")
    if status != 0:
        raise RuntimeError(f"paged_decode rejected heads {heads}, kv_heads {k_cache.shape[2]}, dim {dim}")
    return out
