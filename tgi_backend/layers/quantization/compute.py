"""Compute formats on the CPU: PyTorch's weight-only int4 and int8 matmul operators, or a dense float weight.

Every format's strategy ends in one of these. int4 (torch._weight_int4pack_mm_for_cpu) takes contiguous
groups of 32..256 input rows with a float scale and zero per group: w = (q - 8) * scale + zero, so an
integer zero point z maps to zero = (8 - z) * scale exactly. Act-order (GPTQ g_idx) groups become
contiguous by permuting the input rows once at load and the activations' columns at each call.
"""
from __future__ import annotations

import torch
from torch import nn

from tgi_backend.layers.linear import scratch, upcast_weight
from tgi_backend.layers.quantization.base import QuantizedLinear
from tgi_backend.layers.quantization.packing import dequantize

INT4_GROUP_SIZES = (32, 64, 128, 256)
# From this many rows the CPU runs int8 as one float32 GEMM on the weight converted into a reused buffer, the
# per-channel scale applied to the output: the int8 op costs a GEMV per row. Ice Lake, small-model shapes: even
# at ~64 rows, 1.4-2.2x faster from 96 (768x512 at 128 rows: 1,322 -> 918 us).
INT8_FLOAT_ROWS = 64
# The int4 op's cost grows linearly with rows too, but unpacking costs more than int8's conversion: the float32
# GEMM pays from more rows. Ice Lake, 6 small/medium shapes: 0.92-1.09x at 256 rows, 1.33-1.48x at 512, 1.7-2x at 2048.
INT4_FLOAT_ROWS = 384
# The CPU int4 op packs output rows in blocks of 64 with AVX-512, of 32 with AVX2 only: byte j of input column k
# holds rows j (low nibble) and j + block / 2 (high). A private layout, so set_int4 finds the block size on each
# weight and keeps the op alone if neither matches.
INT4_BLOCK_ROWS = (64, 32)


def act_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Activations of the int ops: their float32 kernels are 10-60x slower than the bfloat16 ones on CPU
    (measured: 6.3 ms vs 0.21 ms for a 1024x5632 int4 matmul at batch 1), so float32 models use bfloat16 there."""
    return torch.float16 if model_dtype is torch.float16 else torch.bfloat16


def _buffer(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def int4_layout(g_idx: torch.Tensor, n_in: int) -> tuple[int, torch.Tensor | None] | None:
    """(group size, input permutation or None) for the int4 op, or None if the groups cannot fit it."""
    counts = torch.bincount(g_idx.long())
    gs = int(counts[0])
    if gs not in INT4_GROUP_SIZES or not bool(torch.all(counts == gs)) or gs * counts.numel() != n_in:
        return None
    order = torch.argsort(g_idx.long(), stable=True)
    if bool(torch.all(order == torch.arange(n_in))):
        return gs, None
    return gs, order


def set_int4(
    layer: QuantizedLinear, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor
) -> bool:
    """q [in, out] in 0..15, zeros/scales [groups, out] -> the int4 op's format on `layer`; False: unsupported."""
    layout = int4_layout(g_idx, q.shape[0])
    if layout is None or layer.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    gs, perm = layout
    if perm is not None:
        q, g_idx = q[perm], g_idx[perm]
    groups = scales.shape[0]
    order = torch.stack([g_idx[i * gs] for i in range(groups)]).long()  # group of each contiguous block
    s, z = scales.float()[order], zeros.float()[order]
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().to(torch.int32), 8)
    except RuntimeError:
        return False
    layer.int4_weight = _buffer(packed)
    layer.int4_block = _unpack_block(packed, q)  # 0: the op alone, at any row count
    layer.int4_scale_zeros = _buffer(torch.stack([s, (8 - z) * s], dim=-1).to(act_dtype(layer.dtype)).contiguous())
    layer.int4_group_size = gs
    layer.int4_perm = None if perm is None else _buffer(perm)
    layer.weight_format = "int4"
    return True


