"""Greedy parity with transformers for the architectures beyond the Llama family (Mixtral, Qwen2-MoE, Gemma,
Gemma-2, Phi-3): tiny random models built here, all prompts batched through Scheduler + ModelRunner, float32."""
from __future__ import annotations

import pytest
import torch

from test_parity import PROMPT_LENGTHS, _config, reference_greedy, run_engine
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
    vocab_size=256, max_position_embeddings=128, initializer_range=0.1,
)
ARCHS = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "mixtral-window": ("MixtralConfig", "MixtralForCausalLM", dict(
        num_local_experts=8, num_experts_per_tok=2, intermediate_size=32, sliding_window=8)),
    # no renormalisation, a gated shared expert, layer 1 dense
    "qwen2-moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=False, mlp_only_layers=[1])),
    "qwen2-moe-topk-norm": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(
        num_experts=6, num_experts_per_tok=3, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        norm_topk_prob=True)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(head_dim=32, pad_token_id=0)),
    # alternating window / full layers, small soft-caps so they bite, query scale != head_dim
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(
        head_dim=16, pad_token_id=0, sliding_window=8, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        query_pre_attn_scalar=24)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0)),
    "phi3-window": ("Phi3Config", "Phi3ForCausalLM", dict(pad_token_id=0, sliding_window=8)),
}
NEW_TOKENS = 12


def build_checkpoint(arch: str, folder: str, seed: int = 0):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **extra})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    _randomize_norms(model)
    model.generation_config.eos_token_id = None  # never stop early
    model.save_pretrained(folder, safe_serialization=True)
    return model


def _randomize_norms(model) -> None:
    """Norm weights start at 1 (Gemma: 0): random ones check that each is loaded where it belongs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return request.param, folder, build_checkpoint(request.param, folder)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(42)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def test_greedy_parity_with_transformers(checkpoint, prompts):
    arch, folder, model = checkpoint
    config = _config(folder, 4096)
    runner = ModelRunner(config, folder)
    ours, _, kinds = run_engine(runner, config, prompts, NEW_TOKENS)
    assert {"prompt", "continuation", "decode"} <= kinds  # chunked prefill mixed with decode rows
    for prompt, got in zip(prompts, ours):
        assert got == reference_greedy(model, prompt, NEW_TOKENS), f"{arch}: prompt of {len(prompt)} tokens"


def _greedy(folder: str, prompts, tweak=None):
    config = _config(folder, 4096)
    runner = ModelRunner(config, folder)
    if tweak is not None:
        tweak(runner.model)
    return run_engine(runner, config, prompts, NEW_TOKENS)[0]


def test_gemma2_soft_capping_and_window_matter(tmp_path, prompts):
    """Capping and window each change the tokens on these weights: the parity above really checks them."""
    folder = str(tmp_path / "g2")
    model = build_checkpoint("gemma2", folder)
    assert model.config._attn_implementation == "eager" or model.config.attn_logit_softcapping is None
    ours = _greedy(folder, prompts[-3:])

    def no_attn_cap(m):
        for layer in m.model.layers:
            layer.self_attn.attn.cap = 1e9

    def no_window(m):
        for attn in m.attention_layers():
            attn.sliding_window = None

    for tweak in (no_attn_cap, no_window):
        assert _greedy(folder, prompts[-3:], tweak) != ours, tweak.__name__


def test_gemma2_logits_match_with_final_soft_capping(tmp_path, prompts):
    """The final cap is monotonic (greedy cannot see it): compare the logits themselves."""
    folder = str(tmp_path / "g2")
    model = build_checkpoint("gemma2", folder)
    runner = ModelRunner(_config(folder, 4096), folder)
    chunks = [ScheduledChunk(f"c{i}", p, 0, list(range(i * 16, i * 16 + 16)), True, SamplingParams())
              for i, p in enumerate(prompts[2:6])]
    logits = runner.compute_logits(SchedulerOutput(chunks))
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts[2:6]])
    assert ref.abs().max() < model.config.final_logit_softcapping  # capped
    torch.testing.assert_close(logits, ref, atol=1e-4, rtol=1e-4)
