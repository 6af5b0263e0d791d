"""Loads *.safetensors into a model whose parameters carry their own `weight_loader` (nano-vllm style).

A checkpoint name is renamed through the model's `packed_modules_mapping` (e.g. q_proj -> qkv_proj with shard
"q") and handed to that parameter's loader. Every parameter must be filled exactly once per shard, except a
tied LM head; anything missing or unknown raises, so a wrong checkpoint fails loudly instead of producing noise.
"""
from __future__ import annotations

import glob
import json
import os

import torch
from safetensors import safe_open
from torch import nn

# buffers some checkpoints save that we recompute
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


def safetensors_files(path: str) -> list[str]:
    """The checkpoint's shards: the index's files, else model.safetensors, else every *.safetensors.

    Hub folders may hold other safetensors too (Mistral's consolidated.safetensors, adapters): the index
    or the standard name wins over the glob.
    """
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, n) for n in names]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    return files


def _target(name: str, packed: dict[str, tuple[str, str | int]]) -> tuple[str, str | int | None]:
    for ckpt_key, (param_key, shard_id) in packed.items():
        if ckpt_key in name:
            return name.replace(ckpt_key, param_key), shard_id
    return name, None


def load_weights(model: nn.Module, path: str) -> None:
    packed = getattr(model, "packed_modules_mapping", {})
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[tuple[str, str | int | None]] = set()
    for file in safetensors_files(path):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name.endswith(IGNORED_SUFFIXES):
                    continue
                param_name, shard_id = _target(name, packed)
                if param_name not in params:
                    raise ValueError(f"checkpoint tensor {name!r} matches no parameter of {type(model).__name__}")
                param = params[param_name]
                loader = getattr(param, "weight_loader", None)
                if shard_id is None:
                    (loader or default_weight_loader)(param, f.get_tensor(name))
                else:
                    loader(param, f.get_tensor(name), shard_id)
                loaded.add((param_name, shard_id))
    _check_complete(model, params, loaded, packed)
    for module in model.modules():  # quantized layers convert checkpoint tensors to their compute format
        process = getattr(module, "process_weights_after_loading", None)
        if process is not None:
            process()


def _check_complete(
    model: nn.Module, params: dict[str, nn.Parameter], loaded: set, packed: dict[str, tuple[str, str | int]]
) -> None:
    loaded_ids = {id(params[n]) for n, _ in loaded}
    # a tied parameter (lm_head <- embed_tokens) counts as loaded through its twin
    missing = [
        name for name, param in params.items()
        if id(param) not in loaded_ids and not getattr(param, "optional", False)  # e.g. GPTQ's g_idx
    ]
    shards_of: dict[str, set[str | int]] = {}
    for param_key, shard_id in packed.values():
        shards_of.setdefault(param_key, set()).add(shard_id)
    got: dict[str, set[str | int]] = {}
    for name, shard_id in loaded:
        if shard_id is not None:
            got.setdefault(name, set()).add(shard_id)
    for name, shards in got.items():
        want = next(v for k, v in shards_of.items() if f".{k}." in name)
        if shards != want:
            missing.append(f"{name} shards {sorted(map(str, want - shards))}")
    if missing:
        raise ValueError(f"checkpoint misses {len(missing)} tensors of {type(model).__name__}: {missing[:8]}")
