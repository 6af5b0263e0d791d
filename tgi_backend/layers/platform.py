"""Op sets per platform: the few hot ops a decoder layer calls, behind one registry instead of branches.

"torch" is the plain PyTorch path (layers/attention.py, norm.py, rotary.py). "cpu" is that path with decode
attention, prefill attention (AMX), the residual RMSNorm, rotary with the K/V store and the gated activation on
the native kernels of kernels/cpu (built on first use), the one the CPU runs when they build.
"triton" is the Triton-language kernels of kernels/ for CUDA devices. `select_ops(device)` picks one from the
device alone; the triton set is imported lazily, so nothing imports triton unless it is chosen (on the CPU it
never is).

Contracts (same for every set; shapes as in the layers):
- store_kv(k_cache, v_cache, k, v, slot_mapping) -> None
- decode_attention(q, k_cache, v_cache, dec: DecodeBatch, scale, window) -> [rows, heads, dim]
- prepare_prefill(segments, device) -> what prefill_attention takes as `segments`; call it once per step
- prefill_attention(q, k, v, k_cache, v_cache, segments, scale, window, out=None) -> out: every segment's
  rows written, the rest of `out` untouched (q, k, v are the whole flat batch)
- rms_norm_residual(x, weight, eps, residual=None) -> y | (y, x + residual)   (RMSNorm.forward)
- gated_act(act, x) -> act(gate) * up of x = gate | up (GatedActivation.forward), or None where it does not take
  x; None in a set without it
- rotary_apply(x, cos, sin) -> rotated x; the triton op rotates x in place, the torch op returns a new tensor,
  so callers use the result and do not read x afterwards
- rope_store(qkv, cos, sin, heads, kv_heads, k_cache, v_cache, slot_mapping) -> (q, k, v), or None in a set
  without it (PagedAttention.forward_packed then rotates with PyTorch and calls store_kv): q and k of the
  packed qkv [tokens, (heads + 2 kv_heads) * dim] rotated (sin signed, as RotaryEmbedding.apply_rolled), k and
  v stored at slot_mapping; q, k, v may be views of qkv, which callers do not read afterwards
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from tgi_backend.engine.forward_context import PrefillSegment
from tgi_backend.layers import attention
from tgi_backend.layers.norm import rms_norm
from tgi_backend.layers.rotary import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class Ops:
    name: str
    store_kv: Callable[..., None]
    decode_attention: Callable[..., torch.Tensor]
    prepare_prefill: Callable[[Sequence[PrefillSegment], torch.device], Any]
    prefill_attention: Callable[..., torch.Tensor]
    rms_norm_residual: Callable[..., Any]
    rotary_apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    rope_store: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None
    # RMSNorm layers call rms_norm_residual (the cpu set); otherwise they keep their own PyTorch code (torch
    # set), or the triton kernel is checked against it without the model running it (triton set)
    norm_in_layers: bool = False
    # gated_act(act, x) -> act(gate) * up of x = gate | up, or None where the set's kernel does not take x
    gated_act: Callable[..., torch.Tensor | None] | None = None


def torch_rms_norm_residual(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm.forward as a free function."""
    if residual is None:
        return rms_norm(x, weight, eps)
    x = x + residual
    return rms_norm(x, weight, eps), x


def _torch_ops() -> Ops:
    return Ops(
        name="torch",
        store_kv=attention.store_kv,
        decode_attention=attention.decode_attention,
        prepare_prefill=lambda segments, device: list(segments),
        prefill_attention=attention.prefill_segments_attention,
        rms_norm_residual=torch_rms_norm_residual,
        rotary_apply=RotaryEmbedding.apply,
    )


def _cpu_ops() -> Ops:
    from tgi_backend.kernels.cpu import act, library, paged_decode, prefill_attn, rms_norm, rope_store

    if any(library(name) is None for name in ("paged_decode", "rms_norm", "rope_store", "act", "prefill_attn")):
        raise ImportError("the native CPU kernels did not build (see the log)")
    return dataclasses.replace(
        _torch_ops(), name="cpu", decode_attention=paged_decode.decode_attention,
        rms_norm_residual=rms_norm.rms_norm_residual, norm_in_layers=True, rope_store=rope_store.rope_store,
        gated_act=act.gated_act, prepare_prefill=prefill_attn.prepare, prefill_attention=prefill_attn.prefill_attention,
    )


def _triton_ops() -> Ops:
    # imported here: importing the kernels imports triton, which only the GPU set may do
    from tgi_backend.kernels import kv_store, norm_rotary, paged_attention

    return Ops(
        name="triton",
        store_kv=kv_store.store_kv,
        decode_attention=paged_attention.decode_attention,
        prepare_prefill=paged_attention.pack_segments,
        prefill_attention=paged_attention.prefill_attention,
        rms_norm_residual=norm_rotary.rms_norm_residual,
        rotary_apply=norm_rotary.rotary_apply,
    )


OP_SETS: dict[str, Callable[[], Ops]] = {"torch": _torch_ops, "cpu": _cpu_ops, "triton": _triton_ops}


@functools.cache
def get_ops(name: str) -> Ops:
    """The op set registered under `name`; raises ImportError if its backend cannot be imported."""
    if name not in OP_SETS:
        raise ValueError(f"unknown op set {name!r}; known: {sorted(OP_SETS)}")
    return OP_SETS[name]()


def select_ops(device: torch.device, name: str | None = None) -> Ops:
    """`name` if given (tests); else "triton" on a CUDA device when triton imports, "cpu" on the CPU when its
    kernels build, "torch" otherwise."""
    if name is not None:
        return get_ops(name)
    if torch.device(device).type == "cuda":
        try:
            return get_ops("triton")
        except ImportError:  # no triton wheel for this install: the PyTorch path still runs on the GPU
            pass
    elif torch.device(device).type == "cpu":
        try:
            return get_ops("cpu")
        except ImportError:  # no compiler, or TGI_CPU_KERNELS=0
            pass
    return get_ops("torch")
