"""fp8 (e4m3) weights: fp8 / compressed-tensors checkpoints, or a float checkpoint with `--quantize fp8`.

Checkpoints store `weight` (float8_e4m3fn [out, in]) and `weight_scale`: one per tensor (a scalar, one per
packed shard) or one per output channel ([out, 1]); `input_scale` (static activation scale) is accepted and
unused, since activations stay in float here. Block-wise scales (`weight_block_size`, `weight_scale_inv`)
are supported too. No CPU fp8 matmul: weights are dequantized on load.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tgi_backend.layers.linear import Linear
from tgi_backend.layers.quantization.base import QuantizedLinear, QuantStrategy, register
from tgi_backend.layers.quantization.compute import MATMULS, drop, set_dense

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [out, in] float -> (fp8 weight, per-channel scale [out]); what `--quantize fp8` does on the fly."""
    scale = (w.float().abs().amax(dim=1) / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class FP8Linear(QuantizedLinear):
    def __init__(self, base: Linear, block: tuple[int, int] | None) -> None:
        super().__init__(base)
        n_out, n_in = self.out_features, self.in_features
        self.block = block
        self.add_tensor("weight", nn.Parameter(torch.zeros(n_out, n_in, dtype=FP8), requires_grad=False),
                        out_dim=0, loader=self._load_weight)
        self._given_scales: set[Any] = set()
        if block is None:
            scale = nn.Parameter(torch.ones(n_out), requires_grad=False)
            self.add_tensor("weight_scale", scale, out_dim=0, optional=True)
        else:
            b0, b1 = block
            scale = nn.Parameter(torch.ones(-(-n_out // b0), -(-n_in // b1)), requires_grad=False)
            self.add_tensor("weight_scale_inv", scale, out_dim=0, pack=b0)
        self.add_tensor("input_scale", nn.Parameter(torch.ones(1), requires_grad=False), out_dim=None,
                        optional=True, loader=lambda p, t, shard_id=None: None)
        self.weight_format = ""

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
        offset, size = self.shard_offsets.get(shard_id, (0, self.out_features))  # None: stored packed
        if loaded.dtype != FP8:  # a float checkpoint: quantize per channel now
            if self.block is not None:
                raise ValueError("a float checkpoint cannot be loaded with block-wise fp8 scales")
            loaded, scale = quantize_fp8(loaded)
            self.weight_scale.data.narrow(0, offset, size).copy_(scale)
        if loaded.shape != (size, self.in_features):
            raise ValueError(f"shard {shard_id!r}: expected {(size, self.in_features)}, got {tuple(loaded.shape)}")
        param.data.narrow(0, offset, size).copy_(loaded)

    def finalize(self) -> None:
        w = self.weight.data.float()
        if self.block is None:
            w = w * self.weight_scale.data.float()[:, None]
        else:
            b0, b1 = self.block
            s = self.weight_scale_inv.data.float()
            s = s.repeat_interleave(b0, 0)[: w.shape[0]].repeat_interleave(b1, 1)[:, : w.shape[1]]
            w = w * s
        drop(self, "weight", "weight_scale", "weight_scale_inv", "input_scale")
        set_dense(self, w)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return MATMULS[self.weight_format](self, x)


@register
class FP8Strategy(QuantStrategy):
    name = "fp8"
    markers = ("weight_scale", "weight_scale_inv")
    requires_markers = False

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.skip += tuple(config.get("ignore") or ())  # compressed-tensors' list of unquantized modules
        block = config.get("weight_block_size")
        self.block = (int(block[0]), int(block[1])) if block else None
        method = str(config.get("quant_method") or "fp8")
        if method == "compressed-tensors":
            _check_compressed_tensors(config)

    def build(self, base: Linear) -> FP8Linear:
        return FP8Linear(base, self.block)


def _check_compressed_tensors(config: dict[str, Any]) -> None:
    for group in (config.get("config_groups") or {}).values():
        weights = group.get("weights") or {}
        if weights.get("type", "float") != "float" or int(weights.get("num_bits", 8)) != 8:
            raise ValueError("compressed-tensors: only fp8 (float, 8 bits) weights are supported")
        if weights.get("strategy", "tensor") not in ("tensor", "channel"):
            raise ValueError(f"compressed-tensors: weight strategy {weights.get('strategy')!r} is not supported")
