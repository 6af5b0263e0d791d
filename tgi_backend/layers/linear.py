"""Linear layers whose parameters carry their own `weight_loader` (nano-vllm style).

Packed layers take several checkpoint tensors into one matrix so one matmul replaces several:
q/k/v -> qkv_proj (shard ids "q", "k", "v"), gate/up -> gate_up_proj (shard ids 0, 1).
Parameters are created empty: the loader fills every one of them (and checks it did).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tgi_backend.kernels.cpu import gemv, panel


def _param(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape), requires_grad=False)


@functools.cache
def native_bf16() -> bool:
    """True on CPUs with bfloat16 matmul instructions (AMX or AVX512-BF16)."""
    return "amx_bf16" in cpu_info() or "avx512_bf16" in cpu_info()


@functools.cache
def cpu_info() -> str:
    """/proc/cpuinfo ("" where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return f.read()
    except OSError:
        return ""


@functools.cache
def bf16_support() -> str:
    """"native" (AMX / AVX512-BF16), "emulated" (oneDNN's bf16 on AVX-512 without BF16) or "none"."""
    if native_bf16():
        return "native"
    try:
        emulated = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # oneDNN's bf16 needs AVX-512 (BW, VL, DQ)
    except (RuntimeError, AttributeError):
        emulated = False
    return "emulated" if emulated else "none"


@functools.cache
def bf16_upcast_min_rows() -> int:
    """Rows from which a bfloat16 matmul runs faster upcast to float32 (no native bf16 in this CPU: 3-4x)."""
    return 1 << 62 if native_bf16() else 16


@dataclass(frozen=True, slots=True)
class MatmulPlan:
    """How this CPU runs linears once they are loaded (chosen once, by `matmul_plan`).

    fp32_rows: bf16 weights: from this many input rows a packed float32 copy computes instead (None: never).
    Where bf16 is emulated (AVX-512 without BF16), oneDNN's packed bf16 GEMV is the fastest at one row (1.4-2x
    F.linear in float32), and float32 from two rows on (2-5x the emulated bf16 GEMM at 4-128 rows).
    packed_fp32_rows: float32 weights: from this many rows a packed copy computes (None: never); fewer rows
    keep F.linear on the plain weight (MKL), faster there for small matrices; small float32 model, 32 rows:
    60 -> 39 ms per step, 4 rows: 19.8 -> 19.1 (A/B in one process).
    native_rows: bf16 weights: up to this many rows the native kernel of kernels/cpu/gemv.c computes on the
    plain weight (0: never); emulated bf16 keeps it in place of oneDNN's bf16 layout (1.0-2.2x oneDNN's bf16
    GEMV at one row, 1.3-2.9x its float32 path at 2-8 on Ice Lake), native bf16 beside oneDNN's (`plain_copy`).
    plain_copy: the plain weight is kept in addition to oneDNN's bf16 layout, which serves more rows.
    panel_rows: bf16 weights: from this many rows `kernels/cpu/panel.h` computes on a copy packed in panels (AVX2
    without AVX-512), ahead of the native kernel (None: never).
    """

    fp32_rows: int | None
    packed_fp32_rows: int | None = None
    native_rows: int = 0
    plain_copy: bool = False
    panel_rows: int | None = None


NATIVE_BF16 = MatmulPlan(fp32_rows=None)  # float32 packed measured slower than F.linear with AMX
# the kernel's vdpbf16ps up to 4 rows, AMX (oneDNN) from 5: Emerald Rapids, per matrix at 1 row 1.2-2.4x
# oneDNN (medium's from DRAM at 26-31 GB/s against 20-24, small's from L3 at 27-51 against 12-34), even at 4
NATIVE_BF16_KERNEL = MatmulPlan(fp32_rows=None, native_rows=4, plain_copy=True)
EMULATED_BF16 = MatmulPlan(fp32_rows=2, packed_fp32_rows=4)
EMULATED_BF16_NATIVE = dataclasses.replace(EMULATED_BF16, native_rows=gemv.MAX_ROWS)  # where gemv.c builds; AVX2 only too
# AVX2 without AVX-512: every row on the panels, which cost the bf16 bytes again (the float32 copy twice them);
# the fused step runs on them too, so both give the same bits. Per linear against oneDNN's float32 copy (EPYC
# Milan): 1 row 2.4x, 4096 x 512 -> 2816 1.39x, 512-row shapes 0.99-1.16x; prefill through the runner 1.09-1.11x.
# native_rows stays: it is the rows the fused step's own LM head takes
AVX2_PANELS = dataclasses.replace(EMULATED_BF16, fp32_rows=None, native_rows=gemv.MAX_ROWS, panel_rows=1)
# no room for float32 copies: the native kernel for few rows, the plain weight upcast per call past them
EMULATED_BF16_NO_COPY = MatmulPlan(fp32_rows=None, native_rows=gemv.MAX_ROWS)
# oneDNN's blocking follows a batch-size hint: with 1, a [32000, 512] LM head's bf16 GEMV ran 1.8x slower
# (Ice Lake); small model, batch 1: 11.7 -> 10.3 ms per step with 16; with native bf16, 32 measured as 1
PACK_BATCH_HINT = 16
COPY_MEMORY_FRACTION = 0.25  # float32 copies only while they take at most this fraction of the memory


def matmul_plan(extra_bytes: int) -> MatmulPlan | None:
    """The plan for a model whose float32 copies would take `extra_bytes` (`copy_bytes(weight)` summed);
    None: nothing is packed (the plain path: F.linear, bf16 upcast per call from bf16_upcast_min_rows)."""
    if not torch.backends.mkldnn.is_available():
        return None
    support = bf16_support()
    if support == "native":  # the plain copy for the kernel costs half a float32 copy
        room = extra_bytes // 2 <= COPY_MEMORY_FRACTION * physical_memory()
        return NATIVE_BF16_KERNEL if room and gemv.available() else NATIVE_BF16
    if support == "none" and not gemv.avx2_tiles():
        return None
    if support == "none" and panel.available() and extra_bytes <= COPY_MEMORY_FRACTION * physical_memory():
        return AVX2_PANELS  # counted as the float32 copies were: the fused step's rule (decoder._panels_wanted)
    # AVX2 only (no oneDNN bf16) runs as emulated bf16 does, the kernel's AVX2 tiles for few rows: small model,
    # EPYC Milan, 1 / 8 / 32 / 128 streams in-process 88 / 154 / 378 / 593 -> 125-175 / 510 / 495 / 675 tok/s
    if extra_bytes <= COPY_MEMORY_FRACTION * physical_memory():
        return EMULATED_BF16_NATIVE if gemv.available() else EMULATED_BF16
    if gemv.available():
        return EMULATED_BF16_NO_COPY
    return None


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def copy_bytes(weight: torch.Tensor) -> int:
    """What the emulated-bf16 plan adds for this weight: a float32 copy (bf16: twice its bytes; float32: once);
    the native plan adds half of it (a bf16 copy)."""
    if weight.device.type != "cpu" or weight.dim() != 2 or weight.dtype not in (torch.bfloat16, torch.float32):
        return 0
    return weight.numel() * 4


@dataclass(slots=True)
class PackedWeight:
    """A weight [out, in] as a plan runs it: `small` for inputs of fewer than `large_rows` rows (bf16 in
    oneDNN's blocked layout, or a weight as it is), `large` (float32, blocked) from there; up to `native_rows`
    rows the native kernel (gemv.linear) runs on `plain`, the bf16 weight as loaded (`small` itself, unless
    oneDNN's layout serves the other rows); with no `large`, a plain bf16 `small` is upcast per call from
    `upcast_rows` rows (as the unpacked path).

    Packed, a matmul streams the weight at ~29 GB/s against ~13 for F.linear (which repacks on every call):
    1.6-2.2x faster from 1 to 128 rows with native bf16.
    """

    dtype: torch.dtype  # the inputs it takes (the weight's)
    small: torch.Tensor
    small_packed: bool = True
    large: torch.Tensor | None = None
    large_bias: torch.Tensor | None = None
    large_rows: int = 1 << 62
    native_rows: int = 0
    upcast_rows: int = 1 << 62
    plain: torch.Tensor | None = None
    panel: torch.Tensor | None = None  # the bf16 weight packed in panels (panel.pack), from panel_rows rows
    panel_rows: int = 1 << 62

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
        # x: [tokens, in] in self.dtype -> [tokens, out] in out_dtype
        if x.shape[0] >= self.panel_rows:
            return panel.linear(x, self.panel, self.small.shape[0], bias, out_dtype)
        if x.shape[0] <= self.native_rows:
            return gemv.linear(x.contiguous(), self.plain, bias, out_dtype)
        if x.shape[0] >= self.large_rows:
            y = packed_linear(x.float(), self.large, self.large_bias)
        elif x.shape[0] >= self.upcast_rows:
            y = F.linear(x.float(), upcast_weight(self.small), None if bias is None else bias.float())
        elif self.small_packed:
            y = packed_linear(x, self.small, bias)
        else:
            y = F.linear(x, self.small, bias)
        return y if y.dtype is out_dtype else y.to(out_dtype)  # hot path: no no-op dispatch per layer

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.small, self.large, self.large_bias, self.plain, self.panel) if t is not None]


