"""The native few-row bf16 linear (kernels/cpu/gemv.c) against a float64 reference, and the linear plan that
runs it: up to MAX_ROWS rows on the plain bf16 weight, oneDNN's float32 copy from there."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.kernels.cpu import gemv
from tgi_backend.layers import linear as linear_module
from tgi_backend.layers.embedding import LMHead
from tgi_backend.layers.linear import EMULATED_BF16_NATIVE, Linear, prepack_linears

needs_kernel = pytest.mark.skipif(not gemv.available(), reason="no C compiler: the kernel did not build")
needs_onednn_bf16 = pytest.mark.skipif(linear_module.bf16_support() == "none",
                                       reason="oneDNN has no bf16 on this CPU: nothing is packed")


def _problem(rows, out, inn, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, inn, generator=g).to(torch.bfloat16)
    w = (torch.randn(out, inn, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(out, generator=g).to(torch.bfloat16) if bias else None
    return x, w, b


def _bf16_layer():
    """A bf16 Linear with a bias, and copies of its weight and bias (prepacking frees the parameter)."""
    torch.manual_seed(0)
    layer = Linear(64, 48, bias=True).to(torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    return layer, layer.weight.detach().clone(), layer.bias.detach().clone()


def _exact(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


@needs_kernel
@pytest.mark.parametrize("rows", range(1, gemv.MAX_ROWS + 1))
@pytest.mark.parametrize("out,inn,bias", [(48, 64, False), (37, 64, True), (130, 40, False), (6, 2816, True)])
def test_kernel_matches_float64_rounded_once(rows, out, inn, bias):
    # 37 / 130 / 6 outputs: tiles of 4 or 2 plus a remainder; 40 inputs: a tail past the 16-wide vectors
    x, w, b = _problem(rows, out, inn, bias, seed=rows)
    exact = _exact(x, w, b)
    y = gemv.linear(x, w, b)
    assert y.dtype is torch.bfloat16 and y.shape == (rows, out)
    # float32 sums, one rounding to bf16: within one bf16 ulp of the exact value (plus the float32 sum's error)
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-7
    assert ((y.double() - exact).abs() <= ulp + 1e-5 * inn**0.5).all()
    logits = gemv.linear(x, w, b, torch.float32)  # the LM head's form: the same bf16 values, stored as float32
    assert logits.dtype is torch.float32 and torch.equal(logits, y.float())


@needs_kernel
def test_threads_do_not_change_the_result():
    x, w, b = _problem(3, 4000, 512, True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = gemv.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, gemv.linear(x, w, b))


@needs_kernel
def test_inputs_it_does_not_take_are_refused():
    x, w, b = _problem(2, 16, 32, True)
    assert gemv.supports(x, w, b)
    for bad in (
        (torch.empty(0, 32, dtype=torch.bfloat16), w, b),  # no rows
        (torch.empty(gemv.MAX_ROWS + 1, 32, dtype=torch.bfloat16), w, b),  # too many
        (x.float(), w, b), (x, w.float(), b), (x, w, b.float()),
        (x, w[:, :16], b),  # in mismatch
        (torch.randn(2, 64, dtype=torch.bfloat16)[:, ::2], w, b),  # strided
        (x, w, b[:8]),
    ):
        assert not gemv.supports(*bad)
        with pytest.raises(ValueError):
            gemv.linear(*bad)


@needs_kernel
@pytest.mark.skipif(linear_module.bf16_support() == "none" and not gemv.avx2_tiles(),
                    reason="neither oneDNN bf16 nor the kernel's AVX2 tiles: no kernel plan here")
def test_native_plan_runs_the_kernel_up_to_max_rows_then_float32():
    layer, w, b = _bf16_layer()
    head = LMHead(32, 64).to(torch.bfloat16)
    head.weight.data.normal_()
    hw = head.weight.detach().clone()
    model = torch.nn.ModuleList([layer, head])
    assert prepack_linears(model, EMULATED_BF16_NATIVE) == 2
    assert layer.packed.native_rows == gemv.MAX_ROWS and not layer.packed.small_packed
    assert layer.packed.large is not None and layer.weight.numel() == 0  # the plain weight lives on in `small`
    for rows in (1, 5, gemv.MAX_ROWS):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(layer(x), gemv.linear(x, w, b))
        assert torch.equal(head(x), gemv.linear(x, hw, None, torch.float32))
    strided = torch.randn(4, 128, dtype=torch.bfloat16)[:, ::2]  # made contiguous on the way in
    assert torch.equal(layer(strided), gemv.linear(strided.contiguous(), w, b))
    x = torch.randn(gemv.MAX_ROWS + 1, 64, dtype=torch.bfloat16)  # the float32 copy from here
    torch.testing.assert_close(layer(x).float(), F.linear(x.float(), w.float(), b.float()).to(torch.bfloat16).float(),
                               rtol=1e-2, atol=1e-2)


@needs_kernel
@needs_onednn_bf16
def test_native_bf16_plan_runs_the_kernel_up_to_its_rows_then_onednn():
    layer, w, b = _bf16_layer()
    plan = linear_module.NATIVE_BF16_KERNEL
    assert prepack_linears(torch.nn.ModuleList([layer]), plan) == 1
    packed = layer.packed
    assert packed.small_packed and packed.plain is not packed.small and packed.large is None
    assert torch.equal(packed.plain, w) and layer.weight.numel() == 0  # the plain copy beside oneDNN's layout
    for rows in range(1, plan.native_rows + 1):
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        assert torch.equal(layer(x), gemv.linear(x, w, b))
    for rows in (plan.native_rows + 1, 33):  # oneDNN's bf16 layout
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), F.linear(x, w, b).float(), rtol=1.6e-2, atol=2e-2)


def test_plan_takes_the_kernel_where_it_builds(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(linear_module, "physical_memory", lambda: 24 * gib)
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "emulated")
    monkeypatch.setattr(gemv, "available", lambda: True)
    assert linear_module.matmul_plan(2 * gib) is EMULATED_BF16_NATIVE
    assert linear_module.matmul_plan(8 * gib) is linear_module.EMULATED_BF16_NO_COPY  # ~2B parameters: no copies
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "none")  # AVX2 only: the kernel's AVX2 tiles
    monkeypatch.setattr(gemv, "avx2_tiles", lambda: True)
    monkeypatch.setattr(linear_module.panel, "available", lambda: False)  # with them: tests/test_cpu_panel.py
    assert linear_module.matmul_plan(2 * gib) is EMULATED_BF16_NATIVE
    assert linear_module.matmul_plan(8 * gib) is linear_module.EMULATED_BF16_NO_COPY
    monkeypatch.setattr(gemv, "avx2_tiles", lambda: False)  # older x86 (SSE only): F.linear's bf16
    assert linear_module.matmul_plan(2 * gib) is None
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "emulated")
    monkeypatch.setattr(gemv, "available", lambda: False)  # no compiler, or TGI_CPU_KERNELS=0
    assert linear_module.matmul_plan(2 * gib) is linear_module.EMULATED_BF16
    assert linear_module.matmul_plan(8 * gib) is None


@needs_kernel
def test_no_copy_plan_runs_the_kernel_then_the_plain_path():
    layer, w, b = _bf16_layer()
    assert prepack_linears(torch.nn.ModuleList([layer]), linear_module.EMULATED_BF16_NO_COPY) == 1
    assert layer.packed.large is None and layer.packed.upcast_rows == linear_module.bf16_upcast_min_rows()
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert torch.equal(layer(x), gemv.linear(x, w, b))
    for rows in (gemv.MAX_ROWS + 1, 40):  # bf16 F.linear, then float32 upcast per call (past upcast_rows)
        x = torch.randn(rows, 64, dtype=torch.bfloat16)
        torch.testing.assert_close(layer(x).float(), F.linear(x.float(), w.float(), b.float()).float(),
                                   rtol=2e-2, atol=5e-2)

