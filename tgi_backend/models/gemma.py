"""Gemma and Gemma-2: the Llama blocks with Gemma's differences.

Gemma: embeddings scaled by sqrt(hidden) (rounded to the model dtype, as the reference does), RMSNorm weights
stored as offsets from 1 (folded in at load time), tanh-GELU, tied LM head. Gemma-2 adds a norm after attention
and around the MLP, attention scaled by query_pre_attn_scalar**-0.5, tanh soft-capping of attention scores and
final logits, and alternating sliding-window / full layers (`layer_types`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from tgi_backend.engine.forward_context import DecodeBatch, PrefillSegment, get_forward_context
from tgi_backend.layers.attention import PagedAttention, gather_blocks, store_kv
from tgi_backend.layers.norm import RMSNorm
from tgi_backend.models.llama import (
    LlamaArgs, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, _windows_from_layer_types, llama_args,
)
from tgi_backend.weights.loader import default_weight_loader


@dataclasses.dataclass(frozen=True, slots=True)
class GemmaArgs(LlamaArgs):
    query_pre_attn_scalar: float | None = None  # None: head_dim
    attn_softcap: float | None = None
    final_softcap: float | None = None


def gemma_args(hf: Mapping[str, Any]) -> GemmaArgs:
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    act = "gelu_pytorch_tanh" if act == "gelu" else act  # legacy configs say gelu and mean the tanh form
    base = llama_args(hf, hidden_act=act, tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)))
    return GemmaArgs(**{f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaArgs)})


def gemma2_args(hf: Mapping[str, Any]) -> GemmaArgs:
    windows = _windows_from_layer_types(hf)
    if windows is None:  # older configs: even layers slide, odd layers see everything
        w = hf.get("sliding_window")
        windows = tuple(int(w) if w and i % 2 == 0 else None for i in range(int(hf["num_hidden_layers"])))
    return dataclasses.replace(
        gemma_args(hf), sliding_windows=windows,
        query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar") or hf["head_dim"]),
        attn_softcap=hf.get("attn_logit_softcapping"), final_softcap=hf.get("final_logit_softcapping"),
    )


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def _load_offset_from_one(param: nn.Parameter, loaded: torch.Tensor) -> None:
    # Gemma's RMSNorm multiplies by (1 + w): fold the 1 in once
    default_weight_loader(param, loaded.float() + 1.0)


class SoftcapPagedAttention(PagedAttention):
    """Paged attention with scores capped by cap * tanh(scores / cap) before the mask (explicit math: SDPA
    has no soft-capping)."""

    fuses_rope_store = False  # its forward attends with the cap

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, window: int | None,
                 cap: float) -> None:
        super().__init__(num_heads, num_kv_heads, head_dim, scale, window)
        self.cap = cap

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> [tokens, heads, dim]
        ctx = get_forward_context()
        store_kv(self.k_cache, self.v_cache, k, v, ctx.slot_mapping)
        out = torch.empty_like(q)
        if ctx.decode is not None:
            n = ctx.decode.num_rows
            out[:n] = self._decode(q[:n], ctx.decode)
        for seg in ctx.prefills:
            a, b = seg.q_start, seg.q_end
            out[a:b] = self._prefill(q[a:b], k[a:b], v[a:b], seg)
        return out

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # q: [n, group, dim]; k: [n, dim, ctx]; v: [n, ctx, dim]; bias: [n or 1, group or 1, ctx] float32
        scores = softcap(torch.bmm(q.float(), k.float()) * self.scale, self.cap) + bias
        return torch.bmm(scores.softmax(dim=-1), v.float())

    def _decode(self, q: torch.Tensor, dec: DecodeBatch) -> torch.Tensor:
        rows, heads, dim = q.shape
        kv = self.num_kv_heads
        table, bias = dec.view(self.sliding_window, kv)  # bias: [rows * kv_heads, 1, ctx]
        k = self.k_cache.index_select(0, table.view(-1)).view(rows, -1, kv, dim).permute(0, 2, 3, 1)
        v = self.v_cache.index_select(0, table.view(-1)).view(rows, -1, kv, dim).transpose(1, 2)
        qg = q.reshape(rows * kv, heads // kv, dim)
        out = self._attend(qg, k.reshape(rows * kv, dim, -1), v.reshape(rows * kv, -1, dim), bias)
        return out.view(rows, heads, dim).to(q.dtype)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg: PrefillSegment) -> torch.Tensor:
        # q: [len, heads, dim]; k, v: [len, kv_heads, dim], this chunk's own
        length, heads, dim = q.shape
        kv, group = self.num_kv_heads, heads // self.num_kv_heads
        if seg.block_table is None:  # a first chunk: its own K/V are the whole context
            kh, vh = k.transpose(0, 1), v.transpose(0, 1)  # [kv_heads, ctx, dim]
        else:  # history in the cache: read positions [0, ctx_len) back
            kh = gather_blocks(self.k_cache, seg.block_table)[:, : seg.ctx_len]
            vh = gather_blocks(self.v_cache, seg.block_table)[:, : seg.ctx_len]
        mask = seg.mask(self.sliding_window)
        if mask is None:
            mask = torch.ones(length, seg.ctx_len, dtype=torch.bool).tril(seg.ctx_len - length)
        bias = torch.zeros(mask.shape).masked_fill_(~mask, float("-inf")).repeat(group, 1).unsqueeze(0)
        qg = q.transpose(0, 1).reshape(kv, group * length, dim)  # the heads of a KV group stacked on rows
        out = self._attend(qg, kh.transpose(1, 2), vh, bias)  # [kv_heads, group * len, dim]
        return out.view(heads, length, dim).transpose(0, 1).to(q.dtype)


class GemmaModel(LlamaModel):
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [tokens] -> hidden: [tokens, hidden]
        x = self.embed_tokens(input_ids)
        x = x * torch.tensor(x.shape[-1] ** 0.5, dtype=x.dtype)  # the scale rounded to the dtype first
        cos, sin = self.rotary_emb.cos_signed_sin(positions, x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        x, _ = self.norm(x, residual)
        return x


class Gemma2DecoderLayer(LlamaDecoderLayer):
    def __init__(self, args: GemmaArgs, layer: int) -> None:
        super().__init__(args, layer)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        scale = (args.query_pre_attn_scalar or args.head_dim) ** -0.5
        attn = self.self_attn
        if args.attn_softcap:
            attn.attn = SoftcapPagedAttention(
                args.num_heads, args.num_kv_heads, args.head_dim, scale, args.window(layer), args.attn_softcap
            )
        attn.attn.scale = scale

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.post_attention_layernorm(self.self_attn(x, cos, sin))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma2Model(GemmaModel):
    layer_cls = Gemma2DecoderLayer


class GemmaForCausalLM(LlamaForCausalLM):
    model_cls = GemmaModel

    def __init__(self, args: GemmaArgs, max_positions: int) -> None:
        super().__init__(args, max_positions)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                module.weight.weight_loader = _load_offset_from_one

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> GemmaArgs:
        return gemma_args(hf)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden] -> [rows, vocab] float32
        logits = self.lm_head(hidden)
        cap = self.args.final_softcap
        return softcap(logits, cap) if cap else logits


class Gemma2ForCausalLM(GemmaForCausalLM):
    model_cls = Gemma2Model

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> GemmaArgs:
        return gemma2_args(hf)
