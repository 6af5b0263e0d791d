"""The Llama family: Llama, Mistral (sliding window) and Qwen2 (qkv bias) differ only in their arguments.

Module names follow the Hugging Face checkpoints (model.layers.N.self_attn...), except the packed
qkv_proj and gate_up_proj, which `packed_modules_mapping` tells the loader about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn

from tgi_backend.kernels.cpu.decoder import DecoderWeights, LayerWeights
from tgi_backend.layers.activation import GatedActivation
from tgi_backend.layers.attention import PagedAttention
from tgi_backend.layers.embedding import LMHead, VocabEmbedding
from tgi_backend.layers.linear import GateUpLinear, Linear, QKVLinear
from tgi_backend.layers.norm import RMSNorm
from tgi_backend.layers.rotary import RotaryEmbedding


@dataclass(frozen=True, slots=True)
class LlamaArgs:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    rope_params: Mapping[str, Any] | None = None
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_windows: tuple[int | None, ...] = ()  # per layer; empty: none anywhere

    def window(self, layer: int) -> int | None:
        return self.sliding_windows[layer] if self.sliding_windows else None


def _rope(hf: Mapping[str, Any]) -> tuple[float, str, dict[str, Any]]:
    """rope_parameters (transformers >= 5) or rope_theta + rope_scaling (older checkpoints)."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return theta, rope_type, params


