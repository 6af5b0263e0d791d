"""N-gram speculation (--speculate): the drafter, and the engine verifying drafts. With drafts on, every
request must get exactly the tokens, text, details and finish it gets without them; an oracle drafter that
knows the answer (and spoils some of its guesses) drives both the accept and the reject paths."""
from __future__ import annotations

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.engine.ngram import NgramDrafter
from tgi_backend.sampling.params import ValidationLimits, parse_sampling_parameters

BLOCK = 16


# ---- the drafter --------------------------------------------------------------------------------
def test_drafter_proposes_what_followed_the_latest_match_of_the_longest_suffix():
    d = NgramDrafter()
    assert d.propose("a", [1, 2, 3, 9, 1, 2, 3, 4, 7, 1, 2, 3], 2) == [4, 7]  # the later [1, 2, 3]
    assert d.propose("b", [1, 2, 3, 8, 5, 3], 3) == [8, 5, 3]  # one-token match: the 3 at index 2
    assert d.propose("c", [1, 2, 3, 4], 3) == []  # the last token never occurred before
    assert d.propose("d", [5], 3) == [] and d.propose("e", [1, 1], 0) == []


def test_drafter_continues_a_loop_with_its_period():
    d = NgramDrafter()
    assert d.propose("a", [9, 5, 5, 5], 4) == [5, 5, 5, 5]
    assert d.propose("b", [7, 1, 2, 7, 1, 2, 7], 5) == [1, 2, 7, 1, 2]


def test_drafter_matches_whole_tokens_only_and_stops_before_ending_tokens():
    d = NgramDrafter()
    # 256 is bytes 00 01 00 00 and 1 is 01 00 00 00: [256, 1] holds 1's bytes at a misaligned offset
    assert d.propose("a", [256, 1, 0, 0, 1], 2) == [0, 0]
    assert d.propose("b", [3, 4, 2, 6, 3], 3, never={2}) == [4]
    assert d.propose("c", [3, 2, 3], 3, never=(2,)) == []


def test_drafter_follows_growing_tokens_and_forgets():
    d, tokens = NgramDrafter(), [4, 5, 6]
    assert d.propose("a", tokens, 2) == []
    tokens += [4]
    assert d.propose("a", tokens, 2) == [5, 6]  # only the new token is appended to its copy
    d.forget("a")
    assert d.propose("a", [8, 8], 1) == [8]


# ---- the engine -----------------------------------------------------------------------------------
class OracleDrafter(NgramDrafter):
    """Proposes the reference continuation, spoiling one guess in every other step."""

    def __init__(self, reference: dict[str, list[int]]) -> None:
        super().__init__()
        self.reference = reference
        self.calls = 0

    def propose(self, request_id, token_ids, k, never=()):
        self.calls += 1
        full = self.reference[request_id]
        draft = full[len(token_ids) : len(token_ids) + k]
        if self.calls % 2 == 0 and len(draft) > 1:
            draft[1] = (draft[1] + 1) % 500
        for i, t in enumerate(draft):
            if t in never:
                return draft[:i]
        return draft


def _engine(tiny_llama_dir: str, speculate: int):
    from tgi_backend.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=256, block_size=BLOCK,
                                  max_batch_total_tokens=4096, speculate=speculate))


@pytest.fixture(scope="module")
def plain(tiny_llama_dir: str):
    return _engine(tiny_llama_dir, 0)


@pytest.fixture(scope="module")
def speculative(tiny_llama_dir: str):
    return _engine(tiny_llama_dir, 4)


def _run(engine, requests: dict[str, tuple[list[int], dict]]) -> dict[str, list]:
    for rid, (prompt, given) in requests.items():
        engine.add_request(rid, prompt, parse_sampling_parameters(given, limits=ValidationLimits.from_config(engine.config)))
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def _tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11] * 3, "b": list(range(40, 73)), "c": [300, 301, 302]}


