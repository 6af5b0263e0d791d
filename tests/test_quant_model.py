"""Whole quantized models: a tiny random Llama quantized into each published layout loads (packed q/k/v and
gate/up included) and gives the logits of the same model loaded from its dequantized float weights."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.layers.quantization import strategy_for
from tgi_backend.layers.quantization.base import QuantizedLinear
from tgi_backend.layers.quantization.checkpoint import quantize_checkpoint

PROMPT = [5, 17, 3, 99, 42, 7, 1, 250, 31, 64, 8]


@pytest.fixture(autouse=True)
def _own_rng():
    """Seeds set here must not change the random draws of tests that run later."""
    with torch.random.fork_rng():
        yield


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


def _phi3_dir(folder: str) -> str:
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=512, max_position_embeddings=512, pad_token_id=0)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(folder, safe_serialization=True)  # qkv_proj, gate_up_proj packed
    return folder


@pytest.mark.parametrize("arch,fmt,opts", [
    ("qwen2", "awq", dict(group_size=32)),  # q/k/v biases next to quantized weights
    ("phi3", "gptq", dict(bits=4, group_size=32, desc_act=True)),  # stored packed: whole-tensor loads
    ("phi3", "fp8", dict(per_channel=False)),
])
def test_other_layouts_match_their_reference(tmp_path, arch, fmt, opts):
    from tgi_backend.weights.demo import build_random_checkpoint

    if arch == "phi3":
        src = _phi3_dir(str(tmp_path / "src"))
    else:
        src = build_random_checkpoint(str(tmp_path / "src"), arch=arch, seed=0, dtype="float32", tokenizer=False,
                                      hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, vocab_size=512,
                                      max_position_embeddings=512)
    quantized, reference = str(tmp_path / "q"), str(tmp_path / "ref")
    quantize_checkpoint(src, quantized, fmt, reference_dir=reference, **opts)
    runner = _runner(quantized)
    assert sum(isinstance(m, QuantizedLinear) for m in runner.model.modules()) == 8
    got, want = _logits(runner), _logits(_runner(reference))
    torch.testing.assert_close(got, want, rtol=1e-2 * float(want.abs().max()), atol=1e-2 * float(want.abs().max()))


def test_linears_the_checkpoint_keeps_in_float_stay_float(tiny_llama_dir, tmp_path):
    quantized, reference = str(tmp_path / "q"), str(tmp_path / "ref")
    quantize_checkpoint(tiny_llama_dir, quantized, "gptq", reference_dir=reference, skip=("down_proj", "o_proj"),
                        bits=4, group_size=32)
    runner = _runner(quantized)
    kinds = {type(m).__name__ for m in runner.model.model.layers[0].modules()}
    assert "GPTQLinear" in kinds and "Linear" in kinds
    assert type(runner.model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    got, want = _logits(runner), _logits(_runner(reference))
    torch.testing.assert_close(got, want, rtol=1e-2 * float(want.abs().max()), atol=1e-2 * float(want.abs().max()))
    gptq = strategy_for(None, {"quantization_config": {"quant_method": "gptq", "bits": 4}})
    with pytest.raises(ValueError, match="no gptq tensors"):  # a float checkpoint that claims to be GPTQ
        gptq.apply(runner.model, tiny_llama_dir)


def test_on_the_fly_moe_keeps_routers_float(tmp_path):
    from tgi_backend.weights.demo import build_random_checkpoint

    src = build_random_checkpoint(str(tmp_path / "mixtral"), arch="mixtral", seed=0, dtype="float32", tokenizer=False,
                                  hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, vocab_size=512,
                                  max_position_embeddings=512)
    runner = _runner(src, quantize="eetq", lora_root=str(tmp_path))  # LoRA on too: wraps projections only
    layer = runner.model.model.layers[0]
    assert type(layer.mlp.gate).__name__ == "Linear"
    assert type(layer.self_attn.qkv_proj.base).__name__ == "OnTheFlyLinear"
    plain = _logits(_runner(src))
    assert torch.nn.functional.cosine_similarity(_logits(runner), plain).item() > 0.95
