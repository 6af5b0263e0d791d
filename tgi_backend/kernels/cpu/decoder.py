"""A whole decode step of a Llama-family decoder on the native kernel of decoder.c: one call per step.

A model hands over its tensors as `DecoderWeights` (models/llama.py: `decoder_weights()`); the runner sends
decode-only steps of up to `max_rows` rows here and everything else through the model. The C structs are
built once; a step costs the embedding lookup, the rotary table lookup and one call.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch

from tgi_backend.engine.forward_context import DecodeBatch
from tgi_backend.kernels.cpu import library

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
MAX_DIM = 512  # rope.h


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("input_norm", "post_norm", "qkv", "qkv_bias", "o", "o_bias", "gate_up",
                                        "gate_up_bias", "down", "down_bias", "k_cache", "v_cache")] + [("window", _I64)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("layers", "hidden", "heads", "kv_heads", "dim", "intermediate",
                                          "block_size", "num_slots")] + [
        ("eps", _F32), ("scale", _F32), ("final_norm", _P), ("act_table", _P), ("layer", ctypes.POINTER(_Layer))]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I64), ("x", _P), ("cos", _P), ("sin", _P), ("slots", _P), ("table", _P),
                ("positions", _P), ("table_row_stride", _I64), ("max_len", _I64), ("threads", _I64), ("out", _P)]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer's tensors: bf16, linears [out, in] row-major (as loaded), biases None where none."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # gate rows, then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    k_cache: torch.Tensor  # [blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor
    window: int | None


@dataclass(frozen=True, slots=True)
class DecoderWeights:
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    act: Callable[[torch.Tensor], torch.Tensor]  # elementwise, bf16 -> bf16 (the gated MLP's)
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids -> [rows, hidden]
    rotary: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # cos, signed sin
    max_rows: int  # what the linears' native kernel takes (their plan's native_rows)


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def supported(w: DecoderWeights) -> bool:
    """The shapes and dtypes decoder.c takes (paged_decode.h's head dim and group, rope.h's dim)."""
    dim, group = w.head_dim, w.heads // max(w.kv_heads, 1)
    tensors = [w.final_norm] + [t for lw in w.layers for t in (lw.input_norm, lw.post_norm, lw.qkv, lw.qkv_bias,
                                                                 lw.o, lw.o_bias, lw.gate_up, lw.gate_up_bias,
                                                                 lw.down, lw.down_bias, lw.k_cache, lw.v_cache)
                                if t is not None]
    return (
        bool(w.layers) and 1 <= w.max_rows and w.heads % max(w.kv_heads, 1) == 0 and group <= 16
        and dim % 16 == 0 and dim <= min(256, MAX_DIM)
        and all(t.dtype is torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


class FusedDecoder:
    """Runs decode-only steps of up to `max_rows` rows through decoder.c; keeps the tensors it points to."""

    def __init__(self, weights: DecoderWeights, lib: ctypes.CDLL) -> None:
        self.weights, self.lib = weights, lib
        self.max_rows = weights.max_rows
        first = weights.layers[0]
        self.hidden = first.o.shape[0]
        self.num_blocks = first.k_cache.shape[0]
        every_bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        self.act_table = weights.act(every_bf16).contiguous()  # act(x) for every bf16 bit pattern x
        self._layers = (_Layer * len(weights.layers))(*[
            _Layer(_ptr(lw.input_norm), _ptr(lw.post_norm), _ptr(lw.qkv), _ptr(lw.qkv_bias), _ptr(lw.o),
                   _ptr(lw.o_bias), _ptr(lw.gate_up), _ptr(lw.gate_up_bias), _ptr(lw.down), _ptr(lw.down_bias),
                   _ptr(lw.k_cache), _ptr(lw.v_cache), lw.window or 0)
            for lw in weights.layers])
        self._model = _Model(
            len(weights.layers), self.hidden, weights.heads, weights.kv_heads, weights.head_dim,
            first.down.shape[1], first.k_cache.shape[1], first.k_cache.shape[0] * first.k_cache.shape[1],
            weights.eps, weights.scale, _ptr(weights.final_norm), _ptr(self.act_table), self._layers)

    @classmethod
    def build(cls, weights: DecoderWeights | None) -> FusedDecoder | None:
        """None where the kernel did not build or does not take these weights (the model runs as before)."""
        if weights is None or not supported(weights):
            return None
        lib = library("decoder")
        return None if lib is None else cls(weights, lib)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                dec: DecodeBatch) -> torch.Tensor:
        # input_ids, positions, slot_mapping: [rows], one token per row -> hidden [rows, hidden] (final norm applied)
        rows = input_ids.shape[0]
        if not 1 <= rows <= self.max_rows or dec.num_rows != rows:
            raise ValueError(f"the fused decoder takes decode steps of 1..{self.max_rows} rows, got {rows}")
        if not dec.fits(self.num_blocks):  # the C code indexes memory with them unchecked
            raise ValueError("decode batch out of bounds: a position past its block table, or a block id past the cache")
        x = self.weights.embed(input_ids).contiguous()
        cos, sin = self.weights.rotary(positions, x.dtype)
        cos, sin = cos.contiguous(), sin.contiguous()
        slots, table, pos = slot_mapping.contiguous(), dec.block_table.contiguous(), dec.positions.contiguous()
        out = torch.empty(rows, self.hidden, dtype=x.dtype)
        step = _Step(rows, x.data_ptr(), cos.data_ptr(), sin.data_ptr(), slots.data_ptr(), table.data_ptr(),
                     pos.data_ptr(), table.stride(0), dec.max_ctx, torch.get_num_threads(), out.data_ptr())
        status = self.lib.decode_step(ctypes.byref(self._model), ctypes.byref(step))
        if status == -3:
            raise ValueError(f"slot mapping out of bounds: a slot outside the cache's {self._model.num_slots}")
        if status == -2:
            raise MemoryError(f"decode_step: no memory for the activations of {rows} rows")
        if status != 0:
            raise RuntimeError(f"decode_step rejected {rows} rows (head dim {self.weights.head_dim})")
        return out
