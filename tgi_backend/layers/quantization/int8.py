"""On-the-fly weight-only quantization of a float checkpoint: what `--quantize eetq` / `bitsandbytes` (int8)
and `bitsandbytes-nf4` / `-fp4` (4-bit) give a TGI user, computed with PyTorch's CPU int8 / int4 operators.

int8: symmetric, one scale per output channel. int4: round-to-nearest with a zero point per group of input
rows (not NF4's code book: the same memory and speed class, a different rounding).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_backend.layers.linear import Linear
from tgi_backend.layers.quantization.base import QuantizedLinear, QuantStrategy, register
from tgi_backend.layers.quantization.compute import INT4_GROUP_SIZES, MATMULS, drop, set_dense, set_int4, set_int8
from tgi_backend.layers.quantization.packing import quantize_groups


class OnTheFlyLinear(QuantizedLinear):
    """Loads the float weight like the plain layer, then quantizes it in place."""

    def __init__(self, base: Linear, bits: int) -> None:
        super().__init__(base)
        self.bits = bits
        weight = torch.empty(self.out_features, self.in_features, dtype=self.dtype)
        self.add_tensor("weight", nn.Parameter(weight, requires_grad=False), out_dim=0)
        self.weight_format = ""

    def finalize(self) -> None:
        w = self.weight.data
        drop(self, "weight")
        if self.bits == 8:
            set_int8(self, w)
            return
        gs = next((g for g in reversed(INT4_GROUP_SIZES) if self.in_features % g == 0 and g <= 128), 0)
        q, zeros, scales, g_idx = quantize_groups(w.float().T, 4, gs or -1, sym=False)
        if not (gs and set_int4(self, q, zeros, scales, g_idx)):
            from tgi_backend.layers.quantization.packing import dequantize

            set_dense(self, dequantize(q, zeros, scales, g_idx))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return MATMULS[self.weight_format](self, x)


@register
class Int8Strategy(QuantStrategy):
    name = "int8"
    bits = 8

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if config:
            raise ValueError(f"the checkpoint is already quantized ({config.get('quant_method')}); "
                             f"on-the-fly {self.name} needs a float checkpoint")

    def build(self, base: Linear) -> OnTheFlyLinear:
        return OnTheFlyLinear(base, self.bits)


@register
class Int4Strategy(Int8Strategy):
    name = "int4"
    bits = 4
