"""The mixture-of-experts layer: a router picks each token's top-k experts, only those run.

Experts are stored stacked ([experts, out, in]) so a token's experts are gathered by index, never looped over
per token in Python. The expert computation is chosen per platform from `MOE_IMPLS`: on the CPU, PyTorch
grouped by expert (tokens sorted by expert, one matmul per active expert); on a GPU, the Triton-language
fused kernel of `tgi_backend.kernels.fused_moe` (imported lazily: nothing here needs triton).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Protocol

import torch
from torch import nn

from tgi_backend.layers.activation import get_activation
from tgi_backend.layers.linear import Linear, bf16_upcast_min_rows, linear


# ---- routing ------------------------------------------------------------------------------------------
SCORINGS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "softmax": lambda logits: logits.float().softmax(dim=-1),  # Mixtral, Qwen2-MoE
    "sigmoid": lambda logits: logits.float().sigmoid(),  # DeepSeek-V3 style
}


@dataclass(frozen=True, slots=True)
class RouterSpec:
    """How an architecture turns router logits into (weights, experts)."""

    num_experts: int
    top_k: int
    scoring: str = "softmax"
    renormalize: bool = True  # top-k weights divided by their sum (Mixtral: yes; Qwen2-MoE: norm_topk_prob)

    def __post_init__(self) -> None:
        if self.scoring not in SCORINGS:
            raise ValueError(f"unsupported router scoring {self.scoring!r}; supported: {sorted(SCORINGS)}")
        if not 0 < self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be in [1, {self.num_experts}], got {self.top_k}")


def route(logits: torch.Tensor, spec: RouterSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """weights: [tokens, k] float32, experts: [tokens, k] int64, from logits: [tokens, experts].

    Ties are broken by torch.topk, as in transformers (which expert wins is unspecified; weights are equal).
    """
    scores = SCORINGS[spec.scoring](logits)
    weights, experts = torch.topk(scores, spec.top_k, dim=-1)
    if spec.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


# ---- expert implementations (registry per platform) ----------------------------------------------------
class ExpertsFn(Protocol):
    def __call__(
        self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
        act: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor: ...


@functools.cache
def expert_upcast_rows() -> int:
    """Rows from which an expert's bf16 matmul runs upcast to float32 where bf16 is emulated: ~4 for
    expert-sized weights (measured: [4, 512] x [512, 1408] 212 us emulated, 133 us upcast), below the dense 16."""
    rows = bf16_upcast_min_rows()
    return rows if rows >= 1 << 62 else min(rows, 4)


def grouped_experts(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """PyTorch: (token, expert) pairs sorted by expert, then one gate_up and one down matmul per active expert."""
    # x: [tokens, hidden]; w13: [E, 2 * inter, hidden]; w2: [E, hidden, inter]; weights, experts: [tokens, k]
    tokens, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)  # pairs grouped by expert, token order kept inside a group
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    rows = order // k  # the token of each sorted pair
    xs = x.index_select(0, rows)  # [pairs, hidden]
    out = torch.empty_like(xs)
    upcast = expert_upcast_rows()
    start = 0
    for e, n in enumerate(counts):
        if n:
            h = linear(xs[start : start + n], w13[e], None, upcast)  # [n, 2 * inter]
            gate, up = h.chunk(2, dim=-1)
            out[start : start + n] = linear(act(gate) * up, w2[e], None, upcast)
            start += n
    scale = weights.reshape(-1).index_select(0, order).unsqueeze(1)  # [pairs, 1] float32
    y = torch.zeros(tokens, x.shape[1], dtype=torch.float32)
    y.index_add_(0, rows, out.float() * scale)  # sum of a token's k experts, accumulated in float32
    return y.to(x.dtype)


def _triton_experts(*args, **kwargs) -> torch.Tensor:
    from tgi_backend.kernels.fused_moe import fused_experts  # GPU only: triton is imported here, not before

    return fused_experts(*args, **kwargs)


# device type -> implementation; anything not listed runs the PyTorch one
MOE_IMPLS: dict[str, ExpertsFn] = {"cpu": grouped_experts, "cuda": _triton_experts}


def experts_impl(device: torch.device) -> ExpertsFn:
    return MOE_IMPLS.get(device.type, grouped_experts)


# ---- stacked weights ------------------------------------------------------------------------------------
class StackedWeight(nn.Module):
    """weight: [experts, parts * rows, in]; the loader fills expert e's part p with shard id (e, p)."""

    def __init__(self, num_experts: int, rows: int, in_features: int, parts: int = 1) -> None:
        super().__init__()
        self.rows = rows
        self.weight = nn.Parameter(torch.empty(num_experts, parts * rows, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: tuple[int, int] | None = None) -> None:
        if shard_id is None:  # a checkpoint already stacked: [experts, parts * rows, in]
            if loaded.shape != param.shape:
                raise ValueError(f"stacked experts: expected {tuple(param.shape)}, got {tuple(loaded.shape)}")
            param.data.copy_(loaded)
            return
        expert, part = shard_id
        want = (self.rows, param.shape[2])
        if tuple(loaded.shape) != want:
            raise ValueError(f"expert {expert} part {part}: expected {want}, checkpoint has {tuple(loaded.shape)}")
        param.data[expert].narrow(0, part * self.rows, self.rows).copy_(loaded)


class StackedExperts(nn.Module):
    """All experts' gated MLPs: w13 = [gate; up] of each expert, w2 = its down projection."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str = "silu") -> None:
        super().__init__()
        self.w13 = StackedWeight(num_experts, intermediate, hidden, parts=2)  # [E, 2 * inter, hidden]
        self.w2 = StackedWeight(num_experts, hidden, intermediate)  # [E, hidden, inter]
        self.act = get_activation(act)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        impl = experts_impl(x.device)
        return impl(x, self.w13.weight, self.w2.weight, weights, experts, self.act)


def expert_params_mapping(
    ckpt_prefix: str, num_experts: int, gate: str, up: str, down: str, target: str = "mlp.experts"
) -> dict[str, tuple[str, tuple[int, int]]]:
    """packed_modules_mapping entries for per-expert checkpoint tensors (e.g. `experts.3.w1`).

    The loader renames by substring: `{ckpt_prefix}.{e}.{gate}` -> `{target}.w13` with shard (e, 0), etc.
    Put these entries before the dense ones (`gate_proj` would match an expert's `gate_proj` too).
    """
    mapping: dict[str, tuple[str, tuple[int, int]]] = {}
    for e in range(num_experts):
        mapping[f"{ckpt_prefix}.{e}.{gate}"] = (f"{target}.w13", (e, 0))
        mapping[f"{ckpt_prefix}.{e}.{up}"] = (f"{target}.w13", (e, 1))
        mapping[f"{ckpt_prefix}.{e}.{down}"] = (f"{target}.w2", (e, 0))
    return mapping


# ---- the layer ------------------------------------------------------------------------------------------
class SparseMoE(nn.Module):
    """Router + stacked experts (+ an optional shared expert scaled by sigmoid(shared_expert_gate(x))).

    `expert_counts` holds how many tokens each expert received in the last forward ([experts] int64): the
    model sums it over layers for a load metric.
    """

    def __init__(
        self, hidden: int, intermediate: int, router: RouterSpec, act: str = "silu",
        shared_expert: nn.Module | None = None, shared_expert_gate: bool = False,
    ) -> None:
        super().__init__()
        self.router = router
        self.gate = Linear(hidden, router.num_experts)  # router logits; named as in the checkpoints
        self.experts = StackedExperts(router.num_experts, hidden, intermediate, act)
        self.shared_expert = shared_expert
        self.shared_expert_gate = Linear(hidden, 1) if shared_expert_gate else None
        self._last_experts = torch.zeros(0, dtype=torch.long)  # counted only when asked (off the hot path)

    @property
    def expert_counts(self) -> torch.Tensor:
        return torch.bincount(self._last_experts.reshape(-1), minlength=self.router.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, hidden] -> [tokens, hidden]
        weights, experts = route(self.gate(x), self.router)
        self._last_experts = experts
        y = self.experts(x, weights, experts)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            y = y + shared
        return y


def expert_load(model: nn.Module) -> torch.Tensor:
    """[moe_layers, experts] token counts of the last step (empty for a dense model)."""
    counts = [m.expert_counts for m in model.modules() if isinstance(m, SparseMoE)]
    return torch.stack(counts) if counts else torch.zeros(0, 0, dtype=torch.long)
