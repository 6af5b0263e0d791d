"""gated_act (the op-set contract of layers/platform.py: act(gate) * up of x = gate | up) on act.c's kernel: a
table of the activation over every bf16 value, made by the activation itself, so the result is PyTorch's bit
for bit (its activation, rounded, then its bf16 mul)."""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F

from tgi_backend.kernels.cpu import library


# Activations whose PyTorch value depends on the element alone: gelu's vectorized and scalar paths disagree
# (151 of 4,000 bf16 values between one call and per-element calls), so no table can be PyTorch's there.
EXACT = (F.silu, F.relu)


@functools.cache
def act_table(act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """act(x) for every bf16 bit pattern x, and a spare entry: act.h gathers 32-bit words at 2-byte steps."""
    every_bf16 = torch.arange(1 << 16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    return torch.cat((act(every_bf16), torch.zeros(1, dtype=torch.bfloat16))).contiguous()


def gated_act(act: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor | None:
    """x [tokens, 2 * intermediate] -> act(gate) * up [tokens, intermediate]; None where the kernel does not
    take it (another activation, not bf16 on the CPU, not contiguous, no library): the caller's PyTorch code."""
    lib = library("act")
    if (lib is None or act not in EXACT or x.dtype is not torch.bfloat16 or x.device.type != "cpu" or x.dim() != 2
            or x.shape[1] % 2 or not x.is_contiguous()):
        return None
    rows, width = x.shape
    y = torch.empty(rows, width // 2, dtype=torch.bfloat16)
    lib.act_mul(act_table(act).data_ptr(), x.data_ptr(), rows, width // 2, y.data_ptr(), torch.get_num_threads())
    return y