def _compare(plain, speculative, requests, oracle: bool = True):
    """Both engines on the same requests; returns (reference outputs, speculative outputs)."""
    ref = _run(plain, requests)
    if oracle:
        speculative.scheduler.drafter = OracleDrafter(
            {rid: list(requests[rid][0]) + _tokens(outs) for rid, outs in ref.items()})
    try:
        got = _run(speculative, requests)
    finally:
        speculative.scheduler.drafter = NgramDrafter()
    for rid in requests:
        assert _tokens(got[rid]) == _tokens(ref[rid]), rid
        assert "".join(o.text for o in got[rid]) == "".join(o.text for o in ref[rid]), rid
        assert [o.finished for o in got[rid]] == [False] * (len(got[rid]) - 1) + [True]
        assert got[rid][-1].finish_reason == ref[rid][-1].finish_reason
        counts = [o.num_output_tokens for o in got[rid]]
        assert counts == list(range(1, len(counts) + 1))  # each output counts its own token
    pool = speculative.block_pool
    assert pool.num_free_blocks == pool.num_total_blocks  # no block held (cached ones count as free)
    return ref, got


def test_greedy_tokens_are_the_same_with_accepted_and_rejected_drafts(plain, speculative):
    before = speculative.stats()
    _compare(plain, speculative, {rid: (p, {"max_new_tokens": 40}) for rid, p in PROMPTS.items()})
    after = speculative.stats()
    drafted, accepted = after.draft_tokens - before.draft_tokens, after.accepted_tokens - before.accepted_tokens
    assert 0 < accepted < drafted  # both paths ran


def test_seeded_sampling_is_the_same_with_drafts(plain, speculative):
    given = {"do_sample": True, "temperature": 0.9, "top_k": 50, "top_p": 0.95, "seed": 11, "max_new_tokens": 30}
    _compare(plain, speculative, {"s": (PROMPTS["a"], given), "t": (PROMPTS["b"], dict(given, seed=12))})


def test_details_logprobs_match_token_by_token(plain, speculative):
    from tgi_backend.sampling.details import merge

    ref, got = _compare(plain, speculative, {"d": (PROMPTS["b"], {"max_new_tokens": 20, "details": True,
                                                                  "top_n_tokens": 2})})
    want, have = merge(o.details for o in ref["d"]), merge(o.details for o in got["d"])
    assert [t["id"] for t in have["tokens"]] == [t["id"] for t in want["tokens"]]
    for a, b in zip(have["tokens"], want["tokens"]):
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-4)
    assert have["generated_tokens"] == want["generated_tokens"] == 20
    assert have["finish_reason"] == want["finish_reason"] == "length"


def test_a_stop_string_inside_accepted_drafts_ends_the_request_there(plain, speculative):
    ref = _run(plain, {"r": (PROMPTS["a"], {"max_new_tokens": 30})})
    text = "".join(o.text for o in ref["r"])
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip()
    _, got = _compare(plain, speculative, {"r": (PROMPTS["a"], {"max_new_tokens": 30, "stop": [stop]})})
    assert got["r"][-1].finish_reason == "stop_sequence"


def test_max_new_tokens_is_exact_and_eos_is_never_drafted(plain, speculative):
    _, got = _compare(plain, speculative, {"m": (PROMPTS["c"], {"max_new_tokens": 7})})
    assert sum(len(o.new_token_ids) for o in got["m"]) == 7
    # the scheduler bounds drafts by what is left and cuts them at EOS
    sched = speculative.scheduler
    r = speculative.add_request("eos", [1, 2, 3, 1, 2], parse_sampling_parameters(
        {"max_new_tokens": 10}, limits=ValidationLimits.from_config(speculative.config)))
    r.eos_token_ids = frozenset({3})
    assert sched._drafts(r, budget=100) == []  # [3, ...] would follow [1, 2]: EOS is cut
    r.eos_token_ids = frozenset()
    assert sched._drafts(r, budget=100) == [3, 1, 2, 3]
    assert sched._drafts(r, budget=3) == [3, 1]  # the step's own token takes one of the budget
    r.max_new_tokens = 2
    assert sched._drafts(r, budget=100) == [3]  # one to draft, one for the step's own token
    speculative.abort_request("eos")


