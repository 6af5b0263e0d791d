"""The scheduler and block manager alone, driven by a fake model that returns fixed tokens."""
from __future__ import annotations

import collections

import pytest
from hypothesis import given, settings, strategies as st

from tgi_backend.config import EngineConfig
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from tgi_backend.engine.scheduler import Scheduler
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tgi_backend.errors import OverloadedError

EOS = 0


def make_scheduler(blocks=64, block_size=4, budget=32, max_concurrent=128, max_num_seqs=256, prefix=True):
    config = EngineConfig(
        model_id="none",
        block_size=block_size,
        max_batch_prefill_tokens=budget,
        max_batch_total_tokens=blocks * block_size,
        max_total_tokens=min(64, blocks * block_size),
        max_concurrent_requests=max_concurrent,
        max_num_seqs=max_num_seqs,
        enable_prefix_caching=prefix,
    ).resolve(4096)
    return Scheduler(config, BlockPool(config.num_blocks))


def make_request(rid, prompt_len, max_new=4, eos=frozenset()):
    return Request(
        request_id=rid,
        token_ids=list(range(1, prompt_len + 1)),
        sampling=SamplingParams(),
        max_new_tokens=max_new,
        eos_token_ids=eos,
    )


def fake_run(out: SchedulerOutput, token=7) -> ModelRunnerOutput:
    sampled = [c for c in out.chunks if c.sample]
    return ModelRunnerOutput([c.request_id for c in sampled], [token] * len(sampled))


def run_to_end(s: Scheduler, max_steps=1000):
    finished = []
    for _ in range(max_steps):
        if not s.has_unfinished_requests():
            break
        out = s.schedule()
        assert out.num_tokens <= s.config.max_batch_prefill_tokens
        done = s.update_from_output(out, fake_run(out))
        s.forget(done)
        finished.extend(done)
    return finished


def test_prompt_then_decode_catch_up():
    s = make_scheduler()
    req = make_request("a", 10, max_new=3)
    s.add_request(req)
    out = s.schedule()
    assert [(c.start_pos, len(c.token_ids), c.sample) for c in out.chunks] == [(0, 10, True)]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()
    assert [(c.start_pos, c.token_ids, c.sample) for c in out.chunks] == [(10, [7], True)]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()
    done = s.update_from_output(out, fake_run(out))
    assert done == [req] and req.finish_reason is FinishReason.LENGTH
    assert req.output_token_ids == [7, 7, 7]
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_long_prompt_is_chunked_while_others_decode():
    s = make_scheduler(budget=8)
    short = make_request("short", 3, max_new=5)
    s.add_request(short)
    s.update_from_output(out := s.schedule(), fake_run(out))
    long = make_request("long", 20, max_new=2)
    s.add_request(long)
    out = s.schedule()
    # the running request decodes one token; the long prompt takes the rest of the budget, unsampled
    assert [(c.request_id, len(c.token_ids), c.sample) for c in out.chunks] == [
        ("short", 1, True),
        ("long", 7, False),
    ]
    s.update_from_output(out, fake_run(out))
    out = s.schedule()
    assert [(c.request_id, c.start_pos, len(c.token_ids)) for c in out.chunks] == [
        ("short", 4, 1),
        ("long", 7, 7),
    ]
    run_to_end(s)
    assert long.output_token_ids == [7, 7]


def test_eos_finishes_unless_ignored():
    s = make_scheduler()
    a = make_request("a", 4, max_new=10, eos=frozenset({7}))
    b = make_request("b", 4, max_new=3, eos=frozenset({7}))
    b.sampling = SamplingParams(ignore_eos=True)
    s.add_request(a)
    s.add_request(b)
    run_to_end(s)
    assert a.finish_reason is FinishReason.EOS_TOKEN and a.num_output_tokens == 1
    assert b.finish_reason is FinishReason.LENGTH and b.num_output_tokens == 3


def test_admission_bound_gives_overloaded():
    s = make_scheduler(max_concurrent=2)
    s.add_request(make_request("a", 3))
    s.add_request(make_request("b", 3))
    with pytest.raises(OverloadedError, match="Model is overloaded"):
        s.add_request(make_request("c", 3))
    s.abort_request("a")
    s.add_request(make_request("c", 3))


def test_abort_frees_blocks_and_is_reported_to_the_runner():
    s = make_scheduler()
    a = make_request("a", 9, max_new=50)
    s.add_request(a)
    s.update_from_output(out := s.schedule(), fake_run(out))
    assert s.kv.pool.num_used_blocks == 3
    s.abort_request("a")
    assert a.finish_reason is FinishReason.CANCELLED and a.block_ids == []
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks
    assert s.schedule().finished_request_ids == ["a"]
    s.abort_request("a")  # twice is harmless


def test_pool_exhaustion_preempts_newest_and_recomputes():
    # 16 blocks of 4 tokens; three requests of 20 prompt tokens growing to 28 cannot all stay resident.
    s = make_scheduler(blocks=16, block_size=4, budget=64)
    reqs = [make_request(f"r{i}", 20, max_new=8) for i in range(3)]
    for r in reqs:
        s.add_request(r)
    finished = run_to_end(s)
    assert s.num_preemptions > 0
    assert sorted(r.request_id for r in finished) == ["r0", "r1", "r2"]
    assert all(r.output_token_ids == [7] * 8 for r in reqs)
    assert s.kv.pool.num_free_blocks == 16


