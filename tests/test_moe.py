"""The MoE layer against a per-token loop reference: routing (ties, renormalisation, sigmoid), the grouped
expert computation, the shared expert, load counts; the per-expert checkpoint mapping; the registry's error."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.layers.moe import (
    MOE_IMPLS, RouterSpec, SparseMoE, StackedWeight, expert_load, experts_impl, grouped_experts, route,
)
from tgi_backend.models.registry import architecture_of

H, I, E = 16, 24, 6


def reference_moe(layer: SparseMoE, x: torch.Tensor, chosen_by_token: list[list[int]] | None = None) -> torch.Tensor:
    """One token at a time, one expert at a time, straight from the definitions (chosen_by_token: who wins ties)."""
    w13, w2, spec = layer.experts.w13.weight, layer.experts.w2.weight, layer.router
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        logits = x[t] @ layer.gate.weight.T  # [E]
        scores = logits.softmax(-1) if spec.scoring == "softmax" else logits.sigmoid()
        chosen = sorted(range(E), key=lambda e: -scores[e].item())[: spec.top_k]
        if chosen_by_token is not None:
            chosen = chosen_by_token[t]
        w = scores[chosen]
        if spec.renormalize:
            w = w / w.sum()
        for weight, e in zip(w, chosen):
            gate, up = (w13[e] @ x[t]).chunk(2)
            out[t] += weight * (w2[e] @ (F.silu(gate) * up))
        if layer.shared_expert is not None:
            out[t] += torch.sigmoid(layer.shared_expert_gate.weight @ x[t]) * layer.shared_expert(x[t : t + 1])[0]
    return out


def make_layer(spec: RouterSpec, shared: bool = False, seed: int = 0) -> SparseMoE:
    gen = torch.Generator().manual_seed(seed)
    shared_mlp = torch.nn.Sequential(torch.nn.Linear(H, 8, bias=False), torch.nn.SiLU(),
                                     torch.nn.Linear(8, H, bias=False)) if shared else None
    layer = SparseMoE(H, I, spec, "silu", shared_expert=shared_mlp, shared_expert_gate=shared)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return layer


@pytest.mark.parametrize("spec,shared", [
    (RouterSpec(E, 2), False),  # Mixtral
    (RouterSpec(E, 4, renormalize=False), True),  # Qwen2-MoE
    (RouterSpec(E, 3, scoring="sigmoid"), False),
    (RouterSpec(E, E), False),  # every expert
    (RouterSpec(E, 1), False),
])
def test_layer_matches_per_token_loop(spec, shared):
    layer = make_layer(spec, shared)
    x = torch.randn(11, H, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_ties():
    """A 3-way tie for 2 places: any two of the tied experts, with equal weights (torch.topk decides, as in
    transformers), and the output is those two experts' sum."""
    layer = make_layer(RouterSpec(E, 2))
    with torch.no_grad():
        layer.gate.weight[1] = layer.gate.weight[4]  # experts 1, 3 and 4 always score the same
        layer.gate.weight[3] = layer.gate.weight[4]
        x = torch.cat([layer.gate.weight[4].unsqueeze(0).repeat(3, 1), torch.randn(5, H)])
        scores = layer.gate(x).softmax(-1)
        assert bool((scores[:3, 4] > scores[:3, [0, 2, 5]].max(-1).values).all())  # the tied three lead
        weights, experts = route(layer.gate(x), layer.router)
        for t in range(3):
            assert set(experts[t].tolist()) < {1, 3, 4} and len(set(experts[t].tolist())) == 2
        torch.testing.assert_close(weights[:3], torch.full((3, 2), 0.5))
        torch.testing.assert_close(layer(x), reference_moe(layer, x, experts.tolist()), atol=1e-5, rtol=1e-5)


