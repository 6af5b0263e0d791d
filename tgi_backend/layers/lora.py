"""Multi-LoRA: wraps a built model's linears by module path and adds each row's adapter delta.

A batch mixes rows of several adapters and rows with none. Once per step the runner gives each token's
adapter slot (-1: none); `LoraBatch` groups the rows by slot, and each wrapped linear adds, per group,
(x[rows] @ A.T) @ B.T to its output rows: a segmented gather-matmul (PyTorch here; kernels/lora_sgmv.py is
the Triton version for the GPU). Packed linears (qkv_proj, gate_up_proj) hold one block-diagonal pair per
adapter, so q/k/v (gate/up) deltas land in their own output slices with one matmul pair.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tgi_backend.weights.adapters import LoraAdapter


@dataclass(slots=True)
class LoraBatch:
    """Rows of one step grouped by adapter slot; `rows` None means every row of the batch."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)

    @classmethod
    def from_slots(cls, slots: list[int]) -> "LoraBatch":
        used = sorted({s for s in slots if s >= 0})
        if not used:
            return cls()
        if len(used) == 1 and all(s == used[0] for s in slots):
            return cls([(used[0], None)])
        index = torch.tensor(slots, dtype=torch.long)
        return cls([(s, torch.nonzero(index == s).flatten()) for s in used])


