"""AWQ checkpoints in the GEMM packing (AutoAWQ, llm-awq exports): 4 bits, groups, zero point.

quantization_config: {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": true,
"version": "gemm"}. Tensors per linear: qweight, qzeros, scales. Layout: see packing.py.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_backend.layers.linear import Linear
from tgi_backend.layers.quantization.base import QuantStrategy, register
from tgi_backend.layers.quantization.compute import IntGroupLinear, drop
from tgi_backend.layers.quantization.packing import awq_unpack


class AWQLinear(IntGroupLinear):
    def __init__(self, base: Linear, group_size: int) -> None:
        super().__init__(base)
        n_in, n_out = self.in_features, self.out_features
        self.group_size = n_in if group_size <= 0 else group_size
        if n_out % 8 or n_in % self.group_size:
            raise ValueError(f"AWQ needs out % 8 == 0 and in % group_size == 0, got {n_out}, {n_in}")
        groups = n_in // self.group_size
        self.add_tensor("qweight", _int32(n_in, n_out // 8), out_dim=1, pack=8)
        self.add_tensor("qzeros", _int32(groups, n_out // 8), out_dim=1, pack=8)
        self.add_tensor("scales", nn.Parameter(torch.empty(groups, n_out, dtype=torch.float16), requires_grad=False),
                        out_dim=1)

    def finalize(self) -> None:
        q, zeros = awq_unpack(self.qweight.data, self.qzeros.data)
        g_idx = torch.arange(self.in_features, dtype=torch.int32) // self.group_size
        self.finish_groups(q, zeros, self.scales.data.float(), g_idx, 4)
        drop(self, "qweight", "qzeros", "scales")


def _int32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.int32), requires_grad=False)


@register
class AWQStrategy(QuantStrategy):
    name = "awq"
    markers = ("qweight",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        if not config:
            raise ValueError("--quantize awq needs an AWQ checkpoint (quantization_config in config.json)")
        if int(config.get("bits", config.get("w_bit", 4))) != 4:
            raise ValueError("AWQ: only 4 bits is supported")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported (gemm)")
        self.group_size = int(config.get("group_size", config.get("q_group_size", 128)))

    def build(self, base: Linear) -> AWQLinear:
        return AWQLinear(base, self.group_size)
