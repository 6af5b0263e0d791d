"""Qwen2-MoE: Qwen2's attention with routed experts plus a shared expert gated by sigmoid(shared_expert_gate).

Top-k weights are renormalised only with `norm_topk_prob`; layers in `mlp_only_layers` (or off the
`decoder_sparse_step` grid) keep a dense MLP of `intermediate_size`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from tgi_backend.layers.moe import SparseMoE, expert_load, expert_params_mapping
from tgi_backend.models.llama import LlamaArgs, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP, LlamaModel, qwen2_args
from tgi_backend.models.mixtral import MoEArgs, with_moe


def qwen2_moe_args(hf: Mapping[str, Any]) -> MoEArgs:
    base = dataclasses.replace(qwen2_args(hf), qkv_bias=bool(hf.get("qkv_bias", True)))
    n, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step", 1))
    only = set(hf.get("mlp_only_layers") or [])
    experts = int(hf["num_experts"])
    dense = tuple(i for i in range(n) if i in only or experts == 0 or (i + 1) % step != 0)
    return with_moe(
        base, num_experts=max(experts, 1), top_k=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=int(hf["moe_intermediate_size"]), renormalize=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(hf.get("shared_expert_intermediate_size") or 0), dense_layers=dense,
    )


class Qwen2MoeDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, args: LlamaArgs, layer: int) -> nn.Module:
        assert isinstance(args, MoEArgs)
        if layer in args.dense_layers:
            return LlamaMLP(args)
        shared = None
        if args.shared_expert_intermediate_size:
            shared = LlamaMLP(dataclasses.replace(args, intermediate_size=args.shared_expert_intermediate_size))
        return SparseMoE(
            args.hidden_size, args.moe_intermediate_size, args.router, args.hidden_act,
            shared_expert=shared, shared_expert_gate=shared is not None,
        )


class Qwen2MoeModel(LlamaModel):
    layer_cls = Qwen2MoeDecoderLayer


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    model_cls = Qwen2MoeModel

    def __init__(self, args: MoEArgs, max_positions: int) -> None:
        super().__init__(args, max_positions)
        # expert entries first: the dense gate_proj/up_proj keys would match an expert's tensors too
        self.packed_modules_mapping = {
            **expert_params_mapping("mlp.experts", args.num_experts, "gate_proj", "up_proj", "down_proj"),
            **LlamaForCausalLM.packed_modules_mapping,
        }

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> MoEArgs:
        return qwen2_moe_args(hf)

    def expert_load(self) -> torch.Tensor:
        """[moe layers, experts]: tokens routed to each expert in the last step (for a load metric)."""
        return expert_load(self)
