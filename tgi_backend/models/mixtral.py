"""Mixtral: Mistral's attention with a sparse mixture-of-experts MLP (softmax router, top-2, renormalised).

Checkpoints name the block `block_sparse_moe` and the experts' projections w1 (gate), w3 (up), w2 (down);
`packed_modules_mapping` stacks them into `mlp.experts.w13` / `mlp.experts.w2`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import torch
from torch import nn

from tgi_backend.layers.moe import RouterSpec, SparseMoE, expert_load, expert_params_mapping
from tgi_backend.models.llama import LlamaArgs, LlamaDecoderLayer, LlamaForCausalLM, LlamaModel, mistral_args


@dataclasses.dataclass(frozen=True, slots=True)
class MoEArgs(LlamaArgs):
    num_experts: int = 8
    top_k: int = 2
    moe_intermediate_size: int = 0  # per expert
    renormalize: bool = True
    scoring: str = "softmax"
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    dense_layers: tuple[int, ...] = ()  # layers that keep a dense MLP

    @property
    def router(self) -> RouterSpec:
        return RouterSpec(self.num_experts, self.top_k, self.scoring, self.renormalize)


def with_moe(base: LlamaArgs, **moe: Any) -> MoEArgs:
    return MoEArgs(**{f.name: getattr(base, f.name) for f in dataclasses.fields(LlamaArgs)}, **moe)


def mixtral_args(hf: Mapping[str, Any]) -> MoEArgs:
    base = mistral_args(hf)
    return with_moe(
        base, num_experts=int(hf["num_local_experts"]), top_k=int(hf["num_experts_per_tok"]),
        moe_intermediate_size=base.intermediate_size,
    )


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, args: LlamaArgs, layer: int) -> nn.Module:
        assert isinstance(args, MoEArgs)
        return SparseMoE(args.hidden_size, args.moe_intermediate_size, args.router, args.hidden_act)


class MixtralModel(LlamaModel):
    layer_cls = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_cls = MixtralModel

    def __init__(self, args: MoEArgs, max_positions: int) -> None:
        super().__init__(args, max_positions)
        # expert entries first: the dense keys would match an expert's tensors too
        self.packed_modules_mapping = {
            **expert_params_mapping("block_sparse_moe.experts", args.num_experts, "w1", "w3", "w2"),
            **LlamaForCausalLM.packed_modules_mapping,
            "block_sparse_moe.gate": ("mlp.gate", None),
        }

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> MoEArgs:
        return mixtral_args(hf)

    def expert_load(self) -> torch.Tensor:
        """[layers, experts]: tokens routed to each expert in the last step (for a load metric)."""
        return expert_load(self)
