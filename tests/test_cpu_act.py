"""The gated activation's native kernel (kernels/cpu/act.c): act(gate) * up bit for bit PyTorch's for the
activations whose value depends on the element alone, None (the layer's PyTorch code) for the rest, and the
layer running it inside a step of the cpu op set."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import pytest

from tgi_backend.engine.forward_context import DecodeBatch, ForwardContext, forward_context
from tgi_backend.kernels.cpu import library
from tgi_backend.kernels.cpu.act import gated_act
from tgi_backend.layers.activation import ACTIVATIONS, GatedActivation
from tgi_backend.layers.platform import get_ops

needs_act = pytest.mark.skipif(library("act") is None, reason="no C compiler: the kernel did not build")
SPECIALS = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38, -3e38, 1e-40]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, every NaN counting as one (its payload follows the CPU's multiply, not PyTorch's)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan].view(torch.int16), b[~nan].view(torch.int16))


def _gate_up(rows: int, inter: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 2 * inter, generator=g) * 4).to(torch.bfloat16)
    x.view(-1)[: len(SPECIALS)] = torch.tensor(SPECIALS).to(torch.bfloat16)  # in the gate half of row 0
    x[0, inter : inter + len(SPECIALS)] = torch.tensor(SPECIALS).to(torch.bfloat16)  # and in its up half
    return x


@needs_act
@pytest.mark.parametrize("name", ["silu", "relu"])
@pytest.mark.parametrize("rows, inter", [(1, 1408), (3, 100), (5, 17), (600, 1408)])  # tails; 600 rows: threads
def test_matches_pytorch_bit_for_bit(name, rows, inter):
    act = ACTIVATIONS[name]
    x = _gate_up(rows, inter, rows + inter)
    want = act(x[:, :inter]) * x[:, inter:]
    got = gated_act(act, x)
    assert got.shape == want.shape and same_bits(got, want)


def test_what_it_does_not_take_stays_with_pytorch():
    x = _gate_up(4, 32, 0)
    assert gated_act(F.gelu, x) is None  # gelu's own vectorized and scalar paths disagree: no table is exact
    assert gated_act(F.silu, x.float()) is None
    assert gated_act(F.silu, x.t().contiguous().t()) is None  # not contiguous
    assert gated_act(F.silu, x.view(2, 2, 64)) is None


@needs_act
def test_the_layer_runs_the_op_set_activation_inside_a_step():
    layer = GatedActivation("silu")
    x = _gate_up(9, 64, 1)
    calls = []
    ops = get_ops("cpu")
    counting = type(ops)(**{**{f: getattr(ops, f) for f in ops.__dataclass_fields__},
                            "gated_act": lambda act, t: calls.append(t) or gated_act(act, t)})
    dec = DecodeBatch(1, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4)
    with forward_context(ForwardContext(torch.zeros(1, dtype=torch.long), dec, [], 4, ops=counting)):
        y = layer(x)
    assert len(calls) == 1 and calls[0] is x
    assert same_bits(y, layer(x))  # outside a step: PyTorch's code
    with forward_context(ForwardContext(torch.zeros(1, dtype=torch.long), dec, [], 4, ops=get_ops("torch"))):
        assert same_bits(layer(x), y)  # the torch set has no gated_act: PyTorch's code
