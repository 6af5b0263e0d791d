"""rms_norm_residual (the op-set contract of layers/platform.py, RMSNorm.forward's) on the native kernel of
rms_norm.c: the residual add and the normalization in one pass per row, one rounding of y."""
from __future__ import annotations

import torch

from tgi_backend.kernels.cpu import library
from tgi_backend.layers.platform import torch_rms_norm_residual

DTYPES = {torch.bfloat16: 1, torch.float32: 0}


def _supported(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> bool:
    return (
        x.dim() == 2 and x.dtype in DTYPES and x.device.type == "cpu" and x.is_contiguous()
        and weight.dtype == x.dtype and weight.is_contiguous() and weight.shape == (x.shape[1],)
        and (residual is None or (residual.dtype == x.dtype and residual.shape == x.shape and residual.is_contiguous()))
    )


def rms_norm_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y, or (y, x + residual) when a residual is given; x: [tokens, hidden]."""
    lib = library("rms_norm")
    if lib is None or not _supported(x, weight, residual):
        return torch_rms_norm_residual(x, weight, eps, residual)
    y = torch.empty_like(x)
    total = torch.empty_like(x) if residual is not None else None
    lib.rms_norm_residual(
        x.data_ptr(), residual.data_ptr() if residual is not None else None,
        total.data_ptr() if total is not None else None, y.data_ptr(), weight.data_ptr(), x.shape[0], x.shape[1],
        eps, torch.get_num_threads(), DTYPES[x.dtype],
    )
    return y if total is None else (y, total)
