"""Bit packing of the published formats, both ways, written from the formats' descriptions.

Layouts (W^T orientation: rows are input features, columns output features):
- GPTQ (AutoGPTQ / GPTQModel "gptq" v1): qweight int32 [in / (32/b), out], packed along the input dim,
  value j of a word at bits j*b; qzeros int32 [groups, out / (32/b)] packed along the output dim and stored
  minus one (v1; "gptq_v2" stores them as is); scales fp16 [groups, out]; g_idx int32 [in] (group of each
  input row, a permutation of groups with act-order). w = scales[g] * (q - (z + 1)).
- AWQ GEMM (AutoAWQ): qweight int32 [in, out / 8] and qzeros int32 [in / g, out / 8], packed along the
  output dim with the column order [0, 2, 4, 6, 1, 3, 5, 7] inside each word; scales [in / g, out];
  w = scales * (q - z).
The strategies use the unpackers; tests use the packers (and the round-to-nearest quantizer) to build
checkpoints from random weights.
"""
from __future__ import annotations

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column AWQ_ORDER[i] of its 8
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)  # column j sits in nibble AWQ_REVERSE[j]


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    # int64 words holding 32 bits -> int32 with the same bits (as the tools store them)
    return (words & 0xFFFFFFFF).to(torch.int64).where(words < 2**31, words - 2**32).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[n, m] ints in [0, 2^bits) -> int32 [n / (32/bits), m]: consecutive rows share a word (GPTQ qweight)."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(-1, per, values.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    return _to_int32((v << shifts).sum(dim=1))


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [n / (32/bits), m] -> int32 [n, m]."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32) * bits).view(1, per, 1)
    out = (words.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return out.reshape(-1, words.shape[1])


def pack_cols(values: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """[n, m] -> int32 [n, m / (32/bits)]: consecutive columns share a word; `order`: column of each slot."""
    per = 32 // bits
    v = values.to(torch.int64).reshape(values.shape[0], -1, per)
    if order is not None:
        v = v[:, :, list(order)]
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, 1, per)
    return _to_int32((v << shifts).sum(dim=2))


def unpack_cols(words: torch.Tensor, bits: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """int32 [n, m / (32/bits)] -> int32 [n, m]; `order` as given to pack_cols."""
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32) * bits).view(1, 1, per)
    slots = (words.unsqueeze(2) >> shifts) & ((1 << bits) - 1)  # [n, m/per, per] in slot order
    if order is not None:
        slots = slots[:, :, [order.index(c) for c in range(per)]]
    return slots.reshape(words.shape[0], -1)


# ---- round-to-nearest group quantization (tests, and the on-the-fly int4 strategy) -----------------------
def quantize_groups(
    w_t: torch.Tensor, bits: int, group_size: int, sym: bool, g_idx: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """w_t: [in, out] float -> (q [in, out], zeros [groups, out], scales [groups, out], g_idx [in]).

    Dequantized: scales[g_idx] * (q - zeros[g_idx]). g_idx defaults to contiguous groups.
    """
    n_in = w_t.shape[0]
    gs = n_in if group_size <= 0 else group_size
    if g_idx is None:
        g_idx = torch.arange(n_in, dtype=torch.int32) // gs
    groups = int(g_idx.max()) + 1
    maxq = (1 << bits) - 1
    scales = torch.empty(groups, w_t.shape[1])
    zeros = torch.empty(groups, w_t.shape[1])
    for g in range(groups):
        rows = w_t[g_idx == g].float()
        lo, hi = rows.min(0).values.clamp(max=0), rows.max(0).values.clamp(min=0)
        if sym:
            amax = torch.maximum(lo.abs(), hi).clamp(min=1e-8)
            scales[g] = 2 * amax / maxq
            zeros[g] = (maxq + 1) // 2
        else:
            scales[g] = ((hi - lo) / maxq).clamp(min=1e-8)
            zeros[g] = torch.round(-lo / scales[g])
    scales = scales.half().float()  # the tools store fp16 scales: quantize against what is stored
    q = torch.clamp(torch.round(w_t.float() / scales[g_idx] + zeros[g_idx]), 0, maxq).to(torch.int32)
    return q, zeros.to(torch.int32), scales, g_idx


def gptq_pack(
    w_t: torch.Tensor, bits: int, group_size: int, sym: bool = True, act_order: bool = False, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A GPTQ (v1) checkpoint entry for one linear; act_order: groups follow a random permutation of rows."""
    n_in = w_t.shape[0]
    gs = n_in if group_size <= 0 else group_size
    g_idx = None
    if act_order:
        perm = torch.randperm(n_in, generator=torch.Generator().manual_seed(seed))
        g_idx = (torch.argsort(perm) // gs).to(torch.int32)  # row perm[i] is the i-th quantized
    q, zeros, scales, g_idx = quantize_groups(w_t, bits, group_size, sym, g_idx)
    return {
        "qweight": pack_rows(q, bits),
        "qzeros": pack_cols((zeros - 1) & ((1 << bits) - 1), bits),
        "scales": scales.half(),
        "g_idx": g_idx,
    }


def gptq_unpack(
    qweight: torch.Tensor, qzeros: torch.Tensor, bits: int, v2: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (q [in, out], zeros [groups, out]) as ints."""
    zeros = unpack_cols(qzeros, bits)
    if not v2:  # a true zero of 0 was stored as -1 (all ones): masking undoes both
        zeros = (zeros + 1) & ((1 << bits) - 1)
    return unpack_rows(qweight, bits), zeros


def awq_pack(w_t: torch.Tensor, group_size: int, zero_point: bool = True) -> dict[str, torch.Tensor]:
    q, zeros, scales, _ = quantize_groups(w_t, 4, group_size, sym=not zero_point)
    return {"qweight": pack_cols(q, 4, AWQ_ORDER), "qzeros": pack_cols(zeros, 4, AWQ_ORDER), "scales": scales.half()}


def awq_unpack(qweight: torch.Tensor, qzeros: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return unpack_cols(qweight, 4, AWQ_ORDER), unpack_cols(qzeros, 4, AWQ_ORDER)


def dequantize(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """-> W [out, in] float32 from q [in, out] and per-group zeros/scales [groups, out]."""
    g = g_idx.long()
    return ((q.float() - zeros[g].float()) * scales[g].float()).T.contiguous()
