"""The pool of KV-cache blocks: reference counts, an LRU free list, and the prefix-cache map. Ints only.

Contract:
- A block is in use (refcount >= 1) or free (refcount 0, in the free list). A free block may still be *cached*:
  it keeps its hash and its K/V until it is taken for another use (eviction), so a later request with the same
  prefix can take it back with `touch`.
- `allocate` takes the least recently freed blocks first and evicts their hashes.
- `free` drops one reference per block; a block with none left joins the free list's tail.
- Freeing a free block, or sharing one, is a bug and raises.
Not thread-safe: one engine thread owns it.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self._num_blocks = num_blocks
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._refcounts = [0] * num_blocks
        self._hash_of: dict[int, Hashable] = {}  # block -> hash, for cached blocks
        self._block_of: dict[Hashable, int] = {}  # hash -> block
        self.num_evictions = 0

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be allocated now, cached ones included."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._block_of)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = []
        for _ in range(n):
            b, _ = self._free.popitem(last=False)
            self._evict(b)
            self._refcounts[b] = 1
            blocks.append(b)
        return blocks

    def share(self, block_ids: list[int]) -> None:
        """Adds a reference to blocks already in use (a second request reading them)."""
        for b in block_ids:
            if self._refcounts[b] < 1:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self._refcounts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        # Reversed: a request's tail blocks are evicted before its head, which other prompts share more often.
        for b in reversed(block_ids):
            count = self._refcounts[b]
            if count < 1:
                raise RuntimeError(f"block {b} freed twice")
            self._refcounts[b] = count - 1
            if count == 1:
                self._free[b] = None

    # ---- prefix cache ---------------------------------------------------------------------------
    def lookup(self, block_hash: Hashable) -> int | None:
        return self._block_of.get(block_hash)

    def touch(self, block_ids: list[int]) -> None:
        """Takes a reference to cached blocks found by `lookup`, free or in use."""
        for b in block_ids:
            if self._refcounts[b] == 0:
                del self._free[b]
            self._refcounts[b] += 1

    def cache(self, block_id: int, block_hash: Hashable) -> None:
        """Registers a full block under its hash; a hash already cached keeps its first block."""
        if block_hash in self._block_of or block_id in self._hash_of:
            return
        self._block_of[block_hash] = block_id
        self._hash_of[block_id] = block_hash

    def is_cached(self, block_id: int) -> bool:
        return block_id in self._hash_of

    def _evict(self, block_id: int) -> None:
        h = self._hash_of.pop(block_id, None)
        if h is not None:
            del self._block_of[h]
            self.num_evictions += 1

    def reset_prefix_cache(self) -> None:
        self._hash_of.clear()
        self._block_of.clear()
