"""Phi-3: a Llama whose checkpoint already packs q/k/v into `qkv_proj` and gate/up into `gate_up_proj`.

The packed tensors load whole into the same QKVLinear / GateUpLinear the Llama uses (no renaming). Partial
rotary embeddings (Phi-4-mini) and longrope scaling are not supported yet and fail at load with a clear error.
"""
from __future__ import annotations

from typing import Any, Mapping

from tgi_backend.models.llama import LlamaArgs, LlamaForCausalLM, mistral_args


def phi3_args(hf: Mapping[str, Any]) -> LlamaArgs:
    rope = {**(hf.get("rope_parameters") or {}), **(hf.get("rope_scaling") or {})}
    factor = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    if factor != 1.0:
        raise ValueError(f"Phi-3 with partial_rotary_factor={factor} is not supported (only 1.0)")
    return mistral_args(hf)  # one sliding window for every layer, when set


class Phi3ForCausalLM(LlamaForCausalLM):
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {}  # stored packed already

    @staticmethod
    def args_from_config(hf: Mapping[str, Any]) -> LlamaArgs:
        return phi3_args(hf)
