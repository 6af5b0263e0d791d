"""Layers against plain references: rotary, RMSNorm, and paged attention on a mixed batch."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.engine import forward_context as forward_context_module
from tgi_backend.engine.forward_context import (
    DecodeBatch, ForwardContext, PrefillSegment, forward_context, split_by_width,
)
from tgi_backend.layers.attention import PagedAttention
from tgi_backend.layers.norm import LAYER_NORM_ROWS, RMSNorm
from tgi_backend.layers.rotary import RotaryEmbedding, rope_inv_freq

H, KVH, D, BS, NUM_BLOCKS = 4, 2, 8, 4, 32


# ---- rotary ----------------------------------------------------------------------------------------
def test_rotary_matches_transformers():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    cfg = LlamaConfig(hidden_size=32, num_attention_heads=4, max_position_embeddings=64)
    pos = torch.tensor([0, 3, 17, 63])
    q, k = torch.randn(4, 4, 8), torch.randn(4, 2, 8)
    ref_cos, ref_sin = LlamaRotaryEmbedding(cfg)(q, pos[None])
    rq, rk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], ref_cos, ref_sin)
    ours_q, ours_k = RotaryEmbedding(8, 64)(pos, q, k)
    torch.testing.assert_close(ours_q, rq[0].transpose(0, 1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours_k, rk[0].transpose(0, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rolled_rotary_is_bit_identical_to_rotate_half(dtype):
    rope = RotaryEmbedding(16, 128, theta=500.0)
    pos = torch.tensor([0, 5, 77, 127])
    qkv = torch.randn(4, 5 * 16).to(dtype)
    qk = qkv[:, : 3 * 16].view(4, 3, 16)  # a strided view, as llama.py rotates it
    want = RotaryEmbedding.apply(qk, *rope.cos_sin(pos, dtype))
    assert torch.equal(RotaryEmbedding.apply_rolled(qk, *rope.cos_signed_sin(pos, dtype)), want)


def test_rotary_depends_only_on_relative_position():
    rope = RotaryEmbedding(16, 128, theta=500.0)
    q, k = torch.randn(1, 1, 16), torch.randn(1, 1, 16)

    def score(m: int, n: int) -> float:
        qm, _ = rope(torch.tensor([m]), q, k)
        _, kn = rope(torch.tensor([n]), q, k)
        return float((qm * kn).sum())

    assert score(10, 3) == pytest.approx(score(57, 50), rel=1e-4, abs=1e-5)
    # a rotation keeps the norm
    q5, _ = rope(torch.tensor([5]), q, k)
    assert q5.norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_scalings():
    base = rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(rope_inv_freq(64, 10000.0, "linear", {"factor": 4.0}), base / 4)
    llama3 = rope_inv_freq(
        64, 500000.0, "llama3",
        {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )
    plain = rope_inv_freq(64, 500000.0)
    assert llama3[0] == plain[0]  # highest frequency untouched
    torch.testing.assert_close(llama3[-1], plain[-1] / 8)  # lowest slowed by the factor
    with pytest.raises(ValueError, match="unsupported rope_type"):
        rope_inv_freq(64, 1.0, "yarn-ish")


# ---- norm ------------------------------------------------------------------------------------------
def test_rmsnorm_and_fused_residual():
    norm = RMSNorm(16, eps=1e-5)
    norm.weight.data = torch.randn(16)
    x, res = torch.randn(3, 16), torch.randn(3, 16)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    y, new_res = norm(x, res)
    torch.testing.assert_close(new_res, x + res)
    torch.testing.assert_close(y, norm(x + res))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_layer_norm_form_matches_rms_norm(dtype):
    # decode-sized inputs take layer_norm over [x, -x]; prefill-sized ones F.rms_norm
    norm = RMSNorm(64, eps=1e-6)
    norm.weight.data = torch.randn(64)
    norm = norm.to(dtype)
    g = torch.Generator().manual_seed(3)
    for rows in (1, LAYER_NORM_ROWS, LAYER_NORM_ROWS + 1):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        want = F.rms_norm(x.float(), (64,), norm.weight.float(), 1e-6)
        got = norm(x)
        assert got.dtype == dtype and got.shape == x.shape
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)


def test_rmsnorm_sees_a_new_weight():
    norm = RMSNorm(8)
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (8,), None, 1e-6))
    with torch.no_grad():
        norm.weight.mul_(3.0)  # in place
    torch.testing.assert_close(norm(x), 3.0 * F.rms_norm(x, (8,), None, 1e-6))
    norm.weight.data = torch.full((8,), 0.5)  # replaced
    torch.testing.assert_close(norm(x), 0.5 * F.rms_norm(x, (8,), None, 1e-6))


def test_rmsnorm_bfloat16_keeps_dtype():
    norm = RMSNorm(8).to(torch.bfloat16)
    assert norm(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ---- paged attention -------------------------------------------------------------------------------
def _dense_reference(q, k, v, q_pos, window):
    # q: [n, H, D] at positions q_pos; k, v: [ctx, KVH, D] for positions 0..ctx-1
    k = k.repeat_interleave(H // KVH, dim=1)
    v = v.repeat_interleave(H // KVH, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    kp = torch.arange(k.shape[0])[None, :]
    qp = torch.tensor(q_pos)[:, None]
    allowed = kp <= qp
    if window is not None:
        allowed &= kp > qp - window
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _slots(blocks, positions):
    return [blocks[p // BS] * BS + p % BS for p in positions]


@pytest.mark.parametrize("window", [None, 3, 6, 13])
@pytest.mark.parametrize("group_cost", [None, 0])  # 0: decode rows split by length (one SDPA per group)
def test_paged_attention_mixed_batch_matches_dense(window, group_cost, monkeypatch):
    if group_cost is not None:
        monkeypatch.setattr(forward_context_module, "GROUP_COST_BLOCK_ROWS", group_cost)
    torch.manual_seed(0)
    k_cache = torch.randn(NUM_BLOCKS, BS, KVH, D)
    v_cache = torch.randn(NUM_BLOCKS, BS, KVH, D)
    free = torch.randperm(NUM_BLOCKS - 1).add(1).tolist()  # scattered blocks; 0 is only padding
    # (history in cache, new tokens): decode rows first, then prompt chunks, as the runner orders them
    requests = [(9, 1), (3, 1), (0, 1), (29, 1), (0, 7), (5, 6)]
    n_dec = 4
    full_k, full_v, tables = [], [], []
    for hist, new in requests:
        n_blocks = -(-(hist + new) // BS)
        tables.append([free.pop() for _ in range(n_blocks)])
        full_k.append(torch.randn(hist + new, KVH, D))
        full_v.append(torch.randn(hist + new, KVH, D))
        slots = torch.tensor(_slots(tables[-1], range(hist)), dtype=torch.long)
        k_cache.view(-1, KVH, D)[slots] = full_k[-1][:hist]
        v_cache.view(-1, KVH, D)[slots] = full_v[-1][:hist]
    q_list = [torch.randn(new, H, D) for _, new in requests]

    slot_mapping, prefills, row = [], [], n_dec
    for (hist, new), table in zip(requests, tables):
        slot_mapping += _slots(table, range(hist, hist + new))
    for (hist, new), table in list(zip(requests, tables))[n_dec:]:
        bt = None if hist == 0 else torch.tensor(table)
        prefills.append(PrefillSegment(row, row + new, hist, bt))
        row += new
    width = max(len(t) for t in tables[:n_dec])
    decode = DecodeBatch(
        num_rows=n_dec,
        block_table=torch.tensor([t + [0] * (width - len(t)) for t in tables[:n_dec]]),
        positions=torch.tensor([h for h, _ in requests[:n_dec]]),
        block_size=BS,
    )
    ctx = ForwardContext(torch.tensor(slot_mapping), decode, prefills, BS)
    attn = PagedAttention(H, KVH, D, D**-0.5, sliding_window=window)
    attn.bind_kv_cache(k_cache, v_cache)
    new_k = torch.cat([k[h:] for k, (h, _) in zip(full_k, requests)])
    new_v = torch.cat([v[h:] for v, (h, _) in zip(full_v, requests)])
    with forward_context(ctx):
        out = attn(torch.cat(q_list), new_k, new_v)
    groups = decode.sdpa_groups(window, torch.float32)
    assert len(groups) == (3 if group_cost == 0 and window is None else 1)  # widths 3, 1, 1, 8 blocks

    expected = torch.cat([
        _dense_reference(q, k, v, list(range(h, h + n)), window)
        for q, k, v, (h, n) in zip(q_list, full_k, full_v, requests)
    ])
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # the new K/V landed in their slots
    torch.testing.assert_close(k_cache.view(-1, KVH, D)[torch.tensor(slot_mapping)], new_k)


def test_split_by_width_groups_rows_of_similar_length():
    # one group when padding is small or a cut does not pay for its extra call
    assert split_by_width([4, 4, 5, 4], 32, 4) == [[0, 1, 2, 3]]
    assert split_by_width([1, 2], 32, 4) == [[0, 1]]
    # 32 short rows next to 32 long ones: two groups, each row once, ascending by width
    widths = [2, 40] * 32
    groups = split_by_width(widths, 32, 4)
    assert [sorted({widths[i] for i in g}) for g in groups] == [[2], [40]]
    assert sorted(i for g in groups for i in g) == list(range(64))
    # never more groups than asked for, whatever the spread
    spread = [1 << (i % 7) for i in range(70)]
    groups = split_by_width(spread, 0, 4)
    assert len(groups) == 4 and sorted(i for g in groups for i in g) == list(range(70))


def test_attention_outside_a_step_fails_loudly():
    attn = PagedAttention(H, KVH, D, 1.0)
    with pytest.raises(RuntimeError, match="forward_context"):
        attn(torch.randn(1, H, D), torch.randn(1, KVH, D), torch.randn(1, KVH, D))