class LoraLinear(nn.Module):
    """A linear plus the LoRA deltas of the current batch; same forward signature as the wrapped one."""

    def __init__(self, base: nn.Module, shards: dict[str, tuple[int, int]], batch_ref: "LoraManager") -> None:
        super().__init__()
        self.base = base
        self.shards = shards  # checkpoint module leaf name -> (output offset, size)
        self.adapters: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # slot -> (A [R, in], B [out, R])
        self._manager = [batch_ref]  # a list: not registered as a submodule
        for attr in ("in_features", "out_features", "shard_offsets", "q_size", "kv_size"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.base.split(y)

    def set_adapter(self, slot: int, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> None:
        """parts: shard leaf name -> (A [r, in], B [size, r]); missing shards get no delta."""
        if not parts:
            self.adapters.pop(slot, None)
            return
        total_r = sum(a.shape[0] for a, _ in parts.values())
        a_cat = torch.zeros(total_r, self.base.in_features)
        b_cat = torch.zeros(self.base.out_features, total_r)
        r0 = 0
        for leaf, (a, b) in parts.items():
            offset, size = self.shards[leaf]
            if a.shape[1] != self.base.in_features or b.shape[0] != size:
                raise ValueError(f"LoRA {leaf}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                                 f"in {self.base.in_features}, out {size}")
            a_cat[r0 : r0 + a.shape[0]] = a
            b_cat[offset : offset + size, r0 : r0 + a.shape[0]] = b
            r0 += a.shape[0]
        self.adapters[slot] = (a_cat.to(dtype).contiguous(), b_cat.to(dtype).contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        y = self.base(x)
        groups = self._manager[0].batch.groups
        if not groups or not self.adapters:
            return y
        return lora_delta_(y, x, groups, self.adapters)


def lora_delta_(
    y: torch.Tensor, x: torch.Tensor, groups: list[tuple[int, torch.Tensor | None]],
    adapters: dict[int, tuple[torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """y[rows] += (x[rows] @ A.T) @ B.T for each (slot, rows) group: the CPU segmented gather-matmul."""
    for slot, rows in groups:
        ab = adapters.get(slot)
        if ab is None:
            continue
        a, b = ab
        if rows is None:
            y = y + (x.to(a.dtype) @ a.T @ b.T).to(y.dtype)
        else:
            y = y.index_add(0, rows, (x.index_select(0, rows).to(a.dtype) @ a.T @ b.T).to(y.dtype))
    return y


class LoraManager:
    """Slots of loaded adapters and the wrapped linears; the engine thread only (no locking)."""

    def __init__(self, model: nn.Module, max_loras: int, dtype: torch.dtype) -> None:
        self.max_loras = max_loras
        self.dtype = dtype
        self.batch = LoraBatch()
        self.slots: dict[str, int] = {}  # adapter name -> slot
        self.adapters: dict[str, LoraAdapter] = {}
        self.layers: dict[str, LoraLinear] = {}  # our module path -> wrapper
        self.targets: dict[str, tuple[str, str]] = {}  # checkpoint module path -> (our path, shard leaf)
        self.pinned: set[str] = set()  # preloaded with --lora-adapters: never evicted
        self._lru: dict[str, None] = {}  # adapters loaded from the root, least recently used first
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        packed = getattr(model, "packed_modules_mapping", {})
        members: dict[str, list[tuple[str, Any]]] = {}
        for leaf, (param_key, shard_id) in packed.items():
            members.setdefault(param_key, []).append((leaf, shard_id))
        for path, module in list(model.named_modules()):
            leaf = path.rpartition(".")[2]
            if not hasattr(module, "in_features") or leaf == "lm_head" or isinstance(module, LoraLinear):
                continue
            offsets = getattr(module, "shard_offsets", None) or {}
            shards = {ck: offsets[sid] for ck, sid in members.get(leaf, [])} or {leaf: (0, module.out_features)}
            wrapper = LoraLinear(module, shards, self)
            parent_path = path.rpartition(".")[0]
            setattr(model.get_submodule(parent_path) if parent_path else model, leaf, wrapper)
            self.layers[path] = wrapper
            for ck in shards:
                self.targets[f"{parent_path}.{ck}" if parent_path else ck] = (path, ck)

    # ---- adapters ----------------------------------------------------------------------------------
    def load(self, adapter: LoraAdapter) -> int:
        """Puts the adapter in a free slot (replacing one of the same name); raises if none is free."""
        if adapter.name in self.slots:
            self.unload(adapter.name)
        if len(self.slots) >= self.max_loras:
            raise ValueError(f"{self.max_loras} LoRA adapters are loaded already (max_loras)")
        unknown = [m for m in adapter.weights if m not in self.targets]
        if unknown:
            raise ValueError(f"adapter {adapter.name!r}: modules {unknown[:4]} match no layer of the model")
        slot = min(set(range(self.max_loras)) - set(self.slots.values()))
        by_layer: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for module, ab in adapter.weights.items():
            path, leaf = self.targets[module]
            by_layer.setdefault(path, {})[leaf] = ab
        try:
            for path, parts in by_layer.items():
                self.layers[path].set_adapter(slot, parts, self.dtype)
        except ValueError:
            self._clear(slot)
            raise
        self.slots[adapter.name] = slot
        self.adapters[adapter.name] = adapter
        return slot

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name)
        self.adapters.pop(name, None)
        self._lru.pop(name, None)
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.adapters.pop(slot, None)

    def acquire(self, name: str, root: str | None, in_use: set[str]) -> int:
        """The slot of a loaded adapter, or loads <root>/<name> (evicting the least recently used idle one).

        Raises KeyError for a name that is neither loaded nor an adapter folder under root.
        """
        if name in self.slots:
            self._lru[name] = self._lru.pop(name, None)  # most recently used last
            return self.slots[name]
        from tgi_backend.weights.adapters import adapter_under_root, read_adapter

        path = adapter_under_root(root or "", name)
        if path is None:
            raise KeyError(name)
        if len(self.slots) >= self.max_loras:
            idle = [n for n in self._lru if n not in in_use and n not in self.pinned]
            if not idle:
                raise ValueError(f"all {self.max_loras} LoRA slots are in use; retry later")
            self.unload(idle[0])
        slot = self.load(read_adapter(path, name))
        self._lru[name] = None
        return slot

    def set_batch(self, token_slots: list[int]) -> None:
        self.batch = LoraBatch.from_slots(token_slots)

    def set_chunks(self, chunks: list[Any]) -> None:
        """Per-token slots of a flat batch (chunks in batch order; each has sampling.adapter_id)."""
        slots: list[int] = []
        for c in chunks:
            slots.extend([self.slots.get(c.sampling.adapter_id or "", -1)] * len(c.token_ids))
        self.set_batch(slots)

    def clear_batch(self) -> None:
        self.batch = LoraBatch()


def build_lora_manager(model: nn.Module, config: Any, dtype: torch.dtype) -> LoraManager | None:
    """A manager with --lora-adapters preloaded (pinned), or None when LoRA is off (no adapters, no root)."""
    if not (config.lora_adapters or config.lora_root):
        return None
    from tgi_backend.weights.adapters import parse_lora_adapters, read_adapter
    from tgi_backend.weights.hub import resolve_model_path

    preload = parse_lora_adapters(config.lora_adapters)
    manager = LoraManager(model, max(config.max_loras, len(preload)), dtype)
    for name, source in preload:
        manager.load(read_adapter(resolve_model_path(source, None), name))
        manager.pinned.add(name)
    return manager