def test_max_num_seqs_bounds_running():
    s = make_scheduler(max_num_seqs=2)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 2))
    out = s.schedule()
    assert len(out.chunks) == 2 and s.num_waiting == 2


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(1, 40), st.integers(1, 12), st.booleans(), st.integers(0, 6)),
        min_size=1,
        max_size=12,
    ),
    st.integers(4, 40),
    st.sampled_from([1, 2, 4, 8]),
    st.booleans(),
)
def test_random_traffic_never_leaks_blocks(specs, budget, block_size, prefix):
    blocks = -(-64 // block_size) + 2
    s = make_scheduler(blocks=blocks, block_size=block_size, budget=budget, prefix=prefix)
    pending = list(enumerate(specs))
    aborts = {}
    for step in range(2000):
        if pending and step % 2 == 0:
            i, (plen, max_new, abort, when) = pending.pop(0)
            plen = min(plen, s.config.max_input_tokens)
            max_new = min(max_new, s.config.max_total_tokens - plen)
            s.add_request(make_request(f"r{i}", plen, max_new=max_new))
            if abort:
                aborts[f"r{i}"] = step + when
        for rid, at in list(aborts.items()):
            if at == step:
                s.abort_request(rid)
                del aborts[rid]
        if not pending and not s.has_unfinished_requests():
            break
        out = s.schedule()
        holders = collections.Counter(b for r in s.running for b in r.block_ids)
        assert len(holders) == s.kv.pool.num_used_blocks
        assert all(s.kv.pool.refcount(b) == n for b, n in holders.items())
        for c in out.chunks:
            r = s.requests[c.request_id]
            assert r.status is RequestStatus.RUNNING
            assert len(r.block_ids) * block_size >= c.start_pos + len(c.token_ids)
        s.forget(s.update_from_output(out, fake_run(out)))
    assert not s.has_unfinished_requests()
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_prefix_hit_reuses_full_blocks_and_leaves_the_last_token():
    s = make_scheduler(block_size=4)
    a = make_request("a", 10, max_new=2)
    s.add_request(a)
    run_to_end(s)
    # 10 prompt tokens + 1 computed output token: blocks [0-3], [4-7] are full and cached
    b = make_request("b", 10, max_new=2)
    s.add_request(b)
    out = s.schedule()
    assert [(c.start_pos, len(c.token_ids)) for c in out.chunks] == [(8, 2)]
    assert b.num_cached_tokens == 8 and s.num_cached_tokens == 8
    s.forget(s.update_from_output(out, fake_run(out)))
    # a full hit still computes the last prompt token
    c = make_request("c", 8, max_new=1)
    s.add_request(c)
    out = s.schedule()
    assert [(ch.start_pos, len(ch.token_ids)) for ch in out.chunks if ch.request_id == "c"] == [(4, 4)]
    run_to_end(s)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_prefix_cache_off_computes_everything():
    s = make_scheduler(block_size=4, prefix=False)
    s.add_request(make_request("a", 10, max_new=2))
    run_to_end(s)
    s.add_request(b := make_request("b", 10, max_new=2))
    out = s.schedule()
    assert [(c.start_pos, len(c.token_ids)) for c in out.chunks] == [(0, 10)] and b.num_cached_tokens == 0


def test_cached_free_blocks_are_evicted_lru_when_the_pool_needs_them():
    s = make_scheduler(blocks=8, block_size=4)
    s.add_request(make_request("a", 16, max_new=1))
    run_to_end(s)
    assert s.kv.pool.num_cached_blocks == 4 and s.kv.pool.num_free_blocks == 8
    other = make_request("b", 24, max_new=1)
    other.token_ids = [100 + t for t in other.token_ids]
    s.add_request(other)
    run_to_end(s)
    assert s.kv.pool.num_evictions >= 2 and s.kv.pool.num_free_blocks == 8


def test_fork_shares_blocks_and_copies_the_partial_one_on_write():
    s = make_scheduler(block_size=4)
    parent = make_request("p", 6, max_new=3)
    s.add_request(parent)
    s.update_from_output(out := s.schedule(), fake_run(out))
    child = make_request("c", 6, max_new=3)
    child.token_ids = list(parent.token_ids)
    child.num_prompt_tokens = parent.num_prompt_tokens
    s.kv.fork(parent, child)
    s.add_request(child)
    assert child.block_ids == parent.block_ids and s.kv.pool.refcount(parent.block_ids[1]) == 2
    shared = parent.block_ids[1]
    out = s.schedule()
    # both write position 6, inside the shared partial block 1: the first writer copies it, the other keeps it
    assert len(out.block_copies) == 1 and out.block_copies[0][0] == shared
    assert child.block_ids[0] == parent.block_ids[0] and child.block_ids[1] != parent.block_ids[1]
    assert shared in (child.block_ids[1], parent.block_ids[1])
    run_to_end(s)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks
