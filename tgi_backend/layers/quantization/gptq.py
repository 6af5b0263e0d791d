"""GPTQ checkpoints (AutoGPTQ, GPTQModel, optimum): 4 or 8 bits, groups, act-order (g_idx), sym or not.

quantization_config: {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true,
"checkpoint_format": "gptq" | "gptq_v2"}. Tensors per linear: qweight, qzeros, scales, g_idx (and a bias
some tools save even when zero). Layout: see packing.py.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_backend.layers.linear import Linear
from tgi_backend.layers.quantization.base import QuantStrategy, register
from tgi_backend.layers.quantization.compute import IntGroupLinear, drop
from tgi_backend.layers.quantization.packing import gptq_unpack


class GPTQLinear(IntGroupLinear):
    def __init__(self, base: Linear, bits: int, group_size: int, v2: bool) -> None:
        super().__init__(base)
        self.bits, self.v2 = bits, v2
        pack = 32 // bits
        n_in, n_out = self.in_features, self.out_features
        if n_in % pack:
            raise ValueError(f"GPTQ {bits}-bit needs input features divisible by {pack}, got {n_in}")
        self.group_size = n_in if group_size <= 0 else group_size
        groups = -(-n_in // self.group_size)
        self.add_tensor("qweight", _int32(n_in // pack, n_out), out_dim=1)
        self.add_tensor("qzeros", _int32(groups, n_out // pack), out_dim=1, pack=pack)
        self.add_tensor("scales", nn.Parameter(torch.empty(groups, n_out, dtype=torch.float16), requires_grad=False),
                        out_dim=1)
        default = (torch.arange(n_in, dtype=torch.int32) // self.group_size)
        self.add_tensor("g_idx", nn.Parameter(default, requires_grad=False), out_dim=None, optional=True,
                        loader=self._load_g_idx)
        self._g_idx_given = False

    def _load_g_idx(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        # q/k/v (gate/up) see the same inputs, so act-order gives them the same g_idx; anything else is unsupported
        loaded = loaded.to(torch.int32)
        if self._g_idx_given and not torch.equal(param.data, loaded):
            raise ValueError("GPTQ packed shards with different g_idx are not supported")
        if loaded.shape != param.shape:
            raise ValueError(f"g_idx: expected {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
        param.data.copy_(loaded)
        self._g_idx_given = True

    def finalize(self) -> None:
        q, zeros = gptq_unpack(self.qweight.data, self.qzeros.data, self.bits, self.v2)
        self.finish_groups(q, zeros, self.scales.data.float(), self.g_idx.data, self.bits)
        drop(self, "qweight", "qzeros", "scales", "g_idx")


def _int32(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape, dtype=torch.int32), requires_grad=False)


@register
class GPTQStrategy(QuantStrategy):
    name = "gptq"
    markers = ("qweight",)

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.bits = int(config.get("bits", 4))
        if self.bits not in (4, 8):
            raise ValueError(f"GPTQ with {self.bits} bits is not supported (4 or 8)")
        self.group_size = int(config.get("group_size", 128))
        self.v2 = str(config.get("checkpoint_format", "gptq")).lower() == "gptq_v2"
        if not config:
            raise ValueError("--quantize gptq needs a GPTQ checkpoint (quantization_config in config.json)")

    def build(self, base: Linear) -> GPTQLinear:
        return GPTQLinear(base, self.bits, self.group_size, self.v2)
