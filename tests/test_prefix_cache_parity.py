"""Greedy outputs do not depend on the scheduler: prefix caching on or off, chunked prefill or not, a tiny KV
pool that forces preemptions. Prompts share long prefixes so that the cache is actually hit."""
from __future__ import annotations

import dataclasses
import random

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.engine.request import SamplingParams

NEW_TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(7)
    shared = [rng.randrange(3, 500) for _ in range(70)]
    longer = shared + [rng.randrange(3, 500) for _ in range(30)]
    tails = [[rng.randrange(3, 500) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    return [shared + tails[0], longer + tails[1], shared + tails[2], longer + tails[3], shared[:40] + tails[4],
            longer + tails[5], list(longer)]  # the last one: a full hit, whose last token is still computed


def _engine(model_dir: str, **kw):
    from tgi_backend.engine.engine import LLMEngine

    base = dict(model_id=model_dir, dtype="float32", max_total_tokens=256, max_batch_total_tokens=4096,
                max_batch_prefill_tokens=4096, block_size=8)
    return LLMEngine(EngineConfig(**{**base, **kw}))


def _run(engine, prompts: list[list[int]]) -> list[list[int]]:
    """The first prompt alone (it fills the cache), then the others together, then the first again."""
    first = engine.generate(prompts[:1], GREEDY)
    rest = engine.generate(prompts[1:], GREEDY)
    again = engine.generate(prompts[:1], GREEDY)
    assert again == first
    stats = engine.stats()
    assert (stats.num_running, stats.num_waiting, stats.kv_blocks_free) == (0, 0, stats.kv_blocks_total)
    return first + rest


@pytest.fixture(scope="module")
def reference(tiny_llama_dir: str) -> list[list[int]]:
    engine = _engine(tiny_llama_dir, enable_prefix_caching=False)
    out = _run(engine, _prompts())
    assert engine.stats().cached_tokens == 0
    return out


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("cache", dict(enable_prefix_caching=True)),
        ("cache+chunks", dict(enable_prefix_caching=True, max_batch_prefill_tokens=13)),
        ("chunks", dict(enable_prefix_caching=False, max_batch_prefill_tokens=13)),
        ("cache+chunks+block4", dict(enable_prefix_caching=True, max_batch_prefill_tokens=29, block_size=4)),
    ],
)
def test_greedy_outputs_do_not_depend_on_caching_or_chunking(tiny_llama_dir, reference, name, overrides):
    engine = _engine(tiny_llama_dir, **overrides)
    assert _run(engine, _prompts()) == reference, name
    stats = engine.stats()
    if engine.config.enable_prefix_caching:
        assert stats.cached_tokens >= 60 * 6  # every later prompt reused most of its shared prefix
        assert stats.kv_blocks_cached > 0
    assert stats.preemptions == 0


@pytest.mark.parametrize("caching", [True, False])
def test_greedy_outputs_survive_preemption(tiny_llama_dir, reference, caching):
    # 20 blocks of 8 = 160 tokens: the seven prompts (41-131 tokens with the new ones) cannot all run at once,
    # not even sharing their prefixes.
    engine = _engine(tiny_llama_dir, enable_prefix_caching=caching, max_total_tokens=160,
                     max_batch_total_tokens=160, max_batch_prefill_tokens=64)
    assert _run(engine, _prompts()) == reference
    assert engine.stats().preemptions > 0


def test_prompt_logprob_requests_do_not_use_the_cache(tiny_llama_dir):
    engine = _engine(tiny_llama_dir, enable_prefill_logprobs=True)
    prompt = _prompts()[1]
    engine.generate([prompt], GREEDY)
    plain = engine.add_request("plain", prompt, GREEDY)
    details = engine.add_request(
        "details", prompt, dataclasses.replace(GREEDY, decoder_input_details=True, details=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert plain.num_cached_tokens > 0
    assert details.num_cached_tokens == 0 and not details.use_prefix_cache
