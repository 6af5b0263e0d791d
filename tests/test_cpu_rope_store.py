"""The native rotary + K/V store (kernels/cpu/rope_store.c) against the PyTorch path it replaces, bit for bit,
its refusals and fallbacks, and the attention layer handing it the packed projection."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.kernels.cpu import library, rope_store
from tgi_backend.layers.attention import PagedAttention, torch_rope_store
from tgi_backend.layers.platform import get_ops
from tgi_backend.layers.rotary import RotaryEmbedding
from tgi_backend.models.gemma import SoftcapPagedAttention

needs_kernel = pytest.mark.skipif(library("rope_store") is None, reason="no C compiler: the kernel did not build")


def _problem(tokens, heads, kv_heads, dim, dtype, extra_columns=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(tokens, width + extra_columns, generator=g).to(dtype)[:, :width]  # maybe strided rows
    rope = RotaryEmbedding(dim, 4096)
    positions = torch.randint(0, 4096, (tokens,), generator=g)
    cos, sin = rope.cos_signed_sin(positions, dtype)
    blocks, bs = tokens // 4 + 3, 4
    kc = torch.zeros(blocks, bs, kv_heads, dim, dtype=dtype)
    vc = torch.zeros_like(kc)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    return qkv, cos, sin, kc, vc, slots


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("tokens,heads,kv_heads,dim,extra", [
    (1, 8, 2, 64, 0), (5, 4, 4, 16, 0), (3, 14, 2, 64, 32), (700, 8, 2, 64, 0), (9, 2, 1, 80, 0), (2, 1, 1, 2, 0),
])
def test_kernel_equals_the_torch_path(dtype, tokens, heads, kv_heads, dim, extra):
    # 700 tokens: the threaded path (a prefill chunk); extra: rows strided as in a wider buffer
    qkv, cos, sin, kc, vc, slots = _problem(tokens, heads, kv_heads, dim, dtype, extra)
    want_kc, want_vc = kc.clone(), vc.clone()
    want = [t.clone() for t in torch_rope_store(qkv.clone(), cos, sin, heads, kv_heads, want_kc, want_vc, slots)]
    assert rope_store.supports(qkv, cos, sin, heads, kv_heads, kc, vc, slots)
    got = rope_store.rope_store(qkv, cos, sin, heads, kv_heads, kc, vc, slots)
    for g, w in zip(got, want):
        assert g.shape == w.shape and torch.equal(g, w)
    assert torch.equal(kc, want_kc) and torch.equal(vc, want_vc)


@needs_kernel
def test_a_slot_outside_the_cache_is_refused_and_nothing_written():
    qkv, cos, sin, kc, vc, slots = _problem(4, 4, 2, 16, torch.bfloat16)
    before = qkv.clone()
    for bad in (kc.shape[0] * kc.shape[1], -1):
        slots[2] = bad
        with pytest.raises(ValueError, match="out of bounds"):
            rope_store.rope_store(qkv, cos, sin, 4, 2, kc, vc, slots)
        assert torch.equal(qkv, before) and not kc.any() and not vc.any()


@needs_kernel
def test_shapes_it_does_not_take_keep_the_torch_path():
    qkv, cos, sin, kc, vc, slots = _problem(3, 4, 2, 16, torch.float16)  # half: not a kernel dtype
    assert not rope_store.supports(qkv, cos, sin, 4, 2, kc, vc, slots)
    want_kc = kc.clone()
    want = torch_rope_store(qkv.clone(), cos, sin, 4, 2, want_kc, vc.clone(), slots)
    got = rope_store.rope_store(qkv, cos, sin, 4, 2, kc, vc, slots)
    assert all(torch.equal(g, w) for g, w in zip(got, want)) and torch.equal(kc, want_kc)
    qkv, cos, sin, kc, vc, slots = _problem(3, 4, 2, 16, torch.float32)
    assert not rope_store.supports(qkv, cos, sin, 4, 2, kc, vc, slots.int())  # int32 slots
    assert not rope_store.supports(qkv, cos, sin, 3, 2, kc, vc, slots)  # heads that do not fill qkv


def test_which_attention_hands_rotary_to_the_op_set():
    assert get_ops("torch").rope_store is None  # rotary and store_kv as two steps
    assert PagedAttention.fuses_rope_store and not SoftcapPagedAttention.fuses_rope_store  # its own forward
    if library("rope_store") is not None:
        assert get_ops("cpu").rope_store is rope_store.rope_store
