"""Writes quantized checkpoints from a float one, as GPTQ / AWQ / fp8 tools lay them out (tests, benchmarks).

`quantize_checkpoint` also writes the dequantized float checkpoint next to it on request: the reference a
quantized model must reproduce up to float rounding.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from tgi_backend.layers.quantization.packing import (
    awq_pack, awq_unpack, dequantize, gptq_pack, gptq_unpack, quantize_groups,
)

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj")


def _gptq(name: str, w: torch.Tensor, opts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    bits, gs = opts.get("bits", 4), opts.get("group_size", 32)
    # q/k/v (gate/up) share their input, hence their act-order permutation: seed it by the input width
    t = gptq_pack(w.float().T, bits, gs, opts.get("sym", True), opts.get("desc_act", False), seed=w.shape[1])
    q, zeros = gptq_unpack(t["qweight"], t["qzeros"], bits)
    return t, dequantize(q, zeros, t["scales"], t["g_idx"])


def _awq(name: str, w: torch.Tensor, opts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    gs = opts.get("group_size", 32)
    t = awq_pack(w.float().T, gs, opts.get("zero_point", True))
    q, zeros = awq_unpack(t["qweight"], t["qzeros"])
    g_idx = torch.arange(w.shape[1], dtype=torch.int32) // gs
    return t, dequantize(q, zeros, t["scales"], g_idx)


def _fp8(name: str, w: torch.Tensor, opts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    from tgi_backend.layers.quantization.fp8 import FP8, FP8_MAX

    w = w.float()
    if opts.get("per_channel", False):
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=1e-12)  # [out, 1]
    else:
        scale = (w.abs().max() / FP8_MAX).clamp(min=1e-12).reshape(())
    q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    out = {"weight": q, "weight_scale": scale, "input_scale": torch.ones(())}
    return out, q.float() * scale


def _int4_rtn(name: str, w: torch.Tensor, opts: dict[str, Any]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Reference only: what `--quantize bitsandbytes-nf4` (our int4) computes from a float weight."""
    q, zeros, scales, g_idx = quantize_groups(w.float().T, 4, opts.get("group_size", 64), sym=False)
    return {}, dequantize(q, zeros, scales, g_idx)


PACKERS: dict[str, Callable[..., tuple[dict[str, torch.Tensor], torch.Tensor]]] = {
    "gptq": _gptq, "awq": _awq, "fp8": _fp8,
}


def quantization_config(fmt: str, opts: dict[str, Any]) -> dict[str, Any]:
    if fmt == "gptq":
        return {"quant_method": "gptq", "bits": opts.get("bits", 4), "group_size": opts.get("group_size", 32),
                "desc_act": opts.get("desc_act", False), "sym": opts.get("sym", True), "checkpoint_format": "gptq"}
    if fmt == "awq":
        return {"quant_method": "awq", "bits": 4, "group_size": opts.get("group_size", 32),
                "zero_point": opts.get("zero_point", True), "version": "gemm"}
    return {"quant_method": "fp8", "activation_scheme": "dynamic"}


def quantize_checkpoint(
    src: str, dst: str, fmt: str, reference_dir: str | None = None, skip: tuple[str, ...] = (), **opts: Any
) -> str:
    """src: a float checkpoint folder (one model.safetensors) -> dst in `fmt`; reference_dir: dequantized copy;
    skip: linears left in float (names containing one of these)."""
    os.makedirs(dst, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    reference: dict[str, torch.Tensor] = {}
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            w = f.get_tensor(name)
            module, _, kind = name.rpartition(".")
            if kind == "weight" and module.rsplit(".", 1)[-1] in LINEARS and not any(s in module for s in skip):
                packed, deq = PACKERS[fmt](name, w, opts)
                tensors.update({f"{module}.{k}": v.contiguous() for k, v in packed.items()})
                reference[name] = deq.to(w.dtype)
            else:
                tensors[name] = w
                reference[name] = w
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    _copy_side_files(src, dst, {"quantization_config": quantization_config(fmt, opts)})
    if reference_dir:
        os.makedirs(reference_dir, exist_ok=True)
        save_file(reference, os.path.join(reference_dir, "model.safetensors"), metadata={"format": "pt"})
        _copy_side_files(src, reference_dir, {})
    return dst


def _copy_side_files(src: str, dst: str, config_update: dict[str, Any]) -> None:
    for name in os.listdir(src):
        if name.endswith(".safetensors") or name == "config.json" or os.path.isdir(os.path.join(src, name)):
            continue
        shutil.copy(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(src, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config.update(config_update)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
