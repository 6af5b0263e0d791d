"""The pool of KV-cache blocks: a free list and reference counts. Ints only, no torch.

Contract: a block is either free (refcount 0, in the free list) or in use (refcount >= 1). `allocate` takes
blocks from the free list and sets their refcount to 1; `free` drops one reference per block and returns the
block to the free list when none is left. Freeing a free block is a bug and raises. Not thread-safe: one engine
thread owns it.
"""
from __future__ import annotations

from collections import deque


class NoFreeBlocksError(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self._num_blocks = num_blocks
        self._free: deque[int] = deque(range(num_blocks))
        self._refcounts = [0] * num_blocks

    @property
    def num_total_blocks(self) -> int:
        return self._num_blocks

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free)

    def refcount(self, block_id: int) -> int:
        return self._refcounts[block_id]

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise NoFreeBlocksError(f"asked for {n} blocks, {len(self._free)} free")
        blocks = [self._free.popleft() for _ in range(n)]
        for b in blocks:
            self._refcounts[b] = 1
        return blocks

    def share(self, block_ids: list[int]) -> None:
        """Adds a reference to blocks already in use (a second request reading them)."""
        for b in block_ids:
            if self._refcounts[b] < 1:
                raise RuntimeError(f"block {b} is free and cannot be shared")
            self._refcounts[b] += 1

    def free(self, block_ids: list[int]) -> None:
        # Reversed so that the blocks of a request's tail are reused last (they are likelier to be warm).
        for b in reversed(block_ids):
            count = self._refcounts[b]
            if count < 1:
                raise RuntimeError(f"block {b} freed twice")
            self._refcounts[b] = count - 1
            if count == 1:
                self._free.append(b)
