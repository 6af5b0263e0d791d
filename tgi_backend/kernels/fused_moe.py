"""Fused mixture-of-experts for the GPU in the Triton language (vLLM's fused_moe scheme, simplified).

(token, expert) pairs are sorted by expert and each expert's run is padded to a multiple of BLOCK_M, so every
row block of the grid belongs to one expert: one launch computes every active expert's GEMM, reading that
expert's weights from the stacked [E, N, K] tensor. Two launches: gate_up (rows gathered from the tokens), then
down (rows are the pairs, scaled by their routing weight); the activation runs in PyTorch between them.

Verified on the CPU under TRITON_INTERPRET=1 (set before triton is imported) against the PyTorch grouped path.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl


@triton.jit
def _moe_gemm_kernel(
    a_ptr, b_ptr, c_ptr, weights_ptr, sorted_pairs_ptr, block_expert_ptr,
    num_pairs, N, K, top_k,
    stride_am, stride_be, stride_bn, stride_bk, stride_cm,
    A_ROWS_ARE_TOKENS: tl.constexpr, SCALE_BY_WEIGHT: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # C[pair, n] = sum_k A[row(pair), k] * B[expert, n, k] (* weight[pair]) for the pairs of this row block
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs_ptr + offs_m)  # padding rows hold num_pairs
    valid = pairs < num_pairs
    rows = pairs // top_k if A_ROWS_ARE_TOKENS else pairs
    expert = tl.load(block_expert_ptr + pid_m)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :],
                    mask=valid[:, None] & (ks[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        b = tl.load(b_ptr + expert * stride_be + offs_n[None, :] * stride_bn + ks[:, None] * stride_bk,
                    mask=(offs_n[None, :] < N) & (ks[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        if UPCAST:  # the interpreter's dot is wrong on 16-bit operands
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
    if SCALE_BY_WEIGHT:
        w = tl.load(weights_ptr + pairs, mask=valid, other=0.0)
        acc = acc * w[:, None]
    c = c_ptr + pairs[:, None] * stride_cm + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sorted_pairs: [blocks * block_m] pair ids grouped by expert, each group padded with num_pairs to a
    multiple of block_m; block_expert: [blocks] the expert of each row block. Ints only, no weights."""
    # experts: [tokens, k]
    flat = experts.reshape(-1)
    num_pairs = flat.numel()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m  # [E]
    sorted_pairs = torch.full((int(padded.sum()),), num_pairs, dtype=torch.int32, device=experts.device)
    group_start = torch.cumsum(padded, 0) - padded  # where each expert's run starts
    sorted_start = torch.cumsum(counts, 0) - counts  # where it starts in `order`
    e = flat[order]  # expert of each sorted pair
    dest = group_start[e] + torch.arange(num_pairs, device=experts.device) - sorted_start[e]
    sorted_pairs[dest] = order.to(torch.int32)
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=experts.device), padded // block_m)
    return sorted_pairs, block_expert.to(torch.int32)


def _gemm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, weights: torch.Tensor, sorted_pairs: torch.Tensor,
          block_expert: torch.Tensor, top_k: int, rows_are_tokens: bool, scale: bool, block_m: int) -> None:
    # a: [tokens or pairs, K]; b: [E, N, K]; out: [pairs, N]
    n, k = b.shape[1], b.shape[2]
    block_n = min(64, max(16, triton.next_power_of_2(n)))
    block_k = min(64, max(16, triton.next_power_of_2(k)))
    grid = (block_expert.numel(), triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](
        a, b, out, weights, sorted_pairs, block_expert,
        out.shape[0], n, k, top_k,
        a.stride(0), b.stride(0), b.stride(1), b.stride(2), out.stride(0),
        A_ROWS_ARE_TOKENS=rows_are_tokens, SCALE_BY_WEIGHT=scale, UPCAST=a.device.type == "cpu",
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def fused_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor], block_m: int = 16,
) -> torch.Tensor:
    """Same contract as layers.moe.grouped_experts: sum over each token's k experts of weight * expert(x)."""
    # x: [tokens, hidden]; w13: [E, 2 * inter, hidden]; w2: [E, hidden, inter]; weights, experts: [tokens, k]
    tokens, top_k = experts.shape
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    sorted_pairs, block_expert = align_by_expert(experts, w13.shape[0], block_m)
    flat_weights = weights.reshape(-1).float().contiguous()
    gate_up = torch.empty(tokens * top_k, w13.shape[1], dtype=x.dtype, device=x.device)  # [pairs, 2 * inter]
    _gemm(x, w13, gate_up, flat_weights, sorted_pairs, block_expert, top_k, True, False, block_m)
    gate, up = gate_up.chunk(2, dim=-1)
    inter = (act(gate) * up).contiguous()  # [pairs, inter]
    down = torch.empty(tokens * top_k, w2.shape[1], dtype=torch.float32, device=x.device)  # [pairs, hidden]
    _gemm(inter, w2, down, flat_weights, sorted_pairs, block_expert, top_k, False, True, block_m)
    return down.view(tokens, top_k, -1).sum(dim=1).to(x.dtype)
