"""panel.h's bf16 linear for CPUs with AVX2 and no AVX-512: the weights packed once (`pack`), and the op
(`linear`) the linear plan runs at every row count (AVX2_PANELS); the fused decode step reads the same panels."""
from __future__ import annotations

import weakref

import torch

from tgi_backend.kernels.cpu import library

PANEL = 16  # outputs per panel (panel.h)
# weight (address, shape, stride) -> (the weight packed, its version then, the panels): the linear plan and the
# fused decoder pack the same loaded weights, and share one copy (weak references: nothing is kept alive here)
_PACKED: dict[tuple, tuple[weakref.ref, int, weakref.ref]] = {}


def available() -> bool:
    """The build has panel.h's kernel: an AVX2 CPU without AVX-512."""
    lib = library("panel")
    return lib is not None and bool(lib.panel_ready())


def pack(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] bf16 -> panels [ceil(out / 16), in, 8] int32: per input, 16 outputs' bf16 in one 32-byte line
    (lane j: output j in the high half, j + 8 in the low half); outputs past `out` are zeros. The same weight,
    alive and unchanged since, gets the same panels back."""
    lib = library("panel")
    if lib is None or w.dtype is not torch.bfloat16 or w.dim() != 2:
        raise ValueError("panel.pack takes a 2-D bf16 weight (and a built panel library)")
    w = w.contiguous()
    key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()))
    source, version, packed = _PACKED.get(key, (lambda: None, -1, lambda: None))
    alive, panels = source(), packed()
    if alive is not None and panels is not None and alive._version == version:  # the same memory, unchanged
        return panels
    out, inn = w.shape
    panels = torch.empty(-(-out // PANEL), inn, PANEL // 2, dtype=torch.int32)
    lib.panel_pack_bf16(w.data_ptr(), out, inn, panels.data_ptr())
    for stale in [k for k, (src, _, pan) in _PACKED.items() if src() is None or pan() is None]:
        del _PACKED[stale]
    _PACKED[key] = (weakref.ref(w), w._version, weakref.ref(panels))
    return panels


def linear(x: torch.Tensor, panels: torch.Tensor, out_features: int, bias: torch.Tensor | None,
           out_dtype: torch.dtype | None = torch.bfloat16, argmax: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [rows, in] bf16 @ w.T + bias with w in `panels` (pack): float32 sums rounded to bf16 once, returned as bf16
    or as float32 holding the bf16 values (logits); or, out_dtype None, only `argmax` (int64 [rows]) gets each
    row's first maximum of those values, as torch.argmax, and no logits are written (returns None)."""
    lib = library("panel")
    if (lib is None or x.dtype is not torch.bfloat16 or x.dim() != 2 or x.shape[1] != panels.shape[1]
            or out_dtype not in (torch.bfloat16, torch.float32, None)
            or (bias is not None and (bias.dtype is not torch.bfloat16 or bias.shape != (out_features,)))):
        raise ValueError("panel.linear: inputs the kernel does not take")
    if (out_dtype is None) != (argmax is not None) or argmax is not None and not (
            argmax.dtype is torch.int64 and argmax.is_contiguous() and argmax.numel() == x.shape[0]):
        raise ValueError("panel.linear: the argmax (int64 [rows]) comes instead of the logits (out_dtype None)")
    x, b = x.contiguous(), None if bias is None else bias.contiguous()  # held through the call
    y = None if out_dtype is None else torch.empty(x.shape[0], out_features, dtype=out_dtype)
    if x.shape[0] == 0:  # nothing to compute (the C side's malloc(0) may be NULL: "no memory")
        return y
    status = lib.panel_linear(x.data_ptr(), x.shape[0], x.shape[1], panels.data_ptr(), out_features,
                              None if b is None else b.data_ptr(), None if y is None else y.data_ptr(),
                              int(out_dtype is torch.float32), torch.get_num_threads(),
                              None if argmax is None else argmax.data_ptr())
    if status == -2:
        raise MemoryError(f"panel.linear: no memory for {x.shape[0]} rows")
    if status != 0:
        raise RuntimeError("panel.linear: no panel kernel in this build")
    return y
