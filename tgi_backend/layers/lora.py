"""Multi-LoRA: wraps a built model's linears by module path and adds each row's adapter delta.

A batch mixes rows of several adapters and rows with none. Once per step the runner gives each token's
adapter slot (-1: none); `LoraBatch` groups the rows by slot, and each wrapped linear adds, per group,
(x[rows] @ A.T) @ B.T to its output rows: a segmented gather-matmul (PyTorch here; kernels/lora_sgmv.py is
the Triton version for the GPU). Packed linears (qkv_proj, gate_up_proj) shrink once with the shards' A
stacked ([r_q + r_k + r_v, in]), then expand each shard's slice of that into its own output columns, so
q/k/v (gate/up) deltas land in their own slices and no zero block is read.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from tgi_backend.weights.adapters import TARGETS, LoraAdapter


@dataclass(slots=True)
class LoraBatch:
    """Rows of one step grouped by adapter slot; `rows` None means every row of the batch."""

    groups: list[tuple[int, torch.Tensor | None]] = field(default_factory=list)
    token_slots: torch.Tensor | None = None  # [tokens] slot per token (-1: none); set when several adapters mix
    num_tokens: int = 0

    @classmethod
    def from_slots(cls, slots: list[int]) -> "LoraBatch":
        used = sorted({s for s in slots if s >= 0})
        if not used:
            return cls()
        if len(used) == 1 and all(s == used[0] for s in slots):
            return cls([(used[0], None)], None, len(slots))
        index = torch.tensor(slots, dtype=torch.long)
        return cls([(s, torch.nonzero(index == s).flatten()) for s in used], index, len(slots))


@dataclass(frozen=True, slots=True)
class LoraWeights:
    """One adapter on one linear: A of every shard stacked, and (out offset, size, rank range, B) per shard."""

    a: torch.Tensor  # [r_total, in]
    parts: tuple[tuple[int, int, int, int, torch.Tensor], ...]  # (offset, size, r0, r1, B [size, r1 - r0])

    @classmethod
    def plain(cls, a: torch.Tensor, b: torch.Tensor) -> "LoraWeights":
        return cls(a, ((0, b.shape[0], 0, a.shape[0], b),))


class LoraLinear(nn.Module):
    """A linear plus the LoRA deltas of the current batch; same forward signature as the wrapped one."""

    def __init__(self, base: nn.Module, shards: dict[str, tuple[int, int]], batch_ref: "LoraManager") -> None:
        super().__init__()
        self.base = base
        self.shards = shards  # checkpoint module leaf name -> (output offset, size)
        self.adapters: dict[int, LoraWeights] = {}  # slot -> weights
        self._manager = [batch_ref]  # a list: not registered as a submodule
        self._stacked: tuple[torch.Tensor, torch.Tensor, list] | None = None  # stack_lora(adapters), lazily
        for attr in ("in_features", "out_features", "shard_offsets", "q_size", "kv_size"):
            if hasattr(base, attr):
                setattr(self, attr, getattr(base, attr))

    def split(self, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.base.split(y)

    def set_adapter(self, slot: int, parts: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> None:
        """parts: shard leaf name -> (A [r, in], B [size, r]); missing shards get no delta."""
        if not parts:
            self.drop(slot)
            return
        self._stacked = None
        a_parts, b_parts, r0 = [], [], 0
        for leaf, (a, b) in sorted(parts.items(), key=lambda kv: self.shards[kv[0]][0]):
            offset, size = self.shards[leaf]
            if a.shape[1] != self.base.in_features or b.shape[0] != size or b.shape[1] != a.shape[0]:
                raise ValueError(f"LoRA {leaf}: A {tuple(a.shape)}, B {tuple(b.shape)} do not fit "
                                 f"in {self.base.in_features}, out {size}")
            a_parts.append(a)
            b_parts.append((offset, size, r0, r0 + a.shape[0], b.to(dtype).contiguous()))
            r0 += a.shape[0]
        self.adapters[slot] = LoraWeights(torch.cat(a_parts).to(dtype).contiguous(), tuple(b_parts))

    def drop(self, slot: int) -> None:
        self.adapters.pop(slot, None)
        self._stacked = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [tokens, in] -> [tokens, out]
        y = self.base(x)
        batch = self._manager[0].batch
        if not batch.groups or not self.adapters:
            return y
        # a small mixed batch using every loaded adapter: one masked pass over all of them beats a pass per
        # adapter (dispatch-bound on CPU); otherwise gather each adapter's rows
        if batch.token_slots is not None and batch.num_tokens <= STACKED_MAX_TOKENS and all(
            s in self.adapters for s, _ in batch.groups
        ) and len(batch.groups) == len(self.adapters):
            return self._stacked_delta_(y, x, batch.token_slots)
        return lora_delta_(y, x, batch.groups, self.adapters)

    def _stacked_delta_(self, y: torch.Tensor, x: torch.Tensor, token_slots: torch.Tensor) -> torch.Tensor:
        if self._stacked is None:
            self._stacked = stack_lora(self.adapters)
        col_slot, a_all, parts = self._stacked
        shrunk = x.to(a_all.dtype) @ a_all.T  # [tokens, cols]: every adapter's shrink for every row
        shrunk.mul_(col_slot.unsqueeze(0) == token_slots.unsqueeze(1))  # keep each row's own adapter
        for offset, size, c0, c1, b_all in parts:
            y.narrow(1, offset, size).add_((shrunk[:, c0:c1] @ b_all.T).to(y.dtype))
        return y


def lora_delta_(
    y: torch.Tensor, x: torch.Tensor, groups: list[tuple[int, torch.Tensor | None]],
    adapters: dict[int, LoraWeights],
) -> torch.Tensor:
    """y[rows] += (x[rows] @ A.T) @ B.T for each (slot, rows) group, in place: the CPU segmented gather-matmul."""
    for slot, rows in groups:
        w = adapters.get(slot)
        if w is None:
            continue
        xs = x if rows is None else x.index_select(0, rows)
        shrunk = xs.to(w.a.dtype) @ w.a.T  # [rows, r_total]
        for offset, size, r0, r1, b in w.parts:
            delta = (shrunk[:, r0:r1] @ b.T).to(y.dtype)  # [rows, size]
            out = y.narrow(1, offset, size)
            if rows is None:
                out.add_(delta)
            else:
                out.index_add_(0, rows, delta)
    return y


STACKED_MAX_TOKENS = 64  # past it, computing every adapter for every row costs more than gathering


def stack_lora(adapters: dict[int, LoraWeights]) -> tuple[torch.Tensor, torch.Tensor, list]:
    """All adapters of one linear side by side, shard-major: (slot of each shrunk column [cols], A [cols, in],
    [(out offset, size, c0, c1, B [size, c1 - c0])]) so each shard expands with one matmul for all adapters."""
    shards = sorted({(off, size) for w in adapters.values() for off, size, *_ in w.parts})
    col_slot: list[int] = []
    a_rows, parts, c0 = [], [], 0
    for off, size in shards:
        bs = []
        for slot, w in sorted(adapters.items()):
            for p_off, p_size, r0, r1, b in w.parts:
                if (p_off, p_size) == (off, size):
                    a_rows.append(w.a[r0:r1])
                    bs.append(b)
                    col_slot.extend([slot] * (r1 - r0))
        c1 = c0 + sum(b.shape[1] for b in bs)
        parts.append((off, size, c0, c1, torch.cat(bs, dim=1).contiguous()))
        c0 = c1
    return torch.tensor(col_slot, dtype=torch.long), torch.cat(a_rows).contiguous(), parts


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
        self.versions: dict[str, int] = {}  # name -> load counter at its last load
        self._loads = 0
        self._lru: dict[str, None] = {}  # adapters loaded from the root, least recently used first
        self._wrap(model)

    def _wrap(self, model: nn.Module) -> None:
        packed = getattr(model, "packed_modules_mapping", {})
        members: dict[str, list[tuple[str, Any]]] = {}
        for leaf, (param_key, shard_id) in packed.items():
            members.setdefault(param_key, []).append((leaf, shard_id))
        for path, module in list(model.named_modules()):
            leaf = path.rpartition(".")[2]
            if not hasattr(module, "in_features") or isinstance(module, LoraLinear):
                continue
            if leaf not in TARGETS and leaf not in members:  # only what a PEFT adapter may target
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
        self._loads += 1
        self.versions[adapter.name] = self._loads
        return slot

    def cache_salt(self, name: str) -> str:
        """Prefix-cache salt of a loaded adapter: a reloaded version never reuses the old one's K/V."""
        return f"lora:{name}:{self.versions[name]}"

    def unload(self, name: str) -> None:
        slot = self.slots.pop(name)
        self.adapters.pop(name, None)
        self._lru.pop(name, None)
        self._clear(slot)

    def _clear(self, slot: int) -> None:
        for layer in self.layers.values():
            layer.drop(slot)

    def acquire(self, name: str, root: str | None, in_use: set[str]) -> int:
        """The slot of a loaded adapter, or loads <root>/<name> (evicting the least recently used idle one).

        Raises KeyError for a name that is neither loaded nor an adapter folder under root.
        """
        from tgi_backend.weights.adapters import adapter_under_root, read_adapter

        if name in self.slots:
            if name in self.pinned or name in in_use or not self._changed(name):
                self._lru[name] = self._lru.pop(name, None)  # most recently used last
                return self.slots[name]
            self.unload(name)  # its folder changed or went away: read it again (or forget it)
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

    def _changed(self, name: str) -> bool:
        from tgi_backend.weights.adapters import folder_stamp

        adapter = self.adapters[name]
        return adapter.stamp is not None and folder_stamp(adapter.path) != adapter.stamp

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
