"""The Triton-language dequant-matmul and LoRA SGMV kernels against the PyTorch references, on the CPU under
TRITON_INTERPRET=1. The interpreter must be chosen before triton is first imported, so the kernels run in a
fresh interpreter process. Tiny shapes: the interpreter costs ~4 ms per program per loop iteration."""
from __future__ import annotations

import importlib.util
import textwrap

import pytest
from interpreted import run_interpreted

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

SCRIPT = textwrap.dedent('''
    import json
    import torch
    from tgi_backend.kernels.dequant_matmul import dequant_matmul, to_kernel_layout
    from tgi_backend.kernels.lora_sgmv import lora_sgmv, segments_from_slots, stack_adapters
    from tgi_backend.layers.lora import LoraBatch, LoraWeights, lora_delta_
    from tgi_backend.layers.quantization import packing

    def rel(got, want):
        return float((got.float() - want.float()).abs().max() / want.float().abs().max())

    def gptq_case(K, N, M, bits, gs, act_order, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        w_t = torch.randn(K, N, generator=g)
        t = packing.gptq_pack(w_t, bits, gs, sym=False, act_order=act_order, seed=seed)
        q, zeros = packing.gptq_unpack(t["qweight"], t["qzeros"], bits)
        x = torch.randn(M, K, generator=g)
        want = x @ packing.dequantize(q, zeros, t["scales"], t["g_idx"]).T
        kq, kz, ks, kg = to_kernel_layout(q, zeros, t["scales"].float(), t["g_idx"], bits)
        return rel(dequant_matmul(x.to(dtype), kq, kz, ks.to(dtype), kg, bits), want)

    def awq_case(seed):
        g = torch.Generator().manual_seed(seed)
        t = packing.awq_pack(torch.randn(64, 48, generator=g), 32)
        q, zeros = packing.awq_unpack(t["qweight"], t["qzeros"])
        g_idx = torch.arange(64, dtype=torch.int32) // 32
        x = torch.randn(5, 64, generator=g)
        want = x @ packing.dequantize(q, zeros, t["scales"], g_idx).T
        return rel(dequant_matmul(x, *to_kernel_layout(q, zeros, t["scales"].float(), g_idx, 4), 4), want)

    def lora_case(slots, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        n_in, n_out = 24, 40
        adapters = {s: (torch.randn(r, n_in, generator=g), torch.randn(n_out, r, generator=g))
                    for s, r in ((0, 4), (1, 8), (3, 2))}
        x = torch.randn(len(slots), n_in, generator=g)
        y0 = torch.randn(len(slots), n_out, generator=g)
        plain = {s: LoraWeights.plain(a, b) for s, (a, b) in adapters.items()}
        want = lora_delta_(y0.clone(), x, LoraBatch.from_slots(slots).groups, plain)
        a_stack, b_stack = stack_adapters(adapters, 4)
        got = lora_sgmv(y0.clone().to(dtype), x.to(dtype), a_stack.to(dtype), b_stack.to(dtype), slots)
        return rel(got, want)

    out = {
        "gptq4": gptq_case(64, 48, 5, 4, 32, False, torch.float32, 0),  # N not a block multiple: masked tail
        "gptq4_act_order": gptq_case(64, 32, 3, 4, 16, True, torch.float32, 1),
        "gptq8": gptq_case(32, 32, 17, 8, 16, False, torch.float32, 2),  # M past one row block
        "gptq4_bf16": gptq_case(64, 32, 4, 4, 32, False, torch.bfloat16, 3),
        "awq": awq_case(4),
        "lora_mixed": lora_case([0, 0, 1, -1, 3, 3, 3, 0, -1, 1], torch.float32, 5),
        "lora_one_adapter": lora_case([1] * 19, torch.float32, 6),  # a run longer than one row block
        "lora_bf16": lora_case([3, -1, 0, 1], torch.bfloat16, 7),
        "segments": segments_from_slots([0, 0, -1, 2, 2, 0, -1, -1]),
    }
    print("RESULT" + json.dumps(out))
''')


@pytest.fixture(scope="module")
def results() -> dict:
    return run_interpreted(SCRIPT)


@pytest.mark.parametrize("case", ["gptq4", "gptq4_act_order", "gptq8", "awq"])
def test_dequant_matmul_fp32(results, case):
    assert results[case] < 1e-5


def test_dequant_matmul_bf16(results):
    assert results["gptq4_bf16"] < 2e-2


@pytest.mark.parametrize("case", ["lora_mixed", "lora_one_adapter"])
def test_lora_sgmv_fp32(results, case):
    assert results[case] < 1e-5


def test_lora_sgmv_bf16_and_segments(results):
    assert results["lora_bf16"] < 2e-2
    assert results["segments"] == [[0, 3, 5], [2, 2, 1], [0, 2, 0]]