def test_tokens_whose_experts_are_all_different():
    """E / k tokens, each routed to its own pair: every expert runs once, on one token."""
    spec = RouterSpec(E, 2)
    layer = make_layer(spec)
    x = torch.randn(E // 2, H)
    logits = torch.full((E // 2, E), -5.0)
    for t in range(E // 2):
        logits[t, 2 * t], logits[t, 2 * t + 1] = 3.0, 2.0
    with torch.no_grad():
        layer.gate.weight.copy_(torch.linalg.lstsq(x, logits).solution.T)  # gate(x) == logits (x has full rank)
        out = layer(x)
    assert layer.expert_counts.tolist() == [1] * E
    assert sorted(route(layer.gate(x), spec)[1].flatten().tolist()) == list(range(E))
    torch.testing.assert_close(out, reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_random_routing_weights_against_loop():
    """grouped_experts with arbitrary (weights, experts), repeated experts across tokens and empty experts."""
    gen = torch.Generator().manual_seed(3)
    w13, w2 = torch.randn(E, 2 * I, H, generator=gen), torch.randn(E, H, I, generator=gen)
    x = torch.randn(9, H, generator=gen)
    experts = torch.stack([torch.randperm(E - 2, generator=gen)[:3] for _ in range(9)])  # experts 4, 5 idle
    weights = torch.rand(9, 3, generator=gen)
    got = grouped_experts(x, w13, w2, weights, experts, F.silu)
    want = torch.zeros_like(x)
    for t in range(9):
        for w, e in zip(weights[t], experts[t]):
            gate, up = (w13[e] @ x[t]).chunk(2)
            want[t] += w * (w2[e] @ (F.silu(gate) * up))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_load_counts_per_step():
    layer = make_layer(RouterSpec(E, 2))
    model = torch.nn.ModuleDict({"a": layer, "b": make_layer(RouterSpec(E, 2), seed=1)})
    with torch.no_grad():
        layer(torch.randn(7, H))
        model["b"](torch.randn(5, H))
        counts = expert_load(model)
    assert counts.shape == (2, E)
    assert counts.sum(1).tolist() == [14, 10]  # tokens * top_k per layer
    with torch.no_grad():
        layer(torch.randn(1, H))  # a new step replaces the counts
    assert int(layer.expert_counts.sum()) == 2


def test_bfloat16_close_to_float32():
    layer = make_layer(RouterSpec(E, 2))
    x = torch.randn(20, H)
    with torch.no_grad():
        ref = layer(x)
        got = layer.to(torch.bfloat16)(x.bfloat16())
    assert got.dtype == torch.bfloat16
    assert (got.float() - ref).abs().max() < 0.05 * ref.abs().max()


def test_platform_registry():
    assert experts_impl(torch.device("cpu")) is grouped_experts
    assert "cuda" in MOE_IMPLS  # the fused Triton kernel, imported only when a GPU tensor comes


def test_router_spec_validation():
    with pytest.raises(ValueError, match="scoring"):
        RouterSpec(4, 2, scoring="relu")
    with pytest.raises(ValueError, match="top_k"):
        RouterSpec(4, 5)


def test_stacked_weight_loader_shards_and_errors():
    w = StackedWeight(3, 4, 5, parts=2)
    for e in range(3):
        for part in range(2):
            w.weight_loader(w.weight, torch.full((4, 5), float(10 * e + part)), (e, part))
    assert w.weight[2, :4].eq(20).all() and w.weight[2, 4:].eq(21).all()
    with pytest.raises(ValueError, match="expert 1 part 0"):
        w.weight_loader(w.weight, torch.zeros(5, 5), (1, 0))
    full = torch.randn(3, 8, 5)
    w.weight_loader(w.weight, full)  # already stacked
    assert torch.equal(w.weight, full)


def test_unknown_architecture_names_model_type_and_supported_list():
    with pytest.raises(ValueError) as err:
        architecture_of({"architectures": ["FalconForCausalLM"], "model_type": "falcon"})
    msg = str(err.value)
    assert "'FalconForCausalLM'" in msg and "'falcon'" in msg
    for name in ("LlamaForCausalLM", "MixtralForCausalLM", "Qwen2MoeForCausalLM", "GemmaForCausalLM",
                 "Gemma2ForCausalLM", "Phi3ForCausalLM"):
        assert name in msg


def test_checkpoint_missing_an_expert_fails_loudly(tmp_path):
    import transformers
    from safetensors.torch import load_file, save_file

    from tgi_backend.models.mixtral import MixtralForCausalLM
    from tgi_backend.weights.loader import load_weights

    config = transformers.MixtralConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=16, vocab_size=64,
                                        num_local_experts=4, num_experts_per_tok=2)
    config.architectures = ["MixtralForCausalLM"]
    transformers.MixtralForCausalLM(config).save_pretrained(tmp_path)
    hf = config.to_dict()
    model = MixtralForCausalLM(MixtralForCausalLM.args_from_config(hf), 64)
    load_weights(model, str(tmp_path))  # the whole checkpoint: every expert stacked in place
    tensors = load_file(tmp_path / "model.safetensors")
    ref = tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    assert torch.equal(model.model.layers[0].mlp.experts.w13.weight[2, 16:], ref)
    del tensors["model.layers.0.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"experts\.w13.*\(2, 1\)"):
        load_weights(MixtralForCausalLM(MixtralForCausalLM.args_from_config(hf), 64), str(tmp_path))
