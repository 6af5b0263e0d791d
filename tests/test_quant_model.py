"""Whole quantized models: a tiny random Llama quantized into each published layout loads (packed q/k/v and
gate/up included) and gives the logits of the same model loaded from its dequantized float weights."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.layers.quantization.base import QuantizedLinear
from tgi_backend.layers.quantization.checkpoint import quantize_checkpoint

PROMPT = [5, 17, 3, 99, 42, 7, 1, 250, 31, 64, 8]


def _runner(folder: str, **kw) -> ModelRunner:
    config = EngineConfig(model_id=folder, dtype="float32", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=256, **kw).resolve(512)
    return ModelRunner(config, folder)


def _logits(runner: ModelRunner) -> torch.Tensor:
    chunk = ScheduledChunk("r", PROMPT, 0, [0, 1, 2], True, SamplingParams())
    return runner.compute_logits(SchedulerOutput([chunk]))


CASES = [
    ("gptq", dict(bits=4, group_size=32, sym=True), "int4"),
    ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True), "int4"),
    ("gptq", dict(bits=8, group_size=32), "dense"),
    ("awq", dict(group_size=32), "int4"),
    ("fp8", dict(per_channel=True), "dense"),
]


@pytest.mark.parametrize("fmt,opts,compute", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_quantized_model_matches_dequantized_reference(tiny_llama_dir, tmp_path, fmt, opts, compute):
    quantized, reference = str(tmp_path / "q"), str(tmp_path / "ref")
    quantize_checkpoint(tiny_llama_dir, quantized, fmt, reference_dir=reference, **opts)
    runner = _runner(quantized)
    layers = [m for m in runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 4 and {m.weight_format for m in layers} == {compute}
    got, want = _logits(runner), _logits(_runner(reference))
    # int4 runs on bfloat16 activations (compute.act_dtype); the dense path is float32 throughout
    tol = 1e-3 if compute == "dense" else 1e-2 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert torch.argmax(got) == torch.argmax(want)


@pytest.mark.parametrize("quantize", ["eetq", "bitsandbytes-nf4", "fp8"])
def test_on_the_fly_quantized_model_stays_close(tiny_llama_dir, quantize):
    plain = _logits(_runner(tiny_llama_dir))
    quantized = _logits(_runner(tiny_llama_dir, quantize=quantize))
    assert torch.argmax(quantized) == torch.argmax(plain) or quantize == "bitsandbytes-nf4"
    assert torch.nn.functional.cosine_similarity(quantized, plain).item() > 0.95
