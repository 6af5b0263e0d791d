"""Activations by their Hugging Face `hidden_act` names, and the gated (SwiGLU-style) form."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from tgi_backend.engine.forward_context import current_ops

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "swish": F.silu,
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def get_activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unsupported hidden_act {name!r}; supported: {sorted(ACTIVATIONS)}") from None


class GatedActivation(nn.Module):
    """act(gate) * up, where x = cat(gate, up) on the last dimension (the output of gate_up_proj)."""

    def __init__(self, name: str = "silu") -> None:
        super().__init__()
        self.act = get_activation(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, 2 * intermediate] -> [tokens, intermediate]
        ops = current_ops()
        if ops is not None and ops.gated_act is not None and (y := ops.gated_act(self.act, x)) is not None:
            return y
        gate, up = x.chunk(2, dim=-1)
        return self.act(gate) * up