def llama_args(hf: Mapping[str, Any], **overrides: Any) -> LlamaArgs:
    heads = int(hf["num_attention_heads"])
    theta, rope_type, params = _rope(hf)
    bias = bool(hf.get("attention_bias", False))
    kwargs: dict[str, Any] = dict(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // heads),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_type=rope_type,
        rope_params=params,
        hidden_act=hf.get("hidden_act", "silu"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=bias,
        o_bias=bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
    )
    kwargs.update(overrides)
    return LlamaArgs(**kwargs)


def _windows_from_layer_types(hf: Mapping[str, Any]) -> tuple[int | None, ...] | None:
    types = hf.get("layer_types")
    window = hf.get("sliding_window")
    if not types:
        return None
    return tuple(int(window) if t == "sliding_attention" and window else None for t in types)


def mistral_args(hf: Mapping[str, Any]) -> LlamaArgs:
    windows = _windows_from_layer_types(hf)
    if windows is None:
        w = hf.get("sliding_window")
        windows = (int(w),) * int(hf["num_hidden_layers"]) if w else ()
    return llama_args(hf, sliding_windows=windows)


def qwen2_args(hf: Mapping[str, Any]) -> LlamaArgs:
    # Qwen2: q/k/v carry a bias, o_proj does not; the window applies from layer max_window_layers on.
    windows = _windows_from_layer_types(hf)
    if windows is None:
        w, n = hf.get("sliding_window"), int(hf["num_hidden_layers"])
        use = bool(hf.get("use_sliding_window", False)) and w
        start = int(hf.get("max_window_layers", n))
        windows = tuple(int(w) if use and i >= start else None for i in range(n))
    if not hf.get("use_sliding_window", False):
        windows = ()
    return llama_args(hf, qkv_bias=True, o_bias=False, sliding_windows=windows)


class LlamaAttention(nn.Module):
    def __init__(self, args: LlamaArgs, layer: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        self.qkv_proj = QKVLinear(args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.qkv_bias)
        self.o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size, args.o_bias)
        self.attn = PagedAttention(
            args.num_heads, args.num_kv_heads, args.head_dim, args.head_dim**-0.5, args.window(layer)
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden]; cos, sin: [tokens, 1, head_dim], sin signed (RotaryEmbedding.cos_signed_sin)
        qkv = self.qkv_proj(x)  # [tokens, (heads + 2 * kv_heads) * head_dim]
        return self.o_proj(self.attn.forward_packed(qkv, cos, sin).flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs) -> None:
        super().__init__()
        self.gate_up_proj = GateUpLinear(args.hidden_size, args.intermediate_size, args.mlp_bias)
        self.down_proj = Linear(args.intermediate_size, args.hidden_size, args.mlp_bias)
        self.act = GatedActivation(args.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, args: LlamaArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer)
        self.mlp = self.build_mlp(args, layer)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def build_mlp(self, args: LlamaArgs, layer: int) -> nn.Module:
        """The feed-forward block; MoE architectures override it (per layer: some keep a dense MLP)."""
        return LlamaMLP(args)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, cos, sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class LlamaModel(nn.Module):
    layer_cls: type[nn.Module] = LlamaDecoderLayer  # other families swap the decoder layer

    def __init__(self, args: LlamaArgs, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(self.layer_cls(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(
            args.head_dim, max_positions, args.rope_theta, args.rope_type, args.rope_params
        )

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # input_ids, positions: [tokens] -> hidden: [tokens, hidden]
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb.cos_signed_sin(positions, x.dtype)  # once per step, shared by all layers
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, cos, sin)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(nn.Module):
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    model_cls: type[nn.Module] = LlamaModel  # other families swap the base model

    def __init__(self, args: LlamaArgs, max_positions: int) -> None:
        super().__init__()
        self.args = args
        self.model = self.model_cls(args, max_positions)
        self.lm_head = LMHead(args.vocab_size, args.hidden_size)
        if args.tie_word_embeddings:
            self.lm_head.tie(self.model.embed_tokens)

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> LlamaArgs:
        return llama_args(hf)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def decoder_weights(self) -> DecoderWeights | None:
        """This model's decode step as plain tensors, for the fused CPU decoder (kernels/cpu/decoder.py), once
        loaded, prepacked and bound to its cache; None unless every part is this module's own (families that
        swap layers, MLPs or norms, LoRA or quantized linears run as modules) and each linear kept its plain
        bf16 weight for the few-row kernel."""
        base = self.model
        if type(base) is not LlamaModel or type(base.norm) is not RMSNorm:
            return None
        layers, max_rows = [], 1 << 30
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp
            if (type(layer) is not LlamaDecoderLayer or type(attn) is not LlamaAttention
                    or type(mlp) is not LlamaMLP or type(attn.attn) is not PagedAttention
                    or type(layer.input_layernorm) is not RMSNorm or type(layer.post_attention_layernorm) is not RMSNorm
                    or layer.input_layernorm.eps != base.norm.eps or layer.post_attention_layernorm.eps != base.norm.eps
                    or mlp.act.act is not base.layers[0].mlp.act.act):
                return None
            linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
            kinds = (QKVLinear, Linear, GateUpLinear, Linear)
            if any(type(m) is not kind or m.packed is None or m.packed.plain is None for m, kind in zip(linears, kinds)):
                return None
            max_rows = min([max_rows] + [m.packed.native_rows for m in linears])
            if attn.attn.k_cache is None:
                return None
            layers.append(LayerWeights(
                layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                *(t for m in linears for t in (m.packed.plain, m.bias)),
                attn.attn.k_cache, attn.attn.v_cache, attn.attn.sliding_window,
            ))
        first = base.layers[0].self_attn
        return DecoderWeights(
            layers=layers, final_norm=base.norm.weight, eps=base.norm.eps, heads=first.num_heads,
            kv_heads=first.num_kv_heads, head_dim=first.head_dim, scale=first.attn.scale,
            act=base.layers[0].mlp.act.act, embed=base.embed_tokens, rotary=base.rotary_emb.cos_signed_sin,
            max_rows=max_rows, lm_head=self._lm_head_weight(),
            embed_table=base.embed_tokens.weight if type(base.embed_tokens) is VocabEmbedding else None,
            rope_tables=((base.rotary_emb.cos_cached, base.rotary_emb.signed_sin_cached)
                         if type(base.rotary_emb) is RotaryEmbedding else None),
        )

    def _lm_head_weight(self) -> torch.Tensor | None:
        """The LM head's bf16 weight as loaded (tied: the embedding's), or None (not plain bf16 here)."""
        head = self.lm_head
        if type(head) is not LMHead:
            return None
        weight = head.packed.plain if head.packed is not None else head.weight
        if weight is None or weight.numel() == 0 or weight.dtype is not torch.bfloat16:
            return None
        return weight

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [rows, hidden] -> [rows, vocab]
        return self.lm_head(hidden)


class MistralForCausalLM(LlamaForCausalLM):
    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> LlamaArgs:
        return mistral_args(hf)


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> LlamaArgs:
        return qwen2_args(hf)
