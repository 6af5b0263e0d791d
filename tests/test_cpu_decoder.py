"""The fused decode step (kernels/cpu/decoder.c): bit for bit the model's own modules, op by op, for every
Llama-family variant it takes; steps it does not take run the modules; bad slots are refused."""
from __future__ import annotations

import pytest
import torch

from test_parity import ARCHS, build_checkpoint
from test_parity_architectures import build_checkpoint as build_other
from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.kernels.cpu import decoder, gemv, library
from tgi_backend.layers import linear as linear_module

pytestmark = pytest.mark.skipif(
    library("decoder") is None or not gemv.available() or linear_module.bf16_support() == "none",
    reason="no C compiler or no oneDNN bf16: no few-row kernel plan, no fused decoder")
BLOCK = 4


def _runner(folder: str) -> ModelRunner:
    config = EngineConfig(model_id=folder, dtype="bfloat16", block_size=BLOCK, max_total_tokens=64,
                          max_batch_total_tokens=1024).resolve(128)
    return ModelRunner(config, folder)


def _chunk(rid: str, tokens: list[int], start: int, blocks: list[int]) -> ScheduledChunk:
    return ScheduledChunk(rid, tokens, start, blocks, True, SamplingParams())


@pytest.fixture(scope="module", params=list(ARCHS) + ["phi3", "phi3-window"])  # Phi-3 runs Llama's modules
def runner(request, tmp_path_factory) -> ModelRunner:
    folder = str(tmp_path_factory.mktemp(request.param))
    (build_checkpoint if request.param in ARCHS else build_other)(request.param, folder)
    return _runner(folder)


def test_decode_steps_equal_the_modules(runner):
    fused = runner.fused
    assert fused is not None and fused.max_rows == runner.model.model.layers[0].mlp.down_proj.packed.native_rows
    gen = torch.Generator().manual_seed(3)
    rows = fused.max_rows
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (3, 9, 14, 6, 11, 2, 7, 5)[:rows]]
    blocks = {i: list(range(1 + i * 8, 1 + i * 8 + 8)) for i in range(rows)}
    runner.compute_logits(SchedulerOutput([_chunk(f"r{i}", p, 0, blocks[i]) for i, p in enumerate(prompts)]))
    lengths = [len(p) for p in prompts]
    for step in range(12):  # across block boundaries and past the 8-token sliding windows
        n = 1 + step % rows  # 1..max_rows rows
        chunks = [_chunk(f"r{i}", [(7 * step + i) % 256], lengths[i], blocks[i]) for i in range(n)]
        kv_before = runner.kv_cache.clone()
        got = runner.compute_logits(SchedulerOutput(chunks))
        kv_fused = runner.kv_cache.clone()
        runner.kv_cache.copy_(kv_before)
        runner.fused = None
        try:
            want = runner.compute_logits(SchedulerOutput(chunks))
        finally:
            runner.fused = fused
        assert torch.equal(got, want), f"step {step}, {n} rows"
        assert torch.equal(kv_fused, runner.kv_cache)  # the same K/V written to the same slots
        for i in range(n):
            lengths[i] += 1


def test_steps_it_does_not_take_run_the_modules(runner, monkeypatch):
    calls = []
    monkeypatch.setattr(runner.fused, "forward", lambda *a: calls.append(a))
    prompt = list(range(10, 20))
    runner.compute_logits(SchedulerOutput([_chunk("p", prompt, 0, [1, 2, 3])]))  # prefill
    rows = runner.fused.max_rows + 1  # too many rows
    runner.compute_logits(SchedulerOutput([_chunk(f"d{i}", [5], 3, [40 + i]) for i in range(rows)]))
    assert calls == []


def test_a_slot_outside_the_cache_is_refused(runner):
    fused = runner.fused
    ids, pos = torch.tensor([5]), torch.tensor([0])
    dec = runner._decode_batch([_chunk("x", [5], 0, [1])])
    before = runner.kv_cache.clone()
    with pytest.raises(ValueError, match="slot mapping out of bounds"):
        fused.forward(ids, pos, torch.tensor([runner.kv_cache[0, 0].numel()]), dec)
    with pytest.raises(ValueError, match="1..4|1..8"):
        fused.forward(torch.tensor([5] * 9), torch.zeros(9, dtype=torch.long), torch.zeros(9, dtype=torch.long), dec)
    assert torch.equal(before, runner.kv_cache)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "mixtral", "qwen2-moe"])
def test_other_families_keep_their_modules(arch, tmp_path):
    build_other(arch, str(tmp_path))
    runner = _runner(str(tmp_path))
    assert runner.fused is None


def test_unsupported_shapes_are_not_fused():
    t = torch.zeros(4, dtype=torch.bfloat16)
    layer = decoder.LayerWeights(t, t, t, None, t, None, t, None, t, None, t, t, None)
    ok = decoder.DecoderWeights([layer], t, 1e-6, 4, 2, 16, 0.25, torch.nn.functional.silu, None, None, 4)
    assert decoder.supported(ok)
    import dataclasses
    assert not decoder.supported(dataclasses.replace(ok, head_dim=24))  # not a multiple of 16
    assert not decoder.supported(dataclasses.replace(ok, heads=64, kv_heads=2))  # group over 16
    assert not decoder.supported(dataclasses.replace(ok, final_norm=t.float()))  # bf16 only
