"""Dequantize-matmul for the GPU in the Triton language: y = x @ W with W unpacked from 4/8-bit ints in the tile.

Weight layout (GPTQ's; AWQ converts to it once with `to_kernel_layout`): qweight int32 [K / (32/bits), N]
packed along K, zeros int32 [groups, N] (unpacked), scales [groups, N], g_idx int32 [K] (act-order allowed:
each k row reads its own group). W[k, n] = scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n]).

Verified on the CPU under TRITON_INTERPRET=1 (set before triton is imported) against packing.dequantize.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_backend.layers.quantization.packing import pack_rows


@triton.jit
def _dequant_matmul_kernel(
    a_ptr, qw_ptr, z_ptr, s_ptr, g_ptr, c_ptr,
    M, N, K,
    stride_am, stride_qk, stride_zg, stride_sg, stride_cm,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[m, n] = sum_k A[m, k] * scales[g[k], n] * (q[k, n] - zeros[g[k], n])
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        k_ok = ks < K
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + ks[None, :],
                    mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
        words = tl.load(qw_ptr + (ks // PER)[:, None] * stride_qk + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BLOCK_K, BLOCK_N]
        q = (words >> ((ks % PER) * BITS)[:, None]) & MASK
        g = tl.load(g_ptr + ks, mask=k_ok, other=0)
        z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0)
        s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        w = (q - z).to(tl.float32) * s.to(tl.float32)  # the dequantized tile, never in memory
        acc += tl.dot(a.to(tl.float32), w)  # fp32 operands: the interpreter's dot is wrong on 16-bit ones
    c = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


def to_kernel_layout(
    q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpacked ints (q [K, N], zeros [groups, N]; any format) -> the kernel's (qweight, zeros, scales, g_idx)."""
    return pack_rows(q, bits), zeros.to(torch.int32).contiguous(), scales.contiguous(), g_idx.to(torch.int32)


def dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
    bits: int, block_m: int = 16, block_n: int = 32, block_k: int = 32,
) -> torch.Tensor:
    # x: [M, K] -> [M, N]
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.shape[0] * (32 // bits) != k or g_idx.numel() != k:
        raise ValueError(f"qweight {tuple(qweight.shape)} / g_idx {g_idx.numel()} do not match K={k} at {bits} bits")
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_matmul_kernel[grid](
        x, qweight, zeros, scales, g_idx, out, m, n, k,
        x.stride(0), qweight.stride(0), zeros.stride(0), scales.stride(0), out.stride(0),
        BITS=bits, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out
