"""Fused residual-add + RMSNorm and in-place rotary embedding, for the GPU in the Triton language.

Both are memory-bound elementwise passes that PyTorch runs as several kernels (add, square, mean, rsqrt, mul;
or mul, chunk, cat, mul, add); one program per token reads each element once and writes it once.
- rms_norm_residual: the contract of layers.norm.RMSNorm.forward(x, residual): s = x + residual (rounded to
  the model dtype, as PyTorch rounds it), returns (weight * s / rms(s), s); the statistics are float32.
- rotary_apply: rotate-half (GPT-NeoX / Llama) layout like layers.rotary.RotaryEmbedding.apply, but in place
  on x (which may be a strided view, such as the q|k part of a packed qkv projection); returns x.
Verified on the CPU under TRITON_INTERPRET=1 (tests/test_gpu_kernels.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, y_ptr, sum_ptr, eps, hidden, stride_x, stride_r, stride_y, stride_s,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr,
):
    t = tl.program_id(0)
    c = tl.arange(0, BLOCK)
    ok = c < hidden
    xf = tl.load(x_ptr + t * stride_x + c, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        xf += tl.load(res_ptr + t * stride_r + c, mask=ok, other=0.0).to(tl.float32)
        s = xf.to(sum_ptr.dtype.element_ty)
        tl.store(sum_ptr + t * stride_s + c, s, mask=ok)
        xf = s.to(tl.float32)  # normalise the sum rounded to the model dtype, as torch does
    inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    w = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + t * stride_y + c, (xf * inv_rms * w).to(y_ptr.dtype.element_ty), mask=ok)


def rms_norm_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """y, or (y, x + residual) when a residual is given; same as RMSNorm.forward."""
    # x, residual: [tokens, hidden]; weight: [hidden]
    tokens, hidden = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    y = torch.empty_like(x)
    s = torch.empty_like(x) if residual is not None else y  # never written without a residual
    if tokens > 0:
        r = residual if residual is not None else x
        _rms_norm_kernel[(tokens,)](
            x, r, weight, y, s, eps, hidden, x.stride(0), r.stride(0), y.stride(0), s.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(hidden),
        )
    return y if residual is None else (y, s)


@triton.jit
def _rotary_kernel(
    x_ptr, cos_ptr, sin_ptr, heads, stride_xt, stride_xh, stride_ct, stride_st,
    HALF: tl.constexpr, HALF_P2: tl.constexpr, HEADS_P2: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.arange(0, HEADS_P2)
    i = tl.arange(0, HALF_P2)
    i_ok = i < HALF
    mask = (h < heads)[:, None] & i_ok[None, :]  # [HEADS_P2, HALF_P2]
    # cos/sin repeat their first half in the second (emb = cat(freqs, freqs)), but read both to be exact
    cos1 = tl.load(cos_ptr + t * stride_ct + i, mask=i_ok, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + t * stride_ct + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + t * stride_st + i, mask=i_ok, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + t * stride_st + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    p1 = x_ptr + t * stride_xt + h[:, None] * stride_xh + i[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p1 + HALF, mask=mask, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1)
    tl.store(p1, (x1 * cos1[None, :] - x2 * sin1[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p1 + HALF, (x2 * cos2[None, :] + x1 * sin2[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


def rotary_apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x in place and returns it."""
    # x: [tokens, heads, head_dim] (head_dim contiguous); cos, sin: [tokens, 1, head_dim]
    tokens, heads, dim = x.shape
    assert x.stride(2) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1 and dim % 2 == 0
    if tokens > 0:
        half = dim // 2
        _rotary_kernel[(tokens,)](
            x, cos, sin, heads, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
            HALF=half, HALF_P2=triton.next_power_of_2(half), HEADS_P2=triton.next_power_of_2(heads),
        )
    return x
