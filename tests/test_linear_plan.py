"""Linears prepacked for oneDNN: each CPU plan (native bf16; emulated bf16 with a float32 copy from two rows,
float32 weights packed from four) against F.linear, the plan chosen from the CPU and the weights' size, and the plain path kept otherwise."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.layers import linear as linear_module
from tgi_backend.layers.embedding import LMHead, VocabEmbedding
from tgi_backend.layers.linear import EMULATED_BF16, NATIVE_BF16, Linear, MatmulPlan, native_bf16, prepack_linears

needs_onednn_bf16 = pytest.mark.skipif(linear_module.bf16_support() == "none",
                                       reason="oneDNN has no bf16 on this CPU: nothing is packed")


def _layers() -> tuple[torch.nn.ModuleList, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    head = LMHead(32, 64).to(torch.bfloat16)
    head.weight.data.normal_()
    ref = {"w": layer.weight.detach().clone(), "b": layer.bias.detach().clone(), "head": head.weight.detach().clone()}
    plain = Linear(64, 8)  # float32
    plain.weight.data.normal_()
    ref["f32"] = plain.weight.detach().clone()
    return torch.nn.ModuleList([layer, head, plain]), ref


def _same_bf16(got: torch.Tensor, want: torch.Tensor) -> None:
    """Within bf16 rounding: F.linear may take another kernel (a one-row GEMV on Emerald Rapids differs by 1 ulp)."""
    torch.testing.assert_close(got.float(), want.float(), rtol=1.6e-2, atol=2e-2)


@needs_onednn_bf16
def test_native_plan_computes_bf16_as_f_linear():
    model, ref = _layers()
    assert prepack_linears(model, NATIVE_BF16) == 2
    layer, head = model[0], model[1]
    assert layer.weight.numel() == 0 and model[2].packed is None and layer.packed.large is None
    for rows in (1, 5, 33):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        _same_bf16(layer(x), F.linear(x, ref["w"], ref["b"]))
        _same_bf16(head(x), F.linear(x, ref["head"]).float())
    strided = torch.randn(8, 128, dtype=torch.bfloat16)[:, ::2]  # a non-contiguous input
    _same_bf16(layer(strided), F.linear(strided, ref["w"], ref["b"]))


@needs_onednn_bf16
def test_emulated_plan_uses_bf16_for_one_row_and_float32_from_two():
    model, ref = _layers()
    assert prepack_linears(model, EMULATED_BF16) == 3
    layer, head = model[0], model[1]
    assert layer.packed.large is not None and layer.packed.large.dtype is torch.float32
    x1 = torch.randn(1, 64, dtype=torch.bfloat16)
    _same_bf16(layer(x1), F.linear(x1, ref["w"], ref["b"]))  # the bf16 GEMV
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
def test_emulated_plan_packs_float32_weights_from_four_rows():
    model, ref = _layers()
    prepack_linears(model, EMULATED_BF16)
    f32 = model[2]
    assert f32.packed.large_rows == 4 and not f32.packed.small_packed  # the plain weight serves fewer rows
    for rows in (1, 3, 4, 40):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(f32(x), F.linear(x, ref["f32"]), rtol=1e-5, atol=1e-5)


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


def test_copy_bytes_counts_a_float32_copy_per_weight():
    assert linear_module.copy_bytes(torch.empty(4, 8, dtype=torch.bfloat16)) == 4 * 8 * 4
    assert linear_module.copy_bytes(torch.empty(4, 8)) == 4 * 8 * 4
    assert linear_module.copy_bytes(torch.empty(4, 8, dtype=torch.float16)) == 0
    assert linear_module.copy_bytes(torch.empty(0)) == 0  # a freed weight


def test_plan_follows_the_cpu_and_the_weights_size(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(linear_module, "physical_memory", lambda: 24 * gib)
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "native")
    monkeypatch.setattr(linear_module.gemv, "available", lambda: True)
    assert linear_module.matmul_plan(8 * gib) is linear_module.NATIVE_BF16_KERNEL  # a bf16 copy: 4 GiB of 24
    assert linear_module.matmul_plan(100 * gib) is NATIVE_BF16  # no room for the plain copy: oneDNN's layout only
    monkeypatch.setattr(linear_module.gemv, "available", lambda: False)
    assert linear_module.matmul_plan(8 * gib) is NATIVE_BF16
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "emulated")
    monkeypatch.setattr(linear_module.gemv, "available", lambda: False)  # tests/test_cpu_gemv.py: with it
    assert linear_module.matmul_plan(2 * gib) is EMULATED_BF16  # float32 copies: 2 GiB of 24
    assert linear_module.matmul_plan(8 * gib) is None  # over a quarter of memory
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "none")
    monkeypatch.setattr(linear_module.gemv, "avx2_tiles", lambda: False)
    assert linear_module.matmul_plan(gib) is None


def test_bf16_support_matches_the_cpu():
    onednn_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    want = "native" if native_bf16() else ("emulated" if onednn_bf16 else "none")
    assert linear_module.bf16_support() == want


def test_upcast_scratch_first_made_in_inference_mode_still_works_outside_it() -> None:
    # the engine upcasts inside inference_mode; a later caller on the same thread (tests, tools) may not
    linear_module._SCRATCH.__dict__.clear()
    w = torch.randn(8, 4).to(torch.int8)
    with torch.inference_mode():
        assert torch.equal(linear_module.upcast_weight(w), w.float())
    assert torch.equal(linear_module.upcast_weight(w[:4]), w[:4].float())
