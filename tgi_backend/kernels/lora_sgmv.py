"""Multi-LoRA for the GPU in the Triton language: segmented gather-matmul (SGMV, as in Punica / LoRAX).

The flat batch is cut into segments: runs of consecutive rows using the same adapter slot (rows without an
adapter form no segment). One kernel does `out[rows] (+)= inp[rows] @ W[slot].T` for every segment at once,
reading the segment's slot from the stacked weights [slots, N, K]; it runs twice: shrink (x @ A.T into a
[tokens, R] buffer) and expand (that @ B.T added into y). Ranks are padded to the stack's R with zeros.

Verified on the CPU under TRITON_INTERPRET=1 (set before triton is imported) against layers/lora.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _sgmv_kernel(
    inp_ptr, w_ptr, out_ptr, seg_start_ptr, seg_len_ptr, seg_slot_ptr,
    N, K,
    stride_im, stride_ws, stride_wn, stride_om,
    ACCUMULATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # out[start + i, n] (+)= sum_k inp[start + i, k] * W[slot, n, k] for i < len, one segment per program row
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    start = tl.load(seg_start_ptr + seg)
    length = tl.load(seg_len_ptr + seg)
    slot = tl.load(seg_slot_ptr + seg)
    offs_i = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows = start + offs_i
    row_ok = offs_i < length
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        a = tl.load(inp_ptr + rows[:, None] * stride_im + ks[None, :],
                    mask=row_ok[:, None] & (ks[None, :] < K), other=0.0)  # [BLOCK_M, BLOCK_K]
        w = tl.load(w_ptr + slot * stride_ws + offs_n[None, :] * stride_wn + ks[:, None],
                    mask=(offs_n[None, :] < N) & (ks[:, None] < K), other=0.0)  # [BLOCK_K, BLOCK_N]
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32))  # fp32: the interpreter's dot is wrong on 16-bit
    c = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
    mask = row_ok[:, None] & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(c, mask=mask, other=0.0).to(tl.float32)
    tl.store(c, acc.to(out_ptr.dtype.element_ty), mask=mask)


def segments_from_slots(token_slots: list[int]) -> tuple[list[int], list[int], list[int]]:
    """Runs of equal slots -> (starts, lengths, slots); rows with slot -1 (no adapter) form no segment."""
    starts: list[int] = []
    lengths: list[int] = []
    slots: list[int] = []
    for i, s in enumerate(token_slots):
        if s < 0:
            continue
        if slots and slots[-1] == s and starts[-1] + lengths[-1] == i:
            lengths[-1] += 1
        else:
            starts.append(i)
            lengths.append(1)
            slots.append(s)
    return starts, lengths, slots


def stack_adapters(
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]], num_slots: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """{slot: (A [r, in], B [out, r])} -> A [slots, R, in], B [slots, out, R], ranks zero-padded to the largest."""
    a0, b0 = next(iter(adapters.values()))
    rank = max(a.shape[0] for a, _ in adapters.values())
    a_stack = torch.zeros(num_slots, rank, a0.shape[1], dtype=a0.dtype, device=a0.device)
    b_stack = torch.zeros(num_slots, b0.shape[0], rank, dtype=b0.dtype, device=b0.device)
    for slot, (a, b) in adapters.items():
        a_stack[slot, : a.shape[0]] = a
        b_stack[slot, :, : b.shape[1]] = b
    return a_stack, b_stack


def _launch(inp: torch.Tensor, w: torch.Tensor, out: torch.Tensor, seg: tuple[torch.Tensor, ...],
            max_len: int, accumulate: bool, block_m: int, block_n: int, block_k: int) -> None:
    n, k = w.shape[1], w.shape[2]
    grid = (seg[0].numel(), triton.cdiv(max_len, block_m), triton.cdiv(n, block_n))
    _sgmv_kernel[grid](
        inp, w, out, *seg, n, k, inp.stride(0), w.stride(0), w.stride(1), out.stride(0),
        ACCUMULATE=accumulate, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )


def lora_sgmv(
    y: torch.Tensor, x: torch.Tensor, a_stack: torch.Tensor, b_stack: torch.Tensor, token_slots: list[int],
    block_m: int = 16, block_n: int = 16, block_k: int = 16,
) -> torch.Tensor:
    """y[t] += (x[t] @ A[slot_t].T) @ B[slot_t].T for every token with a slot; returns y (changed in place)."""
    # y: [tokens, out]; x: [tokens, in]; a_stack: [slots, R, in]; b_stack: [slots, out, R]
    starts, lengths, slots = segments_from_slots(token_slots)
    if not starts:
        return y
    device = x.device
    seg = tuple(torch.tensor(v, dtype=torch.int32, device=device) for v in (starts, lengths, slots))
    x, a_stack, b_stack = x.contiguous(), a_stack.contiguous(), b_stack.contiguous()
    shrunk = torch.zeros(x.shape[0], a_stack.shape[1], dtype=torch.float32, device=device)  # [tokens, R]
    _launch(x, a_stack, shrunk, seg, max(lengths), False, block_m, block_n, block_k)
    _launch(shrunk, b_stack, y, seg, max(lengths), True, block_m, block_n, block_k)
    return y
