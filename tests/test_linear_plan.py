"""bf16 linears prepacked for oneDNN: each CPU plan (native bf16; emulated bf16 with a float32 copy from two
rows) against F.linear, the plan chosen from the CPU and the weights' size, and the plain path kept otherwise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.layers import linear as linear_module
from tgi_backend.layers.embedding import LMHead, VocabEmbedding
from tgi_backend.layers.linear import EMULATED_BF16, NATIVE_BF16, Linear, MatmulPlan, prepack_linears

try:
    ONEDNN_BF16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
except (RuntimeError, AttributeError):
    ONEDNN_BF16 = False
needs_onednn_bf16 = pytest.mark.skipif(not ONEDNN_BF16, reason="oneDNN has no bf16 on this CPU: nothing is packed")


def _layers() -> tuple[torch.nn.ModuleList, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    head = LMHead(32, 64).to(torch.bfloat16)
    head.weight.data.normal_()
    ref = {"w": layer.weight.detach().clone(), "b": layer.bias.detach().clone(), "head": head.weight.detach().clone()}
    return torch.nn.ModuleList([layer, head, Linear(64, 8)]), ref  # the float32 one stays plain


@needs_onednn_bf16
def test_native_plan_computes_bf16_as_f_linear():
    model, ref = _layers()
    assert prepack_linears(model, NATIVE_BF16) == 2
    layer, head = model[0], model[1]
    assert layer.weight.numel() == 0 and model[2].packed is None and layer.packed.fp32 is None
    for rows in (1, 5, 33):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(layer(x), F.linear(x, ref["w"], ref["b"]))
        assert torch.equal(head(x), F.linear(x, ref["head"]).float())
    strided = torch.randn(8, 128, dtype=torch.bfloat16)[:, ::2]  # a non-contiguous input
    assert torch.equal(layer(strided), F.linear(strided, ref["w"], ref["b"]))


@needs_onednn_bf16
def test_emulated_plan_uses_bf16_for_one_row_and_float32_from_two():
    model, ref = _layers()
    assert prepack_linears(model, EMULATED_BF16) == 2
    layer, head = model[0], model[1]
    assert layer.packed.fp32 is not None and layer.packed.fp32.dtype is torch.float32
    x1 = torch.randn(1, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x1), F.linear(x1, ref["w"], ref["b"]))  # the bf16 GEMV
    for rows in (2, 7, 33):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        want = F.linear(x.float(), ref["w"].float(), ref["b"].float())
        got = layer(x)
        assert got.dtype is torch.bfloat16
        torch.testing.assert_close(got.float(), want.to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)
        logits = head(x)  # the LM head's float32 logits come straight from the float32 copy
        assert logits.dtype is torch.float32
        torch.testing.assert_close(logits, F.linear(x.float(), ref["head"].float()), rtol=1e-5, atol=1e-4)
    strided = torch.randn(8, 128, dtype=torch.bfloat16)[:, ::2]
    torch.testing.assert_close(layer(strided).float(), F.linear(strided.float(), ref["w"].float(),
                               ref["b"].float()).to(torch.bfloat16).float(), rtol=1e-2, atol=1e-2)


@needs_onednn_bf16
@pytest.mark.parametrize("plan", [NATIVE_BF16, EMULATED_BF16])
def test_tied_lm_head_keeps_the_embedding_weight(plan: MatmulPlan):
    emb = VocabEmbedding(32, 16).to(torch.bfloat16)
    emb.weight.data.normal_()
    head = LMHead(32, 16)
    head.tie(emb)
    head.prepack(plan)
    assert emb.weight.numel() == 32 * 16 and head.packed is not None
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    torch.testing.assert_close(head(x), F.linear(x.float(), emb.weight.float()), rtol=1e-2, atol=1e-2)


def test_no_plan_keeps_the_plain_weight():
    model, ref = _layers()
    assert prepack_linears(model, None) == 0
    x = torch.randn(20, 64, dtype=torch.bfloat16)  # past bf16_upcast_min_rows on an emulating CPU
    assert model[0].weight.numel() == 64 * 48
    torch.testing.assert_close(model[0](x).float(), F.linear(x, ref["w"], ref["b"]).float(), rtol=2e-2, atol=5e-2)


def test_plan_follows_the_cpu_and_the_weights_size(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(linear_module, "_physical_memory", lambda: 24 * gib)
    monkeypatch.setattr(linear_module, "native_bf16", lambda: True)
    assert linear_module.matmul_plan(100 * gib) is NATIVE_BF16  # no float32 copy: no memory limit
    monkeypatch.setattr(linear_module, "native_bf16", lambda: False)
    if ONEDNN_BF16:
        assert linear_module.matmul_plan(gib) is EMULATED_BF16  # float32 copy: 2 GiB of 24
        assert linear_module.matmul_plan(4 * gib) is None  # 8 GiB of float32 copies: over a quarter of memory
    else:
        assert linear_module.matmul_plan(gib) is None
