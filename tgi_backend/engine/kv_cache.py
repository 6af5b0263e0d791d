"""Maps requests to blocks of the pool: grows a request's block table, frees it. Ints only, no torch."""
from __future__ import annotations

from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.request import Request


class KVCacheManager:
    """Owns the block tables of requests. A request holds exactly the blocks covering its computed tokens
    plus the tokens scheduled in the current step."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = self.blocks_for(request.num_computed_tokens + num_new_tokens)
        return max(0, total - len(request.block_ids))

    def can_allocate(self, request: Request, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(request, num_new_tokens) <= self.pool.num_free_blocks

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Grows the block table so that num_new_tokens more tokens fit; False (and no change) if the pool is short."""
        need = self.num_blocks_needed(request, num_new_tokens)
        if need > self.pool.num_free_blocks:
            return False
        if need:
            request.block_ids.extend(self.pool.allocate(need))
        return True

    def free(self, request: Request) -> None:
        if request.block_ids:
            self.pool.free(request.block_ids)
            request.block_ids = []
