"""A bf16 linear for up to MAX_ROWS input rows on the native kernel of gemv.c (decode steps of a few rows).

It reads the plain row-major bf16 weight once per call: with AVX512-BF16 (vdpbf16ps) at 26-31 GB/s from DRAM
on Emerald Rapids against 20-24 for oneDNN's packed GEMV; where bf16 is emulated (Ice Lake) at ~18-20 GB/s
against ~14, and against oneDNN's float32 path (2-8 rows), which reads twice the bytes.
"""
from __future__ import annotations

import torch

from tgi_backend.kernels.cpu import library

MAX_ROWS = 8  # gemv.c's MAX_ROWS


def available() -> bool:
    return library("gemv") is not None


def avx2_tiles() -> bool:
    """The build has gemv.h's AVX2 tiles (AVX2 and FMA, no AVX-512: no oneDNN bf16 either). There the kernel
    runs 1-8 rows 1.2-4.8x faster than F.linear's bf16 (EPYC Milan), and at 1-4 rows faster than oneDNN's float32
    on a packed copy, which reads twice the bytes."""
    lib = library("gemv")
    return lib is not None and bool(lib.avx2_tiles())


def supports(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    return (
        x.dim() == 2 and 1 <= x.shape[0] <= MAX_ROWS and x.dtype is torch.bfloat16 and x.is_contiguous()
        and x.device.type == "cpu" and weight.dtype is torch.bfloat16 and weight.dim() == 2
        and weight.is_contiguous() and weight.shape[1] == x.shape[1]
        and (bias is None or (bias.dtype is torch.bfloat16 and bias.is_contiguous() and bias.shape == weight.shape[:1]))
    )


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """x @ weight.T + bias, rounded to bf16 once (returned as bf16, or as float32 for logits);
    x: [rows, in] bf16 with rows <= MAX_ROWS (supports() says), weight: [out, in] bf16."""
    lib = library("gemv")
    if lib is None or not supports(x, weight, bias) or out_dtype not in (torch.bfloat16, torch.float32):
        raise ValueError("gemv.linear: inputs the kernel does not take (check supports())")
    y = torch.empty(x.shape[0], weight.shape[0], dtype=out_dtype)
    status = lib.linear_bf16(
        x.data_ptr(), x.shape[0], x.shape[1], weight.data_ptr(), weight.shape[0],
        None if bias is None else bias.data_ptr(), y.data_ptr(), int(out_dtype is torch.float32),
        torch.get_num_threads(),
    )
    if status == -2:
        raise MemoryError(f"gemv: no memory for a float32 copy of {x.shape[0]} x {x.shape[1]} inputs")
    if status != 0:
        raise RuntimeError(f"gemv rejected {x.shape[0]} rows")
    return y
