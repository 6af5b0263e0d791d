"""Prefill attention on AMX or AVX2 (kernels/cpu/prefill_attn.c) against a float64 reference of the same attention:
chunks with and without history in the paged cache, GQA, sliding windows, head dims 32-256; as close as
PyTorch's SDPA in bf16. What it does not take runs SDPA; block ids outside the cache are never read."""
from __future__ import annotations

import math

import pytest
import torch

from tgi_backend.engine.forward_context import PrefillSegment
from tgi_backend.kernels.cpu import prefill_attn
from tgi_backend.layers import attention

pytestmark = pytest.mark.skipif(not prefill_attn.available(),
                                reason="no C compiler, or neither AMX nor AVX2 alone: the torch path runs")
BLOCK = 16


def _reference(q, k, v, kc, vc, segments, scale, window):
    """float64 softmax attention per chunk, its keys from the chunk or (history) the cache."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    group = q.shape[1] // k.shape[1]
    for seg in segments:
        a, b = seg.q_start, seg.q_end
        if seg.block_table is None:
            kh, vh = k[a:b], v[a:b]
        else:
            kh = attention.gather_blocks(kc, seg.block_table)[:, : seg.ctx_len].transpose(0, 1)
            vh = attention.gather_blocks(vc, seg.block_table)[:, : seg.ctx_len].transpose(0, 1)
        kh, vh = kh.double().repeat_interleave(group, 1), vh.double().repeat_interleave(group, 1)
        scores = torch.einsum("qhd,khd->hqk", q[a:b].double(), kh) * scale
        mask = seg.mask(window)
        if mask is None:
            mask = torch.ones(b - a, seg.ctx_len, dtype=torch.bool).tril()
        out[a:b] = torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, float("-inf")).softmax(-1), vh)
    return out


def _batch(heads, kv_heads, dim, lengths, starts, seed=0):
    """A flat batch of chunks: q, k, v views of one packed qkv (as the layers have them), the cache holding
    every history and each chunk's own K/V (stored before attention, as store_kv does)."""
    gen = torch.Generator().manual_seed(seed)
    kc = torch.randn(64, BLOCK, kv_heads, dim, generator=gen).bfloat16()
    vc = torch.randn(64, BLOCK, kv_heads, dim, generator=gen).bfloat16()
    tokens = sum(lengths)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=gen).bfloat16()
    q = qkv[:, : heads * dim].view(tokens, heads, dim)
    k = qkv[:, heads * dim: (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = qkv[:, (heads + kv_heads) * dim:].view(tokens, kv_heads, dim)
    segments, at, block = [], 0, 1
    for length, start in zip(lengths, starts):
        table = None
        if start:
            n = -(-(start + length) // BLOCK)
            table = torch.arange(block, block + n)
            block += n
            for i in range(length):
                pos = start + i
                kc[table[pos // BLOCK], pos % BLOCK], vc[table[pos // BLOCK], pos % BLOCK] = k[at + i], v[at + i]
        segments.append(PrefillSegment(at, at + length, start, table))
        at += length
    return q, k, v, kc, vc, segments


CASES = [  # heads, kv_heads, dim, chunk lengths, their start positions, window
    (8, 2, 64, [37], [0], None),
    (8, 2, 64, [128, 5, 77], [0, 0, 0], None),
    (8, 2, 64, [20, 33, 1], [40, 0, 90], None),  # histories, a one-token chunk
    (4, 4, 32, [50, 17], [0, 70], 24),  # sliding window inside and across the history
    (16, 4, 128, [64], [100], None),
    (4, 1, 256, [40], [0], 8),
]


@pytest.mark.parametrize("heads,kv_heads,dim,lengths,starts,window", CASES)
def test_matches_float64_attention_as_closely_as_sdpa(heads, kv_heads, dim, lengths, starts, window, monkeypatch):
    q, k, v, kc, vc, segments = _batch(heads, kv_heads, dim, lengths, starts)
    scale = 1 / math.sqrt(dim)
    want = _reference(q, k, v, kc, vc, segments, scale, window)
    sdpa = attention.prefill_segments_attention(q, k, v, kc, vc, segments, scale, window)
    monkeypatch.setattr(attention, "prefill_segments_attention", None)  # the kernel's own result, no fallback
    got = prefill_attn.prefill_attention(q, k, v, kc, vc, prefill_attn.prepare(segments), scale, window)
    err, sdpa_err = (got.double() - want).abs(), (sdpa.double() - want).abs()
    assert err.max() <= sdpa_err.max() * 1.5 + 1e-3  # bf16 rounding of P and of the output, as SDPA's
    assert err.mean() <= sdpa_err.mean() * 1.5 + 1e-5


def test_writes_only_the_chunks_rows():
    q, k, v, kc, vc, segments = _batch(8, 2, 64, [10, 20], [0, 0])
    out = torch.full(q.shape, 7.0, dtype=torch.bfloat16)
    prefill_attn.prefill_attention(q, k, v, kc, vc, prefill_attn.prepare(segments[1:]), 0.125, None, out=out)
    assert (out[:10] == 7).all() and not (out[10:] == 7).all()


def test_what_it_does_not_take_runs_sdpa(monkeypatch):
    calls = []
    fallback = attention.prefill_segments_attention
    monkeypatch.setattr(attention, "prefill_segments_attention", lambda *a, **kw: calls.append(1) or fallback(*a, **kw))
    q, k, v, kc, vc, segments = _batch(4, 2, 48, [9], [0])  # head dim 48: not whole 32-dim tiles
    prefill_attn.prefill_attention(q, k, v, kc, vc, prefill_attn.prepare(segments), 0.1, None)
    q, k, v, kc, vc, segments = _batch(4, 2, 64, [9], [20])
    prefill_attn.prefill_attention(q.float(), k.float(), v.float(), kc.float(), vc.float(),
                                   prefill_attn.prepare(segments), 0.1, None)  # float32
    assert len(calls) == 2


def test_block_ids_outside_the_cache_are_not_read():
    q, k, v, kc, vc, segments = _batch(8, 2, 64, [9], [30])
    bad = [PrefillSegment(0, 9, 30, torch.tensor([1, 2, kc.shape[0] + 5]))]
    with pytest.raises(IndexError):  # the PyTorch path's own error: the C code never indexed with it
        prefill_attn.prefill_attention(q, k, v, kc, vc, prefill_attn.prepare(bad), 0.1, None)
    short = [PrefillSegment(0, 9, 30, torch.tensor([1]))]  # fewer blocks than the history needs
    assert not prefill_attn._history_ok(prefill_attn.prepare(short), kc)
    negative = [PrefillSegment(0, 9, 30, torch.tensor([1, -2, 3]))]
    assert not prefill_attn._history_ok(prefill_attn.prepare(negative), kc)


def test_chunked_prefill_through_the_engine_matches_sdpa(tmp_path, monkeypatch):
    """A 40-token prompt prefilled in chunks of 16 (history read from the cache) by a bf16 runner whose head dim
    (32) the kernel takes: the last logits as with PyTorch's SDPA, within bf16."""
    from test_parity import build_checkpoint

    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.model_runner import ModelRunner
    from tgi_backend.engine.request import SamplingParams
    from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
    from tgi_backend.layers import platform

    build_checkpoint("llama-variants", str(tmp_path))
    config = EngineConfig(model_id=str(tmp_path), dtype="bfloat16", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=4096).resolve(128)
    runner = ModelRunner(config, str(tmp_path))
    assert runner.ops.prefill_attention is prefill_attn.prefill_attention
    prompt = torch.randint(0, 256, (40,), generator=torch.Generator().manual_seed(2)).tolist()
    blocks = list(range(1, 11))

    def last_logits() -> torch.Tensor:
        for start in (0, 16, 32):
            end = min(start + 16, len(prompt))
            chunk = ScheduledChunk("p", prompt[start:end], start, blocks, end == len(prompt), SamplingParams())
            logits = runner.compute_logits(SchedulerOutput([chunk]))
        return logits

    torch_ops = platform.get_ops("torch")
    with monkeypatch.context() as patch:
        patch.setattr(attention, "prefill_segments_attention", None)  # the kernel ran every chunk: no fallback
        got = last_logits()
    monkeypatch.setattr(runner, "ops", torch_ops)
    want = last_logits()
    assert (got.float() - want.float()).abs().max() <= 0.02 * want.abs().max()
    assert got.argmax(-1).item() == want.argmax(-1).item()
