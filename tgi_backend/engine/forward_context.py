"""Per-step attention metadata, built once by the model runner and read by every attention layer.

The flat batch puts the decode rows (one token each) first, then the prefill chunks one after another.
Masks depend on a layer's sliding window, so they are built on first use per window and reused by the
other layers of the step.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

# A decode row group's fixed price in block-rows (one row attending one block): its extra gather, SDPA call and
# index ops cost about what 32 block-rows of attention do on the CPU (~1 us each), measured on the small model.
GROUP_COST_BLOCK_ROWS = 32
MAX_DECODE_GROUPS = 4
SdpaGroup = tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]  # (rows, block_table, mask)


@dataclass(slots=True)
class PrefillSegment:
    """One chunk of several tokens: rows [q_start, q_end) of the batch, at positions start_pos.."""

    q_start: int
    q_end: int
    start_pos: int
    # [num_blocks] block ids covering positions [0, ctx_len); None when start_pos == 0 (K/V come from the batch)
    block_table: torch.Tensor | None
    _masks: dict[int | None, torch.Tensor | None] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return self.q_end - self.q_start

    @property
    def ctx_len(self) -> int:
        return self.start_pos + self.length

    def mask(self, window: int | None) -> torch.Tensor | None:
        """[length, ctx_len] bool, True = attend; None means plain causal (SDPA's is_causal)."""
        if window is not None and window >= self.ctx_len:
            window = None  # the window covers everything: same as no window
        if window not in self._masks:
            if self.start_pos == 0 and window is None:
                self._masks[window] = None
            else:
                device = self.block_table.device if self.block_table is not None else None
                q_pos = torch.arange(self.start_pos, self.ctx_len, device=device).unsqueeze(1)
                k_pos = torch.arange(self.ctx_len, device=device).unsqueeze(0)
                m = k_pos <= q_pos
                if window is not None:
                    m &= k_pos > q_pos - window
                self._masks[window] = m
        return self._masks[window]


@dataclass(slots=True)
class DecodeBatch:
    """Rows [0, num_rows) of the batch, one token each, attended together over padded block tables."""

    num_rows: int
    block_table: torch.Tensor  # [rows, max_blocks], padded with block 0 (masked out)
    positions: torch.Tensor  # [rows]
    block_size: int
    _views: dict[tuple, Any] = field(default_factory=dict)  # per window and form

    @property
    def max_ctx(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def fits(self, num_blocks: int) -> bool:
        """Every position inside its row of the table and every block id below num_blocks (what code that
        indexes memory with them unchecked needs); computed once per step, the layers share the batch."""
        key = ("fits", num_blocks)
        if key not in self._views:
            pos, table = self.positions, self.block_table
            self._views[key] = bool(
                pos.numel() == 0
                or (int(pos.min()) >= 0 and int(pos.max()) < self.max_ctx
                    and int(table.min()) >= 0 and int(table.max()) < num_blocks)
            )
        return self._views[key]

    def _hidden(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table [rows, width], hidden [rows, width * block_size] bool: True where a key is not seen)."""
        key = ("hidden", window)
        if key not in self._views:
            p = self.positions.unsqueeze(1)  # [rows, 1]
            if window is None:
                table, first_pos = self.block_table, torch.zeros_like(p)
            else:
                first_block = (p - window + 1).clamp(min=0) // self.block_size  # [rows, 1]
                width = int((p // self.block_size - first_block).max()) + 1
                cols = (first_block + torch.arange(width, device=p.device)).clamp(max=self.block_table.shape[1] - 1)
                table, first_pos = self.block_table.gather(1, cols), first_block * self.block_size
            k_pos = first_pos + torch.arange(table.shape[1] * self.block_size, device=p.device)  # [rows, ctx]
            hidden = k_pos > p
            if window is not None:
                hidden |= k_pos <= p - window
            self._views[key] = (table, hidden)
        return self._views[key]

    def _window(self, window: int | None) -> int | None:
        return None if window is not None and window >= self.max_ctx else window

    def view(self, window: int | None, kv_heads: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table, bias) for a layer with this window and number of KV heads.

        block_table: [rows, width] blocks to gather. bias: [rows * kv_heads, 1, width * block_size] float32,
        0 where a row at position p sees key j (p - window < j <= p), -inf elsewhere; laid out for baddbmm.
        With a window only the blocks it reaches are gathered: a long context costs it no more than the window.
        """
        window = self._window(window)
        key = ("bias", window, kv_heads)
        if key not in self._views:
            table, hidden = self._hidden(window)
            bias = torch.zeros(hidden.shape, device=hidden.device).masked_fill_(hidden, float("-inf"))
            self._views[key] = (table, bias.repeat_interleave(kv_heads, dim=0).unsqueeze(1))
        return self._views[key]

    def sdpa_mask(self, window: int | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(block_table, mask): mask [rows, 1, 1, width * block_size] in `dtype`, 0 where seen, -inf elsewhere,
        the additive attn_mask of one query per row for scaled_dot_product_attention."""
        window = self._window(window)
        key = ("sdpa", window, dtype)
        if key not in self._views:
            table, hidden = self._hidden(window)
            mask = torch.zeros(hidden.shape, dtype=dtype, device=hidden.device).masked_fill_(hidden, float("-inf"))
            self._views[key] = (table, mask.view(hidden.shape[0], 1, 1, -1))
        return self._views[key]

    def sdpa_groups(self, window: int | None, dtype: torch.dtype) -> list[SdpaGroup]:
        """[(rows, block_table, mask)] as sdpa_mask, with the rows split by context length when that saves
        padding: a 32-token row next to a 640-token one would otherwise attend 640 masked keys. rows: the
        group's row indices; None for the single group of every row in order. Sliding windows stay one group."""
        window = self._window(window)
        key = ("groups", window, dtype)
        if key not in self._views:
            table, mask = self.sdpa_mask(window, dtype)
            groups: list[SdpaGroup] = [(None, table, mask)]
            # on the CPU only: the widths are read back to the host (a sync, and no CUDA graph could hold it)
            if window is None and self.num_rows > 1 and self.positions.device.type == "cpu":
                widths = (self.positions // self.block_size + 1).tolist()
                parts = split_by_width(widths, GROUP_COST_BLOCK_ROWS, MAX_DECODE_GROUPS)
                if len(parts) > 1:
                    groups = []
                    for rows in parts:
                        width = max(widths[i] for i in rows)
                        idx = torch.tensor(rows, device=table.device)
                        groups.append((idx, table.index_select(0, idx)[:, :width],
                                       mask.index_select(0, idx)[..., : width * self.block_size]))
            self._views[key] = groups
        return self._views[key]


def split_by_width(widths: Sequence[int], group_cost: int, max_groups: int) -> list[list[int]]:
    """Row indices grouped by the blocks each needs (ascending), so that sum(rows x widest) + group_cost x
    groups is small: greedy, each round cuts the group where a cut saves most, where the width changes."""
    n = len(widths)
    if n < 2 or sum(widths) * 5 >= 4 * n * max(widths):  # under 20% padding: not worth a second call
        return [list(range(n))]
    order = sorted(range(n), key=widths.__getitem__)
    w = [widths[i] for i in order]
    bounds = [0, n]  # group g is order[bounds[g]:bounds[g + 1]]
    while len(bounds) - 1 < max_groups:
        best_saving, best_cut = 0, None
        for a, b in zip(bounds, bounds[1:]):
            whole = (b - a) * w[b - 1]
            for k in range(a + 1, b):
                if w[k] != w[k - 1]:
                    saving = whole - (k - a) * w[k - 1] - (b - k) * w[b - 1] - group_cost
                    if saving > best_saving:
                        best_saving, best_cut = saving, k
        if best_cut is None:
            break
        bounds = sorted(bounds + [best_cut])
    return [order[a:b] for a, b in zip(bounds, bounds[1:])]


@dataclass(slots=True)
class ForwardContext:
    slot_mapping: torch.Tensor  # [tokens]: where each token's K/V go in the flat cache
    decode: DecodeBatch | None
    prefills: list[PrefillSegment]
    block_size: int
    # the platform's op set (layers.platform.Ops) and its prepared prefill metadata; None: the PyTorch path
    ops: Any = None
    prefill_meta: Any = None


_CONTEXT: list[ForwardContext] = []


def get_forward_context() -> ForwardContext:
    if not _CONTEXT:
        raise RuntimeError("attention layers run only inside `forward_context(...)` (the model runner sets it)")
    return _CONTEXT[-1]


def current_ops() -> Any:
    """The op set of the step being run, or None outside one (a layer called on its own)."""
    return _CONTEXT[-1].ops if _CONTEXT else None


@contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[ForwardContext]:
    _CONTEXT.append(ctx)
    try:
        yield ctx
    finally:
        _CONTEXT.pop()