def int4_unpack(packed: torch.Tensor, n_in: int, out: torch.Tensor, block: int) -> torch.Tensor:
    """The int4 op's packed weight (`block` output rows a block) -> its 0..15 values as float32 in `out`
    [in, out_features] (W^T)."""
    n_out = out.shape[1]
    blocks = packed.view(n_out // block, n_in, block // 2)
    halves = out.view(n_in, n_out // block, 2, block // 2)
    nibbles = scratch(*blocks.shape, dtype=torch.uint8)
    halves[:, :, 0].copy_(torch.bitwise_and(blocks, 15, out=nibbles).transpose(0, 1))
    halves[:, :, 1].copy_(torch.bitwise_right_shift(blocks, 4, out=nibbles).transpose(0, 1))
    return out


def _unpack_block(packed: torch.Tensor, q: torch.Tensor) -> int:
    """The op's output rows a block that unpacks `packed` back to q [in, out] 0..15 (input rows already
    permuted), or 0: no layout we know."""
    n_in, n_out = q.shape
    if packed.numel() * 2 != q.numel():
        return 0
    for block in INT4_BLOCK_ROWS:
        if n_out % block == 0 and torch.equal(int4_unpack(packed, n_in, torch.empty(n_in, n_out), block), q.float()):
            return block
    return 0


def int4_float_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    """x [tokens, in], permuted: one float32 GEMM on the weight dequantized into the reused buffer."""
    n_in = x.shape[1]
    n_out = layer.int4_scale_zeros.shape[1]
    gs = layer.int4_group_size
    w = int4_unpack(layer.int4_weight, n_in, scratch(n_in, n_out), layer.int4_block)
    sz = layer.int4_scale_zeros.float()  # [groups, out, 2]: the op's (q - 8) * scale + zero, as q * scale + zp
    s = sz[..., 0].unsqueeze(1)
    zp = (sz[..., 1] - 8 * sz[..., 0]).unsqueeze(1)
    grouped = w.view(n_in // gs, gs, n_out)
    torch.addcmul(zp, grouped, s, out=grouped)
    return (x.float() @ w).to(layer.dtype)


def int4_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    # x: [tokens, in] -> [tokens, out]
    if layer.int4_perm is not None:
        x = x.index_select(-1, layer.int4_perm)
    if layer.int4_block and x.shape[0] >= INT4_FLOAT_ROWS and x.device.type == "cpu":
        return int4_float_matmul(layer, x)
    x = x.to(layer.int4_scale_zeros.dtype).contiguous()
    y = torch._weight_int4pack_mm_for_cpu(x, layer.int4_weight, layer.int4_group_size, layer.int4_scale_zeros)
    return y.to(layer.dtype)


def set_int8(layer: QuantizedLinear, weight: torch.Tensor) -> None:
    """weight [out, in] float -> symmetric per-output-channel int8 (what EETQ / bitsandbytes int8 store)."""
    w = weight.float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    layer.int8_weight = _buffer(torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
    layer.int8_scale = _buffer(scale.to(act_dtype(layer.dtype)))
    layer.weight_format = "int8"


def int8_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    # x: [tokens, in] -> [tokens, out]
    if x.device.type == "cpu" and x.shape[0] >= INT8_FLOAT_ROWS:
        y = torch.nn.functional.linear(x.float(), upcast_weight(layer.int8_weight))
        return y.mul_(layer.int8_scale.float()).to(layer.dtype)
    y = torch._weight_int8pack_mm(x.to(layer.int8_scale.dtype).contiguous(), layer.int8_weight, layer.int8_scale)
    return y.to(layer.dtype)


def set_dense(layer: QuantizedLinear, weight: torch.Tensor) -> None:
    # weight: [out, in]; dequantize-on-load where no CPU kernel takes the format
    layer.dense_weight = _buffer(weight.to(layer.dtype).contiguous())
    layer.weight_format = "dense"


def dense_matmul(layer: QuantizedLinear, x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.linear(x.to(layer.dtype), layer.dense_weight)


MATMULS = {"int4": int4_matmul, "int8": int8_matmul, "dense": dense_matmul}


class IntGroupLinear(QuantizedLinear):
    """Shared by GPTQ and AWQ: unpacked ints -> int4 op when it fits, else a dequantized float weight."""

    weight_format = ""

    def finish_groups(
        self, q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor, bits: int
    ) -> None:
        if not (bits == 4 and set_int4(self, q, zeros, scales, g_idx)):
            set_dense(self, dequantize(q, zeros, scales, g_idx))

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return MATMULS[self.weight_format](self, x)


def drop(layer: nn.Module, *names: str) -> None:
    """Frees the checkpoint-format tensors once converted."""
    for name in names:
        if hasattr(layer, name):
            delattr(layer, name)