def prepack(weight: torch.Tensor, plan: MatmulPlan | None, bias: torch.Tensor | None = None) -> PackedWeight | None:
    """weight in oneDNN's layout(s) as `plan` says, or None where the plan leaves it plain."""
    if plan is None or weight.device.type != "cpu" or weight.dim() != 2:
        return None
    w = weight.detach().contiguous()
    kernel = plan.native_rows and w.dtype is torch.bfloat16 and (bias is None or bias.dtype is torch.bfloat16)
    try:
        if kernel and not plan.plain_copy:
            packed = PackedWeight(w.dtype, w, small_packed=False, native_rows=plan.native_rows, plain=w)
            rows = plan.fp32_rows
            if plan.panel_rows is not None:
                packed.panel, packed.panel_rows = panel.pack(w), plan.panel_rows
            elif rows is None:
                packed.upcast_rows = bf16_upcast_min_rows()
        elif w.dtype is torch.bfloat16:
            packed = PackedWeight(w.dtype, torch.ops.mkldnn._reorder_linear_weight(w, PACK_BATCH_HINT))
            if kernel:
                packed.plain, packed.native_rows = w, plan.native_rows
            rows = plan.fp32_rows
        elif w.dtype is torch.float32 and plan.packed_fp32_rows is not None:
            packed = PackedWeight(w.dtype, w, small_packed=False)
            rows = plan.packed_fp32_rows
        else:
            return None
        if rows is not None:
            packed.large = torch.ops.mkldnn._reorder_linear_weight(w.float(), PACK_BATCH_HINT)
            packed.large_bias = None if bias is None else bias.detach().float()
            packed.large_rows = rows
        return packed
    except (RuntimeError, AttributeError):  # a torch without the op: the plain path stays
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: [tokens, in] in the packed weight's dtype -> [tokens, out] in the same
    return torch.ops.mkldnn._linear_pointwise(x.contiguous(), packed, bias, "none", [], "")


