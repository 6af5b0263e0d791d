"""screen.c: the greedy LM head screened in 8-bit integers gives panel.linear's argmax, bit for bit."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.kernels.cpu import panel, screen

pytestmark = pytest.mark.skipif(not screen.available(), reason="no screen kernel in this build (AVX2 without AVX-512)")


def _both(w: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, screen.ScreenedHead]:
    panels = panel.pack(w)
    head = screen.ScreenedHead(w, panels)
    want, got = (torch.empty(x.shape[0], dtype=torch.int64) for _ in range(2))
    panel.linear(x, panels, w.shape[0], None, None, argmax=want)
    head.argmax(x, got)
    return want, got, head


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7, 33, 130])
@pytest.mark.parametrize("out,inn", [(1003, 203), (4096, 512)])
def test_tokens_are_the_panels_argmax(rows, out, inn):
    gen = torch.Generator().manual_seed(rows * 7 + out)
    w = (torch.randn(out, inn, generator=gen) * 0.02).bfloat16()
    x = torch.randn(rows, inn, generator=gen).bfloat16()
    want, got, head = _both(w, x)
    assert torch.equal(got, want)
    assert head.whole_rows == 0  # random logits: every row narrowed by the screen


def test_wide_rows_are_narrowed_from_their_8_highest_bounds():
    # hidden 1024, a few large features (as after a final norm): the loose bounds reach past 1,024 outputs of
    # the row's best lower bound, but the exact best of the 8 highest bounds leaves a few dozen (medium model)
    gen = torch.Generator().manual_seed(5)
    w = (torch.randn(8192, 1024, generator=gen) * 0.02).bfloat16()
    scale = torch.ones(1024)
    scale[:8] = 3.0
    x = (torch.randn(24, 1024, generator=gen) * scale).bfloat16()
    want, got, head = _both(w, x)
    assert torch.equal(got, want)
    assert head.whole_rows == 0


def test_equal_logits_go_to_the_lowest_index():
    gen = torch.Generator().manual_seed(1)
    w = (torch.randn(500, 64, generator=gen) * 0.02).bfloat16()
    x = torch.randn(6, 64, generator=gen).bfloat16()
    top = (x.float() @ w.float().T).argmax(1)
    w[7] = w[top[0]]  # a copy earlier in the vocabulary: the same logits
    w[499] = w[top[1]]
    want, got, _ = _both(w, x)
    assert torch.equal(got, want) and got[0] == min(7, int(top[0]))


def test_logits_a_bf16_step_apart_are_decided_exactly():
    gen = torch.Generator().manual_seed(2)
    w = (torch.randn(300, 128, generator=gen) * 0.02).bfloat16()
    x = torch.randn(4, 128, generator=gen).bfloat16()
    top = int((x[0].float() @ w.float().T).argmax())
    for j, k in enumerate((11, 150, 299)):  # near copies of the best row: one weight one bf16 step up or down
        w[k] = w[top]
        bits = w[k].view(torch.int16)
        bits[j] += 1 if j % 2 == 0 else -1
    want, got, _ = _both(w, x)
    assert torch.equal(got, want)


def test_rows_the_screen_cannot_narrow_are_computed_whole():
    gen = torch.Generator().manual_seed(3)
    w = (torch.randn(2000, 32, generator=gen) * 0.02).bfloat16()
    x = torch.randn(5, 32, generator=gen).bfloat16()
    x[0] = 0  # every logit 0: all 2,000 tie, more candidates than a row takes (MAX_CANDIDATES)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    x[3, 0] = 1e30  # past what the bounds take
    want, got, head = _both(w, x)
    assert torch.equal(got, want) and got[0] == 0
    assert head.whole_rows == 4


def test_weights_it_cannot_bound_are_refused():
    w = torch.randn(32, 16).bfloat16()
    w[3, 4] = float("inf")
    with pytest.raises(ValueError):
        screen.ScreenedHead(w, panel.pack(w))
    w[3, 4] = 1e20
    with pytest.raises(ValueError):
        screen.ScreenedHead(w, panel.pack(w))
    narrow = torch.randn(32, 1).bfloat16()  # one input: the exact part's gathers would read past the weights
    with pytest.raises(ValueError):
        screen.ScreenedHead(narrow, panel.pack(narrow))


def test_argmax_checks_its_arguments():
    w = torch.randn(32, 16).bfloat16()
    head = screen.ScreenedHead(w, panel.pack(w))
    with pytest.raises(ValueError):
        head.argmax(torch.randn(2, 16), torch.empty(2, dtype=torch.int64))  # float32 x
    with pytest.raises(ValueError):
        head.argmax(torch.randn(2, 16).bfloat16(), torch.empty(3, dtype=torch.int64))
    head.argmax(torch.empty(0, 16, dtype=torch.bfloat16), torch.empty(0, dtype=torch.int64))  # no rows: nothing


def test_a_screen_that_narrows_too_few_rows_stops_paying():
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(2000, 32, generator=gen) * 0.02).bfloat16()
    head = screen.ScreenedHead(w, panel.pack(w))
    out = torch.empty(64, dtype=torch.int64)
    head.argmax(torch.randn(64, 32, generator=gen).bfloat16(), out)
    assert head.pays and head.whole_rows == 0
    for _ in range(4):  # all-zero rows: every output a candidate, each row computed whole
        head.argmax(torch.zeros(64, 32, dtype=torch.bfloat16), out)
    assert head.whole_rows == 256 and not head.pays
