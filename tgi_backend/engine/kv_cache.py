"""Maps requests to blocks of the pool: prefix matching, growing block tables, copy on write. Ints only.

A full block is identified by a hash of its tokens chained with its prefix's hash (blake2b, not Python's
`hash`, so that crafted prompts cannot collide into another request's cache). Blocks are registered in the
pool once their tokens are computed, and found again by later requests with the same prefix.
"""
from __future__ import annotations

import hashlib
from array import array

from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.request import Request


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class KVCacheManager:
    """Owns the block tables of requests. A request holds exactly the blocks covering its computed tokens
    plus the tokens scheduled in the current step."""

    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.pool = pool
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pending_copies: list[tuple[int, int]] = []  # (src, dst) block copies the runner must do first

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- prefix cache ---------------------------------------------------------------------------
    def _caches(self, request: Request) -> bool:
        return self.enable_prefix_caching and request.use_prefix_cache

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's block hashes, computed once and extended as its tokens grow."""
        hashes, bs = request.block_hashes, self.block_size
        while len(hashes) < num_blocks:
            i = len(hashes)
            parent = hashes[-1] if hashes else request.cache_salt.encode()
            hashes.append(block_hash(parent, request.token_ids[i * bs : (i + 1) * bs]))
        return hashes

    def find_cached_blocks(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix; at least the last token is always left to compute."""
        if not self._caches(request) or request.num_computed_tokens:
            return []
        limit = (request.num_tokens - 1) // self.block_size
        found: list[int] = []
        for h in self._hashes(request, limit):
            b = self.pool.lookup(h)
            if b is None:
                break
            found.append(b)
        return found

    def register_computed_blocks(self, request: Request) -> None:
        """Caches the request's blocks that became full of computed tokens."""
        full = min(request.num_computed_tokens // self.block_size, len(request.block_ids))
        if request.num_registered_blocks >= full or not self._caches(request):
            return
        hashes = self._hashes(request, full)
        for i in range(request.num_registered_blocks, full):
            self.pool.cache(request.block_ids[i], hashes[i])
        request.num_registered_blocks = full

    # ---- allocation -----------------------------------------------------------------------------
    def admit(self, request: Request, cached: list[int], num_new_tokens: int) -> bool:
        """Gives a waiting request its cached prefix blocks plus room for num_new_tokens; False if short."""
        reused = len(cached) * self.block_size
        need = self.blocks_for(reused + num_new_tokens) - len(cached)
        cached_free = sum(1 for b in cached if self.pool.refcount(b) == 0)
        if need + cached_free > self.pool.num_free_blocks:
            return False
        self.pool.touch(cached)
        request.block_ids = cached + self.pool.allocate(need)
        request.num_computed_tokens = reused
        request.num_cached_tokens = reused
        request.num_registered_blocks = len(cached)
        return True

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows the block table so that num_new_tokens more tokens fit; False (and no change) if the pool is short."""
        pos, bs, table = request.num_computed_tokens, self.block_size, request.block_ids
        grow = (pos + num_new_tokens + bs - 1) // bs - len(table)  # blocks to add (<= 0: none)
        # only a partly filled block is written again; if another request reads it too, it is copied first
        copy = pos % bs != 0 and pos // bs < len(table) and self.pool.refcount(table[pos // bs]) > 1
        if grow <= 0:
            if not copy:  # most decode steps: the tokens fit the blocks held
                return True
            grow = 0
        if grow + copy > self.pool.num_free_blocks:
            return False
        if copy:
            self._copy_on_write(request)
        if grow:
            request.block_ids.extend(self.pool.allocate(grow))
        return True

    def _copy_on_write(self, request: Request) -> None:
        i = request.num_computed_tokens // self.block_size
        src = request.block_ids[i]
        (dst,) = self.pool.allocate(1)
        self.pending_copies.append((src, dst))
        self.pool.free([src])
        request.block_ids[i] = dst

    def fork(self, parent: Request, child: Request) -> None:
        """The child reads the parent's computed blocks (shared, copied on its first write to a partial one)."""
        self.pool.share(parent.block_ids)
        child.block_ids = list(parent.block_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.num_registered_blocks = parent.num_registered_blocks
        child.block_hashes = list(parent.block_hashes)

    def free(self, request: Request) -> None:
        if request.block_ids:
            self.pool.free(request.block_ids)
            request.block_ids = []
        request.num_registered_blocks = 0
