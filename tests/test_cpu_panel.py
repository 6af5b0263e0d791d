"""panel.pack: the layout panel.h's linear reads (decode steps past the few-row kernel's rows)."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.kernels.cpu import library, panel
from tgi_backend.layers import linear as linear_module
from tgi_backend.layers.embedding import LMHead
from tgi_backend.layers.linear import Linear, prepack_linears

pytestmark = pytest.mark.skipif(library("panel") is None, reason="no C compiler: no panel library")


@pytest.mark.parametrize("out", [16, 48, 37])
def test_pack_holds_output_j_high_and_j_plus_8_low(out):
    inn = 24
    w = torch.randn(out, inn).bfloat16()
    got = panel.pack(w)
    padded = torch.zeros(-(-out // 16) * 16, inn, dtype=torch.bfloat16)
    padded[:out] = w
    bits = padded.view(torch.int16).to(torch.int64) & 0xFFFF  # [outputs, in] as unsigned 16-bit
    per_panel = bits.view(-1, 16, inn).permute(0, 2, 1)  # [panel, in, 16]
    want = (per_panel[..., :8] << 16) | per_panel[..., 8:]
    assert got.shape == (-(-out // 16), inn, 8)
    assert torch.equal(got.to(torch.int64) & 0xFFFFFFFF, want)


def test_pack_refuses_what_it_does_not_take():
    with pytest.raises(ValueError):
        panel.pack(torch.randn(16, 8))  # float32


@pytest.mark.skipif(not panel.available(), reason="no panel kernel in this build (AVX2 without AVX-512)")
# 7, 8, 13, 32 rows: micro-kernel calls of 4 + 3, 4 + 4, 5 + 4 + 4, 6 x 4 + 4 + 4 rows; 300 x 1000: rows in blocks
@pytest.mark.parametrize("rows,out,inn,bias", [(1, 37, 24, True), (7, 48, 64, False), (8, 16, 40, True),
                                               (13, 130, 96, True), (32, 37, 64, False), (300, 64, 1000, False)])
def test_linear_is_the_float32_sum_rounded_once(rows, out, inn, bias):
    w, x = torch.randn(out, inn).bfloat16(), torch.randn(rows, inn).bfloat16()
    b = torch.randn(out).bfloat16() if bias else None
    want = x.float() @ w.float().T + (0 if b is None else b.float())
    got_bf16 = panel.linear(x, panel.pack(w), out, b)
    got_f32 = panel.linear(x, panel.pack(w), out, b, torch.float32)
    assert got_bf16.dtype is torch.bfloat16 and got_f32.dtype is torch.float32
    assert torch.equal(got_f32, got_bf16.float())  # logits: the same bf16 values
    assert panel.linear(x[:0], panel.pack(w), out, b).shape == (0, out)
    for r in (0, rows - 1):  # a row's sums do not depend on the rows a call takes with it
        assert torch.equal(got_bf16[r], panel.linear(x[r : r + 1], panel.pack(w), out, b)[0])
    torch.testing.assert_close(got_bf16.float(), want, rtol=1 / 128, atol=1e-3 * want.abs().max().item())


@pytest.mark.skipif(not panel.available(), reason="no panel kernel in this build (AVX2 without AVX-512)")
@pytest.mark.parametrize("rows,out", [(1, 1000), (2, 1000), (9, 1000), (300, 517)])  # 517: a partial last panel
def test_linear_argmax_is_the_first_maximum_of_its_logits(rows, out):
    """The greedy tokens from the registers, no logits written: the first maximum of the bf16 logits (ties inside
    a panel, across panels and across tasks), a NaN counting as the maximum, and a row of -inf at 0."""
    g = torch.Generator().manual_seed(5)
    inn = 64
    w = (torch.randn(out, inn, generator=g) * 0.1).bfloat16()
    x = torch.randn(rows, inn, generator=g).bfloat16()
    w[[9, 2, 130, 400, out - 1]] = w[3] * 4  # the same largest logit five times: in one panel and in others
    b = torch.zeros(out, dtype=torch.bfloat16)
    for round_, bias in enumerate((None, b, b, b)):
        if round_ == 2:  # NaN logits at 470 and 140 in every row: the first one
            b[[470, 140]] = float("nan")
        if round_ == 3:  # every logit -inf (torch.argmax: 0)
            b.fill_(float("-inf"))
        logits = panel.linear(x, panel.pack(w), out, bias, torch.float32)
        greedy = torch.full((rows,), -1, dtype=torch.int64)
        assert panel.linear(x, panel.pack(w), out, bias, None, argmax=greedy) is None
        assert torch.equal(greedy, logits.argmax(-1)), round_
    assert (greedy == 0).all()
    with pytest.raises(ValueError):
        panel.linear(x, panel.pack(w), out, None, torch.float32, argmax=greedy)  # logits or the argmax, not both


def test_avx2_plan_takes_the_panels_while_they_fit(monkeypatch):
    gib = 1 << 30
    monkeypatch.setattr(linear_module, "physical_memory", lambda: 24 * gib)
    monkeypatch.setattr(linear_module, "bf16_support", lambda: "none")
    monkeypatch.setattr(linear_module.gemv, "avx2_tiles", lambda: True)
    monkeypatch.setattr(linear_module.gemv, "available", lambda: True)
    monkeypatch.setattr(linear_module.panel, "available", lambda: True)
    assert linear_module.matmul_plan(6 * gib) is linear_module.AVX2_PANELS  # a quarter of memory
    assert linear_module.matmul_plan(8 * gib) is linear_module.EMULATED_BF16_NO_COPY
    monkeypatch.setattr(linear_module.panel, "available", lambda: False)
    assert linear_module.matmul_plan(4 * gib) is linear_module.EMULATED_BF16_NATIVE


@pytest.mark.skipif(not panel.available(), reason="no panel kernel in this build (AVX2 without AVX-512)")
def test_avx2_plan_runs_every_row_on_one_copy_of_the_panels():
    layer = Linear(96, 40, bias=True).to(torch.bfloat16)
    layer.weight.data.normal_()
    layer.bias.data.normal_()
    head = LMHead(48, 96).to(torch.bfloat16)  # vocab 48, hidden 96
    head.weight.data.normal_()
    w, b, hw = layer.weight.detach().clone(), layer.bias.detach().clone(), head.weight.detach().clone()
    assert prepack_linears(torch.nn.ModuleList([layer, head]), linear_module.AVX2_PANELS) == 2
    assert layer.packed.large is None and layer.packed.panel is not None
    assert panel.pack(layer.packed.plain) is layer.packed.panel  # the fused step packs the same weight: shared
    for rows in (1, 5, 300):
        x = torch.randn(rows, 96, dtype=torch.bfloat16)
        assert torch.equal(layer(x), panel.linear(x, panel.pack(w), 40, b))
        assert torch.equal(head(x), panel.linear(x, panel.pack(hw), 48, None, torch.float32))
