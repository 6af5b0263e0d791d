"""Writing a step's new K/V rows into the paged cache, for the GPU in the Triton language.

Same contract as layers.attention.store_kv (token i goes to flat slot slot_mapping[i]), with one addition a
CUDA graph needs: a negative slot means "padding row" and is skipped, so a batch padded up to its graph bucket
writes nothing for its padding. One program per token copies K and V for all KV heads at once.
Verified on the CPU under TRITON_INTERPRET=1 (tests/test_gpu_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, block_size,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    KV_HEADS: tl.constexpr, HEADS_P2: tl.constexpr, HEAD_DIM: tl.constexpr, DIM_P2: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # block * stride may pass 2**31 in a big cache
    if slot >= 0:  # padding rows (slot -1) write nothing
        blk = slot // block_size
        off = slot % block_size
        h = tl.arange(0, HEADS_P2)
        d = tl.arange(0, DIM_P2)
        mask = (h < KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :]  # [HEADS_P2, DIM_P2]
        k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
        tl.store(k_cache_ptr + blk * stride_kcb + off * stride_kcs + h[:, None] * stride_kch + d[None, :],
                 k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + blk * stride_vcb + off * stride_vcs + h[:, None] * stride_vch + d[None, :],
                 v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    # k, v: [tokens, kv_heads, head_dim]; caches: [num_blocks, block_size, kv_heads, head_dim]; slot_mapping: [tokens]
    tokens, kv_heads, dim = k.shape
    if tokens == 0:
        return
    for t in (k, v, k_cache, v_cache):
        assert t.stride(-1) == 1, "head_dim must be contiguous"
    _store_kv_kernel[(tokens,)](
        k, v, k_cache, v_cache, slot_mapping, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        KV_HEADS=kv_heads, HEADS_P2=triton.next_power_of_2(kv_heads), HEAD_DIM=dim,
        DIM_P2=triton.next_power_of_2(dim),
    )