_SCRATCH = threading.local()


def scratch(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer of this shape, one per dtype reused per thread: a fresh allocation page-faults on every call."""
    numel = math.prod(shape)
    bufs = _SCRATCH.__dict__.setdefault("bufs", {})
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: inference tensors reject in-place writes outside it
            buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel].view(shape)


def upcast_weight(weight: torch.Tensor) -> torch.Tensor:
    """weight as float32 in the reused buffer (a fresh one costs twice the copy)."""
    return scratch(*weight.shape).copy_(weight)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, upcast_rows: int,
    out_dtype: torch.dtype | None = None, packed: PackedWeight | None = None,
) -> torch.Tensor:
    # x: [tokens, in] -> [tokens, out]; big bf16 batches computed in float32 where bf16 GEMM is emulated
    out_dtype = out_dtype or x.dtype
    if packed is not None and x.dtype is packed.dtype:
        return packed.matmul(x, bias, out_dtype)
    if x.dtype is torch.bfloat16 and x.shape[0] >= upcast_rows:
        b = None if bias is None else bias.float()
        return F.linear(x.float(), upcast_weight(weight), b).to(out_dtype)
    return F.linear(x, weight, bias).to(out_dtype)


class Linear(nn.Module):
    """y = x @ W.T + b; the drop-in point for quantized variants later (same forward signature)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features)
        self.bias = _param(out_features) if bias else None
        self.upcast_rows = bf16_upcast_min_rows()
        self.packed: PackedWeight | None = None  # set by prepack(), after loading

    def prepack(self, plan: MatmulPlan | None) -> None:
        """Once loaded: keeps the weight in oneDNN's layout where that is faster, and frees the plain copy."""
        prepack_weight(self, plan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        return linear(x, self.weight, self.bias, self.upcast_rows, packed=self.packed)


def prepack_weight(module: nn.Module, plan: MatmulPlan | None, keep_plain: bool = False) -> None:
    """Sets module.packed from module.weight; the plain weight is freed unless `keep_plain` (a shared one)."""
    module.packed = prepack(module.weight, plan, getattr(module, "bias", None))
    if module.packed is not None and not keep_plain:
        module.weight = nn.Parameter(torch.empty(0, dtype=module.weight.dtype), requires_grad=False)


def prepack_linears(model: nn.Module, plan: MatmulPlan | None | str = "auto") -> int:
    """Calls prepack(plan) on every layer that has one (plain linears, the LM head); returns how many packed.
    "auto": the plan for this CPU and these weights (matmul_plan)."""
    layers = [m for m in model.modules() if hasattr(m, "prepack") and hasattr(m, "packed")]
    if plan == "auto":
        plan = matmul_plan(sum(copy_bytes(m.weight) for m in layers))
    for module in layers:
        module.prepack(plan)
    return sum(m.packed is not None for m in layers)


class PackedLinear(Linear):
    """Several output blocks stored one after another; shard_offsets maps a shard id to (offset, size)."""

    def __init__(self, in_features: int, shard_sizes: dict[str | int, int], bias: bool = False) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias)
        self.shard_offsets: dict[str | int, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in shard_sizes.items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        for p in self.parameters():
            p.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | int | None = None) -> None:
        if shard_id is None:  # the checkpoint stores it packed already (Phi-3's qkv_proj, gate_up_proj)
            if loaded.shape != param.shape:
                raise ValueError(f"packed: expected {tuple(param.shape)}, checkpoint has {tuple(loaded.shape)}")
            param.data.copy_(loaded)
            return
        offset, size = self.shard_offsets[shard_id]
        if loaded.shape[0] != size:
            raise ValueError(f"shard {shard_id!r}: expected {size} rows, checkpoint has {loaded.shape[0]}")
        param.data.narrow(0, offset, size).copy_(loaded)


class QKVLinear(PackedLinear):
    def __init__(self, hidden: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        q, kv = num_heads * head_dim, num_kv_heads * head_dim
        super().__init__(hidden, {"q": q, "k": kv, "v": kv}, bias)
        self.q_size, self.kv_size = q, kv

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class GateUpLinear(PackedLinear):
    def __init__(self, hidden: int, intermediate: int, bias: bool = False) -> None:
        super().__init__(hidden, {0: intermediate, 1: intermediate}, bias)