def test_the_real_drafter_keeps_the_outputs(plain, speculative):
    loop = {rid: (p, {"max_new_tokens": 48}) for rid, p in PROMPTS.items()}
    _compare(plain, speculative, loop, oracle=False)


def test_blocks_cached_after_speculation_hold_the_right_tokens(tiny_llama_dir: str, plain, speculative):
    """A later prompt extending a speculated request reuses its cached blocks: they must hold verified K/V."""
    ref = _run(plain, {"x": (PROMPTS["b"], {"max_new_tokens": 60})})
    full = list(PROMPTS["b"]) + _tokens(ref["x"])
    speculative.scheduler.drafter = OracleDrafter({"x": full})
    try:
        _run(speculative, {"x": (PROMPTS["b"], {"max_new_tokens": 60})})
    finally:
        speculative.scheduler.drafter = NgramDrafter()
    longer = full[:80]
    fresh = _engine(tiny_llama_dir, 0)
    want = _tokens(_run(fresh, {"y": (longer, {"max_new_tokens": 10})})["y"])
    cached_before = speculative.stats().cached_tokens
    got = _tokens(_run(speculative, {"y": (longer, {"max_new_tokens": 10})})["y"])
    assert speculative.stats().cached_tokens - cached_before >= 64  # the blocks were reused
    assert got == want


def test_penalties_see_the_drafts_before_their_row(plain, speculative):
    """A draft row's penalties count the drafts before it: the tokens decoding one at a time had generated."""
    given = {"repetition_penalty": 1.5, "frequency_penalty": 0.8, "presence_penalty": 0.4, "max_new_tokens": 30}
    before = speculative.stats()
    _compare(plain, speculative, {"p": (PROMPTS["a"], given), "q": (PROMPTS["b"], dict(given, do_sample=True,
                                                                                      seed=5, top_k=20))})
    assert speculative.stats().accepted_tokens > before.accepted_tokens


def test_watermark_seeds_each_draft_row_from_the_draft_before_it(plain, speculative):
    given = {"watermark": True, "do_sample": True, "seed": 3, "max_new_tokens": 30}
    _compare(plain, speculative, {"w": (PROMPTS["a"], given), "g": (PROMPTS["c"], {"watermark": True,
                                                                                  "max_new_tokens": 30})})


def test_best_of_does_not_speculate(speculative):
    limits = ValidationLimits.from_config(speculative.config)
    plain_request = speculative.add_request("p", [1, 2], parse_sampling_parameters(
        {"repetition_penalty": 1.2, "watermark": True}, limits=limits))
    forked = speculative.add_request("q", [1, 2], parse_sampling_parameters(
        {"best_of": 2, "do_sample": True}, limits=limits))
    assert plain_request.speculate == 4 and forked.speculate == 0
    speculative.abort_request("p")
    speculative.abort_request("q")


def test_speculate_is_bounded():
    with pytest.raises(ValueError, match="speculate"):
        EngineConfig(model_id="x", speculate=17).resolve(512)
    assert EngineConfig.from_strings(EngineConfig(model_id="x", speculate=3).to_strings()).speculate == 3


def test_rejected_drafts_back_off_exponentially(plain, speculative):
    class Wrong(NgramDrafter):
        def propose(self, request_id, token_ids, k, never=()):
            return [499] * k if token_ids[-1] != 499 else [498] * k

    requests = {"w": (PROMPTS["b"], {"max_new_tokens": 40})}
    ref = _run(plain, requests)
    speculative.scheduler.drafter = Wrong()
    before = speculative.stats().draft_tokens
    try:
        got = _run(speculative, requests)
    finally:
        speculative.scheduler.drafter = NgramDrafter()
    assert _tokens(got["w"]) == _tokens(ref["w"])
    # six drafting steps of the 40 (waits of 1, 2, 4, 8, 16 between; the last draft cut by max_new_tokens)
    assert 5 * 4 < speculative.stats().draft_tokens - before <= 6 * 4
