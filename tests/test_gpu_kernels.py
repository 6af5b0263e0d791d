"""The GPU path's Triton-language kernels (paged decode / prefill attention, KV store, RMSNorm, rotary) against
the PyTorch path, on the CPU under TRITON_INTERPRET=1. The interpreter must be chosen before triton is first
imported, so the kernels run in a fresh interpreter process. Tiny shapes (block_size 4, head_dim 16): the
interpreter costs ~4 ms per program per loop iteration."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest
from interpreted import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent('''
    import json
    import torch
    from tgi_backend.engine.forward_context import DecodeBatch, PrefillSegment
    from tgi_backend.layers import attention
    from tgi_backend.layers.norm import RMSNorm
    from tgi_backend.layers.platform import get_ops
    from tgi_backend.layers.rotary import RotaryEmbedding

    TORCH, TRITON = get_ops("torch"), get_ops("triton")
    BS, D = 4, 16

    def rel(got, want):
        return float((got.float() - want.float()).abs().max() / want.float().abs().max())

    def caches(g, dtype, num_blocks, kv_heads):
        kc = torch.randn(num_blocks, BS, kv_heads, D, generator=g).to(dtype)
        return kc, torch.randn(num_blocks, BS, kv_heads, D, generator=g).to(dtype)

    def decode_case(dtype, window, seed, positions, heads=4, kv_heads=2, partition=8):
        g = torch.Generator().manual_seed(seed)
        kc, vc = caches(g, dtype, 24, kv_heads)
        width = max(p // BS + 1 for p in positions)
        free = (torch.randperm(23, generator=g) + 1).tolist()  # shuffled blocks: the table matters
        table = torch.zeros(len(positions), width, dtype=torch.long)  # padded with block 0
        for r, p in enumerate(positions):
            table[r, : p // BS + 1] = torch.tensor([free.pop() for _ in range(p // BS + 1)])
        dec = DecodeBatch(len(positions), table, torch.tensor(positions), BS)
        q = torch.randn(len(positions), heads, D, generator=g).to(dtype)
        want = attention.decode_attention(q, kc, vc, dec, D**-0.5, window)
        got = TRITON.decode_attention(q, kc, vc, dec, D**-0.5, window, partition_size=partition, block_n=8)
        return rel(got, want)

    def prefill_case(dtype, window, seed, specs, heads=4, kv_heads=2, decode_rows=2):
        # specs: [(length, start_pos)]; rows [0, decode_rows) are not prefill and must stay untouched
        g = torch.Generator().manual_seed(seed)
        kc, vc = caches(g, dtype, 40, kv_heads)  # random history for chunks with start_pos > 0
        tokens = decode_rows + sum(n for n, _ in specs)
        q = torch.randn(tokens, heads, D, generator=g).to(dtype)
        k = torch.randn(tokens, kv_heads, D, generator=g).to(dtype)
        v = torch.randn(tokens, kv_heads, D, generator=g).to(dtype)
        free = (torch.randperm(39, generator=g) + 1).tolist()
        segs, slots, row = [], [], decode_rows
        for n, start in specs:
            blocks = [free.pop() for _ in range(-(-(start + n) // BS))]
            slots += [blocks[p // BS] * BS + p % BS for p in range(start, start + n)]
            segs.append(PrefillSegment(row, row + n, start, torch.tensor(blocks) if start > 0 else None))
            row += n
        attention.store_kv(kc, vc, k[decode_rows:], v[decode_rows:], torch.tensor(slots))
        base = torch.full_like(q, 7.0)
        want = TORCH.prefill_attention(q, k, v, kc, vc, segs, D**-0.5, window, out=base.clone())
        packed = TRITON.prepare_prefill(segs, q.device)
        got = TRITON.prefill_attention(q, k, v, kc, vc, packed, D**-0.5, window, out=base.clone())
        return rel(got, want)

    def store_case(dtype, seed, kv_heads=2):
        g = torch.Generator().manual_seed(seed)
        kc, vc = caches(g, dtype, 6, kv_heads)
        kc2, vc2 = kc.clone(), vc.clone()
        slots = torch.tensor([5, -1, 0, 23, 9, -1, 14])  # -1: padding rows, skipped by the triton store
        kv = torch.randn(len(slots), 2 * kv_heads, D, generator=g).to(dtype)
        k, v = kv[:, :kv_heads], kv[:, kv_heads:]  # strided views, as split from a projection
        real = slots >= 0
        attention.store_kv(kc, vc, k[real], v[real], slots[real])
        TRITON.store_kv(kc2, vc2, k, v, slots)
        return int((kc2 != kc).sum() + (vc2 != vc).sum())  # a copy: must be exact

    def norm_case(dtype, seed, hidden=48, tokens=5):
        g = torch.Generator().manual_seed(seed)
        norm = RMSNorm(hidden, 1e-5)
        norm.weight.data = torch.randn(hidden, generator=g) * 0.5 + 1
        norm = norm.to(dtype)
        x = torch.randn(tokens, hidden, generator=g).to(dtype)
        r = torch.randn(tokens, hidden, generator=g).to(dtype)
        y_want, s_want = norm(x, r)
        y_got, s_got = TRITON.rms_norm_residual(x, norm.weight, norm.eps, r)
        plain = TRITON.rms_norm_residual(x, norm.weight, norm.eps)
        return max(rel(y_got, y_want), rel(s_got, s_want), rel(plain, norm(x)))

    def rotary_case(dtype, seed, tokens=5, heads=3, kv_heads=1):
        g = torch.Generator().manual_seed(seed)
        rope = RotaryEmbedding(D, 64)
        cos, sin = rope.cos_sin(torch.randint(0, 64, (tokens,), generator=g), dtype)
        qkv = torch.randn(tokens, (heads + 2 * kv_heads) * D, generator=g).to(dtype)
        n_qk = heads + kv_heads
        qk = qkv[:, : n_qk * D].view(tokens, n_qk, D)  # the q|k part of a packed projection, as llama.py
        want = RotaryEmbedding.apply(qk, cos, sin)
        v_before = qkv[:, n_qk * D :].clone()
        got = TRITON.rotary_apply(qk, cos, sin)
        assert got.data_ptr() == qk.data_ptr(), "rotary must work in place"
        assert torch.equal(qkv[:, n_qk * D :], v_before), "rotary wrote past q|k"
        return rel(qk, want)

    ROWS = [3, 17, 30, 9]  # different lengths: padded tables; with partitions of 8 keys, up to 4 partitions
    SPECS = [(5, 0), (7, 6), (18, 0)]  # one with history from the cache; 18 rows span two query tiles
    f32, bf16 = torch.float32, torch.bfloat16
    out = {
        "decode_gqa": decode_case(f32, None, 0, ROWS),
        "decode_window": decode_case(f32, 6, 1, ROWS),
        "decode_one_partition_mha": decode_case(f32, None, 2, [3, 5], heads=2, kv_heads=2, partition=64),
        "decode_bf16": decode_case(bf16, None, 3, ROWS),
        "decode_window_bf16": decode_case(bf16, 5, 4, ROWS, heads=8, kv_heads=2),
        "prefill": prefill_case(f32, None, 5, SPECS),
        "prefill_window": prefill_case(f32, 4, 6, SPECS),
        "prefill_bf16": prefill_case(bf16, None, 7, SPECS),
        "prefill_window_history_bf16": prefill_case(bf16, 5, 8, [(6, 9), (3, 0)], heads=2, kv_heads=1),
        "store_mismatches": store_case(f32, 9),
        "store_mismatches_bf16": store_case(bf16, 10),
        "rmsnorm": norm_case(f32, 11),
        "rmsnorm_bf16": norm_case(bf16, 12),
        "rotary": rotary_case(f32, 13),
        "rotary_bf16": rotary_case(bf16, 14),
    }
    print("RESULT" + json.dumps(out))
''')

FP32 = ["decode_gqa", "decode_window", "decode_one_partition_mha", "prefill", "prefill_window", "rmsnorm",
        "rotary"]
BF16 = ["decode_bf16", "decode_window_bf16", "prefill_bf16", "prefill_window_history_bf16", "rmsnorm_bf16",
        "rotary_bf16"]


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(SCRIPT)


@pytest.mark.parametrize("case", FP32)
def test_fp32_matches_torch(results, case):
    assert results[case] < 1e-5


@pytest.mark.parametrize("case", BF16)
def test_bf16_matches_torch(results, case):
    assert results[case] < 2e-2


def test_kv_store_is_exact_and_skips_padding(results):
    assert results["store_mismatches"] == 0
    assert results["store_mismatches_bf16"] == 0
