"""rope_store (the op-set contract of layers/platform.py) on the native kernel of rope_store.c: rotary on the
q and k heads of the packed qkv projection, in place, and k and v written to their cache slots, in one pass."""
from __future__ import annotations

import torch

from tgi_backend.kernels.cpu import library
from tgi_backend.layers.attention import torch_rope_store

DTYPES = {torch.bfloat16: 1, torch.float32: 0}
MAX_DIM = 512  # rope_store.c's MAX_DIM


def supports(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
             k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor) -> bool:
    dim = k_cache.shape[-1]
    tokens = qkv.shape[0] if qkv.dim() == 2 else -1
    return (
        qkv.dim() == 2 and qkv.dtype in DTYPES and qkv.device.type == "cpu" and qkv.stride(1) == 1
        and qkv.shape[1] == (heads + 2 * kv_heads) * dim and dim % 2 == 0 and 2 <= dim <= MAX_DIM
        and all(t.dtype == qkv.dtype and t.is_contiguous() for t in (cos, sin, k_cache, v_cache))
        and cos.numel() == sin.numel() == tokens * dim and k_cache.shape == v_cache.shape
        and k_cache.shape[-2] == kv_heads
        and slot_mapping.dtype == torch.long and slot_mapping.is_contiguous() and slot_mapping.numel() == tokens
    )


def rope_store(
    qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # qkv: [tokens, (heads + 2 * kv_heads) * dim], rotated in place; cos, sin: [tokens, 1, dim] (sin signed)
    lib = library("rope_store")
    if lib is None or not supports(qkv, cos, sin, heads, kv_heads, k_cache, v_cache, slot_mapping):
        return torch_rope_store(qkv, cos, sin, heads, kv_heads, k_cache, v_cache, slot_mapping)
    dim = k_cache.shape[-1]
    slots = k_cache.numel() // (kv_heads * dim)
    status = lib.rope_store(
        qkv.data_ptr(), qkv.shape[0], qkv.stride(0), cos.data_ptr(), sin.data_ptr(), k_cache.data_ptr(),
        v_cache.data_ptr(), slot_mapping.data_ptr(), slots, heads, kv_heads, dim, torch.get_num_threads(),
        DTYPES[qkv.dtype],
    )
    if status == -3:
        raise ValueError(f"slot mapping out of bounds: a slot outside the cache's {slots}")
    if status != 0:
        raise RuntimeError(f"rope_store rejected head dim {dim}")
    q = qkv[:, : heads * dim].view(-1, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(-1, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
    return q, k, v
