from __future__ import annotations

import pytest

from tgi_backend.engine.block_pool import BlockPool, NoFreeBlocksError


def test_allocate_and_free_returns_every_block():
    pool = BlockPool(8)
    a = pool.allocate(3)
    b = pool.allocate(5)
    assert pool.num_free_blocks == 0 and len(set(a + b)) == 8
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(1)
    pool.free(a)
    assert pool.num_free_blocks == 3 and pool.num_used_blocks == 5
    pool.free(b)
    assert pool.num_free_blocks == pool.num_total_blocks == 8


def test_double_free_is_a_bug():
    pool = BlockPool(2)
    blocks = pool.allocate(1)
    pool.free(blocks)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(blocks)


def test_shared_block_is_freed_by_its_last_reference():
    pool = BlockPool(4)
    blocks = pool.allocate(2)
    pool.share(blocks)
    assert pool.refcount(blocks[0]) == 2
    pool.free(blocks)
    assert pool.num_free_blocks == 2
    pool.free(blocks)
    assert pool.num_free_blocks == 4


def test_sharing_a_free_block_is_refused():
    pool = BlockPool(2)
    with pytest.raises(RuntimeError):
        pool.share([0])


def test_empty_pool_is_refused():
    with pytest.raises(ValueError):
        BlockPool(0)
