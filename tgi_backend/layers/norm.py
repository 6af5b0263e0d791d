"""RMSNorm, with the residual add fused in (the way decoder layers call it)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tgi_backend.engine.forward_context import current_ops

# Up to this many rows (decode steps) the CPU normalizes with layer_norm over [x, -x]: its mean is 0, so it is
# RMSNorm, in one native kernel where F.rms_norm runs ~8 ops. Small model, batch 1: 5.5 -> 5.2 ms per step;
# from ~128 rows it is no faster (twice the data), so prefill keeps F.rms_norm.
LAYER_NORM_ROWS = 64


class RMSNorm(nn.Module):
    """y = weight * x / rms(x).

    forward(x) returns y; forward(x, residual) first adds residual to x and returns (y, x + residual), so a
    decoder layer keeps its residual stream without an extra add.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, self._doubled_weight)

    def _doubled_weight(self) -> torch.Tensor:
        """[w, w] for the layer_norm form, rebuilt when the weight is replaced, moved or written in place."""
        w = self.weight
        key = (id(w), w.data_ptr(), w._version, w.dtype)
        cached = self.__dict__.get("_doubled")
        if cached is None or cached[0] != key:
            cached = self.__dict__["_doubled"] = (key, torch.cat((w, w)))
        return cached[1]

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        ops = current_ops()
        if ops is not None and ops.norm_in_layers:
            return ops.rms_norm_residual(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual
        return self._norm(x), x


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, doubled_weight: Callable[[], torch.Tensor] | None = None
) -> torch.Tensor:
    """x: [tokens, hidden] -> weight * x / rms(x); both forms accumulate in float32 for bf16 too."""
    hidden = x.shape[-1]
    if x.device.type == "cpu" and x.numel() <= LAYER_NORM_ROWS * hidden:
        doubled = doubled_weight() if doubled_weight is not None else torch.cat((weight, weight))
        both = torch.cat((x, x.neg()), -1)
        return F.layer_norm(both, (2 * hidden,), doubled, None, eps).narrow(-1, 0, hidden)
    return F.rms_norm(x, weight.shape, weight, eps)
