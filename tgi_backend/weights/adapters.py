"""PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`, as `peft` saves them.

Supported: rank `r`, `lora_alpha`, `use_rslora` (scaling alpha / sqrt(r) instead of alpha / r), per-module
`rank_pattern` / `alpha_pattern`, target modules among q/k/v/o/gate/up/down projections. The scaling is
folded into B at load, so a delta is (x @ A.T) @ B.T. Not supported (clear error): DoRA, bias training,
`modules_to_save`, embedding or LM-head targets.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "qkv_proj", "gate_up_proj")  # the last two: checkpoints that store them packed (Phi-3)
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(slots=True)
class LoraAdapter:
    name: str
    path: str
    rank: int
    # checkpoint module path (model.layers.0.self_attn.q_proj) -> (A [r, in], B [out, r] times the scaling)
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    stamp: tuple[int, ...] | None = None  # folder_stamp when read: a changed folder is read again


def folder_stamp(path: str) -> tuple[int, ...] | None:
    """mtime and size of the adapter's files; None when the folder is no adapter (any more)."""
    out: list[int] = []
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        try:
            st = os.stat(os.path.join(path, name))
        except FileNotFoundError:
            if name == "adapter_config.json":
                return None
            continue
        out += [st.st_mtime_ns, st.st_size]
    return tuple(out)


def _pattern_value(pattern: dict[str, float], module: str, default: float) -> float:
    # peft matches a pattern key against the end of the module path (a regex in recent versions)
    for key, value in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return value
    return default


def read_adapter(path: str, name: str | None = None) -> LoraAdapter:
    """Reads a PEFT LoRA folder; raises ValueError naming what is missing or unsupported."""
    config_path = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise ValueError(f"no adapter_config.json in {path}")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ValueError(f"adapter {path}: only LoRA adapters are supported, got {config.get('peft_type')}")
    for key, bad in (("use_dora", True), ("modules_to_save", None)):
        if config.get(key) and (bad is None or config.get(key) == bad):
            raise ValueError(f"adapter {path}: `{key}` is not supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"adapter {path}: trained biases are not supported")
    tensors = _adapter_tensors(path)
    r, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    rslora = bool(config.get("use_rslora", False))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(f"adapter {path}: unsupported tensor {key!r}")
        module = m["module"]
        if module.rsplit(".", 1)[-1] not in TARGETS:
            raise ValueError(f"adapter {path}: target module {module!r} is not supported ({', '.join(TARGETS)})")
        pairs.setdefault(module, {})[m["ab"]] = tensor
    adapter = LoraAdapter(name=name or os.path.basename(os.path.normpath(path)), path=path, rank=r,
                          stamp=folder_stamp(path))
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"adapter {path}: {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        rank = int(_pattern_value(config.get("rank_pattern") or {}, module, r))
        a_alpha = _pattern_value(config.get("alpha_pattern") or {}, module, alpha)
        scaling = a_alpha / math.sqrt(rank) if rslora else a_alpha / rank
        a, b = ab["A"].float(), ab["B"].float()
        if a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {path}: {module} has A {tuple(a.shape)} and B {tuple(b.shape)}")
        adapter.weights[module] = (a.contiguous(), (b * scaling).contiguous())
        adapter.rank = max(adapter.rank, a.shape[0])
    if not adapter.weights:
        raise ValueError(f"adapter {path}: no LoRA weights")
    return adapter


def _adapter_tensors(path: str) -> dict[str, torch.Tensor]:
    st = os.path.join(path, "adapter_model.safetensors")
    if os.path.isfile(st):
        return load_file(st)
    binary = os.path.join(path, "adapter_model.bin")
    if os.path.isfile(binary):
        return torch.load(binary, map_location="cpu", weights_only=True)
    raise ValueError(f"no adapter_model.safetensors in {path}")


def parse_lora_adapters(spec: str | None) -> list[tuple[str, str]]:
    """TGI's LORA_ADAPTERS: "id,name=path,..." -> [(name, id or path)]; an item without a name is named by itself."""
    out: list[tuple[str, str]] = []
    for item in (spec or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, _, source = item.partition("=")
        name, source = (name.strip(), source.strip()) if source else (item, item)
        if not name or not source:
            raise ValueError(f"--lora-adapters: bad item {item!r} (want name=path or an adapter id)")
        if name in {n for n, _ in out}:
            raise ValueError(f"--lora-adapters: adapter name {name!r} given twice")
        out.append((name, source))
    return out


def adapter_under_root(root: str, name: str) -> str | None:
    """The folder <root>/<name> if it is a PEFT adapter inside root (no escaping with .. or links), else None."""
    if not root or not name or name.startswith(("/", "\\")) or "\x00" in name:
        return None
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, name))
    if os.path.commonpath([base, path]) != base or path == base:
        return None
    return path if os.path.isfile(os.path.join(path, "adapter_config.json")) else None
