"""The Triton-language fused-MoE kernel against the PyTorch grouped path, on the CPU under TRITON_INTERPRET=1.

The interpreter must be chosen before triton is first imported, so the kernel runs in a fresh interpreter
process (whatever another test imported in this one does not matter). Tiny shapes: ~4 ms per program."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest
from interpreted import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent('''
    import json
    import torch
    import torch.nn.functional as F
    from tgi_backend.kernels.fused_moe import align_by_expert, fused_experts
    from tgi_backend.layers import moe

    def case(E, H, I, T, k, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        w13, w2 = torch.randn(E, 2 * I, H, generator=g) / H**0.5, torch.randn(E, H, I, generator=g) / I**0.5
        x = torch.randn(T, H, generator=g)
        # experts E-1 never chosen: an idle expert gets no row block
        experts = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(T)])
        weights = torch.rand(T, k, generator=g)
        args = [t.to(dtype) for t in (x, w13, w2)]
        got = fused_experts(*args, weights, experts, F.silu).float()
        want = moe.grouped_experts(x, w13, w2, weights, experts, F.silu)
        return float((got - want).abs().max() / want.abs().max())

    out = {
        "fp32": case(4, 32, 24, 5, 2, torch.float32, 0),  # I not a power of two: masked tail
        "fp32_one_token": case(8, 16, 16, 1, 2, torch.float32, 1),
        "fp32_many_pairs": case(3, 16, 16, 19, 2, torch.float32, 2),  # a run longer than one row block
        "bf16": case(4, 32, 16, 6, 3, torch.bfloat16, 3),
    }
    # alignment: every pair exactly once, each block one expert's
    experts = torch.tensor([[2, 0], [2, 1], [0, 2]])
    pairs, blocks = align_by_expert(experts, 4, 4)
    out["aligned_pairs"] = sorted(p for p in pairs.tolist() if p < 6)
    out["block_expert"] = blocks.tolist()
    out["runs"] = [[p for p in pairs[4 * b: 4 * b + 4].tolist() if p < 6] for b in range(len(blocks))]
    # the whole layer, the fused kernel in place of the CPU implementation
    moe.MOE_IMPLS["cpu"] = fused_experts
    layer = moe.SparseMoE(16, 16, moe.RouterSpec(4, 2))
    g = torch.Generator().manual_seed(5)
    for p in layer.parameters():
        p.data.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(7, 16, generator=g)
    with torch.no_grad():
        fused = layer(x)
        moe.MOE_IMPLS["cpu"] = moe.grouped_experts
        grouped = layer(x)
    out["layer"] = float((fused - grouped).abs().max() / grouped.abs().max())
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(SCRIPT)


def test_kernel_matches_grouped_pytorch_float32(results):
    for name in ("fp32", "fp32_one_token", "fp32_many_pairs"):
        assert results[name] < 1e-5, (name, results[name])


def test_kernel_bfloat16_close(results):
    assert results["bf16"] < 2e-2


def test_alignment_groups_pairs_by_expert(results):
    assert results["aligned_pairs"] == list(range(6))
    assert results["block_expert"] == [0, 1, 2]  # expert 3 idle: no block
    assert results["runs"] == [[1, 4], [3], [0, 2, 5]]  # pair = token * k + slot


def test_layer_with_fused_kernel_matches(results):
    assert results["layer"] < 1e-5
