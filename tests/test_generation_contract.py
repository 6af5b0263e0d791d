"""TGI's generation contract through the engine with the tiny model: logprobs against transformers after the
same processing, prompt logprobs, seeds across batch compositions, stop strings spanning tokens, truncate,
best_of sharing the prompt's blocks, watermark detection, details through the engine loop."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from tgi_backend.config import EngineConfig
from tgi_backend.sampling.params import ValidationLimits, parse_sampling_parameters
from tgi_backend.sampling.watermark import detect, detect_text

BLOCK = 16


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str):
    from tgi_backend.engine.engine import LLMEngine

    config = EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=256, block_size=BLOCK,
                          max_batch_total_tokens=4096, enable_prefill_logprobs=True, max_best_of=3)
    return LLMEngine(config)


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir: str):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def params(engine, **given):
    return parse_sampling_parameters(given, limits=ValidationLimits.from_config(engine.config))


def run(engine, requests: dict[str, tuple[list[int], dict]]) -> dict[str, list]:
    """Adds every request, steps to the end; returns each request's outputs."""
    for rid, (prompt, given) in requests.items():
        engine.add_request(rid, prompt, params(engine, **given))
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def tokens_of(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def details_of(outputs) -> dict:
    from tgi_backend.sampling.details import merge

    return merge(o.details for o in outputs)


def prompt(n: int, offset: int = 0) -> list[int]:
    return [1] + [(37 * i + offset) % 400 + 50 for i in range(n - 1)]


@pytest.mark.parametrize(
    "given, processors",
    [
        ({"repetition_penalty": 1.5}, lambda sp: [RepetitionPenaltyLogitsProcessor(1.5)]),
        (
            {"do_sample": True, "temperature": 0.7, "top_k": 20, "seed": 11, "repetition_penalty": 1.2},
            lambda sp: [RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20)],
        ),
    ],
)
def test_logprobs_are_log_softmax_of_the_processed_scores(engine, hf_model, given, processors):
    ids = prompt(9)
    out = run(engine, {"lp": (ids, dict(max_new_tokens=8, ignore_eos=True, details=True, top_n_tokens=3, **given))})
    details = details_of(out["lp"])
    generated = tokens_of(out["lp"])
    assert [t["id"] for t in details["tokens"]] == generated and len(details["top_tokens"]) == len(generated)
    for i, token in enumerate(generated):
        context = torch.tensor([ids + generated[:i]])
        with torch.no_grad():
            scores = hf_model(context).logits[:, -1].float()
        for proc in processors(None):
            scores = proc(context, scores)
        reference = scores.log_softmax(-1)[0]
        assert details["tokens"][i]["logprob"] == pytest.approx(reference[token].item(), abs=1e-4)
        top = reference.topk(3)
        assert [t["id"] for t in details["top_tokens"][i]] == top.indices.tolist()
        assert [t["logprob"] for t in details["top_tokens"][i]] == pytest.approx(top.values.tolist(), abs=1e-4)
    if given.get("do_sample"):
        assert details["seed"] == 11
    else:
        assert generated[0] == int(reference.argmax()) or i > 0  # greedy on the penalized scores
        assert details["seed"] is None


def test_prompt_logprobs_match_transformers(engine, hf_model):
    ids = prompt(40, offset=3)  # longer than two blocks: several chunks would still be gathered per position
    out = run(engine, {"pf": (ids, dict(max_new_tokens=2, decoder_input_details=True))})
    prefill = details_of(out["pf"])["prefill"]
    assert [p["id"] for p in prefill] == ids and prefill[0]["logprob"] is None
    with torch.no_grad():
        reference = hf_model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    for pos in range(1, len(ids)):
        assert prefill[pos]["logprob"] == pytest.approx(reference[pos - 1, ids[pos]].item(), abs=1e-4)


def test_prompt_logprobs_need_the_server_flag(tiny_llama_dir, engine):
    from tgi_backend.errors import ValidationError

    off = ValidationLimits.from_config(EngineConfig(model_id=tiny_llama_dir))
    with pytest.raises(ValidationError, match="--enable-prefill-logprobs"):
        parse_sampling_parameters({"decoder_input_details": True}, limits=off)


def test_seed_gives_the_same_tokens_whatever_shares_the_batch(engine):
    seeded = dict(do_sample=True, temperature=1.3, top_p=0.95, seed=1234, max_new_tokens=12, ignore_eos=True)
    alone = tokens_of(run(engine, {"s": (prompt(7), seeded)})["s"])
    crowd = run(engine, {
        "x": (prompt(20, 5), dict(do_sample=True, max_new_tokens=5, ignore_eos=True, repetition_penalty=1.3)),
        "y": (prompt(3, 9), dict(max_new_tokens=15, ignore_eos=True, watermark=True)),
        "s2": (prompt(7), seeded),
        "z": (prompt(11, 2), dict(do_sample=True, typical_p=0.5, seed=5, max_new_tokens=9, ignore_eos=True)),
    })
    assert tokens_of(crowd["s2"]) == alone
    assert len(set(alone)) > 1


def test_stop_sequence_spanning_two_tokens(engine):
    ids = prompt(6, 1)
    plain = run(engine, {"p": (ids, dict(max_new_tokens=30, ignore_eos=True, details=True))})["p"]
    texts = [t["text"] for t in details_of(plain)["tokens"]]
    k = next(i for i in range(1, len(texts) - 1) if texts[i] and texts[i + 1] and texts[i][-1] != texts[i + 1][0])
    stop = texts[k][-1] + texts[k + 1][0]  # the last character of one token and the first of the next
    full = "".join(texts)
    end = full.index(stop) + len(stop)  # the first place it appears, maybe earlier than token k
    out = run(engine, {"s": (ids, dict(max_new_tokens=30, ignore_eos=True, stop=["never-there", stop]))})["s"]
    text = "".join(o.text for o in out)
    assert out[-1].finish_reason == "stop_sequence"
    assert stop in text and text.startswith(full[:end]) and stop not in text[: text.index(stop) + len(stop) - 1]
    assert len(tokens_of(out)) < 30


def test_detokenize_false_gives_the_same_tokens_without_text(engine):
    ids = prompt(7, 3)
    given = dict(max_new_tokens=12, ignore_eos=True)
    out = run(engine, {"t": (ids, given), "n": (ids, {**given, "detokenize": False})})
    assert tokens_of(out["n"]) == tokens_of(out["t"]) and "".join(o.text for o in out["t"])
    assert all(o.text == "" for o in out["n"]) and out["n"][-1].finish_reason == "length"
    full = "".join(o.text for o in out["t"])
    stop = full[len(full) // 2 :][:2]  # stop strings still detokenize
    stopped = run(engine, {"s": (ids, {**given, "detokenize": False, "stop": [stop]})})["s"]
    assert stopped[-1].finish_reason == "stop_sequence" and stop in "".join(o.text for o in stopped)


def test_truncate_keeps_the_last_tokens(engine):
    ids = prompt(30, 4)
    out = run(engine, {
        "t": (ids, dict(max_new_tokens=6, truncate=10)),
        "ref": (ids[-10:], dict(max_new_tokens=6)),
    })
    assert out["t"][-1].num_input_tokens == 10
    assert tokens_of(out["t"]) == tokens_of(out["ref"])


def test_best_of_shares_the_prompt_blocks(engine):
    pool = engine.block_pool
    engine.block_pool.reset_prefix_cache()
    ids = prompt(2 * BLOCK + 5, 8)  # two full blocks and a partial one
    used_before = pool.num_used_blocks
    engine.add_request("b", ids, params(engine, do_sample=True, best_of=3, max_new_tokens=6, ignore_eos=True))
    assert engine.step() == []  # the parent computes the prompt; its children are forked from its blocks
    requests = [engine.scheduler.get_request(r) for r in ("b", "b/1", "b/2")]
    assert all(r is not None for r in requests)
    tables = [r.block_ids for r in requests]
    assert tables[0] == tables[1] == tables[2]  # shared, not copied
    assert pool.num_used_blocks - used_before == 3
    assert all(pool.refcount(b) == 3 for b in tables[0])
    engine.step()  # each writes its partial block: copy on write, full blocks stay shared
    tables = [engine.scheduler.get_request(r).block_ids for r in ("b", "b/1", "b/2")]
    assert tables[0][:2] == tables[1][:2] == tables[2][:2]
    assert len({t[2] for t in tables}) == 3
    assert pool.num_used_blocks - used_before == 2 + 3  # without sharing: 3 * 3
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    (final,) = outputs
    assert final.request_id == "b" and final.finished and len(final.new_token_ids) == 6
    details = final.details
    assert len(details["best_of_sequences"]) == 2
    score = lambda tokens: sum(t["logprob"] for t in tokens)  # noqa: E731
    assert all(score(details["tokens"]) >= score(s["tokens"]) for s in details["best_of_sequences"])
    seeds = {details["seed"], *(s["seed"] for s in details["best_of_sequences"])}
    assert len(seeds) == 3 and None not in seeds
    assert pool.num_used_blocks == used_before  # every block came back


def test_best_of_abort_frees_every_sequence(engine):
    pool = engine.block_pool
    used_before = pool.num_used_blocks
    engine.add_request("ab", prompt(20), params(engine, do_sample=True, best_of=2, max_new_tokens=50, ignore_eos=True))
    engine.step()
    engine.step()
    engine.abort_request("ab")
    assert not engine.has_unfinished_requests() and pool.num_used_blocks == used_before


def test_watermark_is_detected_and_plain_text_is_not(engine):
    n = 80
    requests = {}
    for seed in range(3):
        base = dict(do_sample=True, seed=100 + seed, max_new_tokens=n, ignore_eos=True)
        requests[f"w{seed}"] = (prompt(5, seed), dict(base, watermark=True))
        requests[f"p{seed}"] = (prompt(5, seed), base)
    out = run(engine, requests)
    for seed in range(3):
        w, p = tokens_of(out[f"w{seed}"]), tokens_of(out[f"p{seed}"])
        last = prompt(5, seed)[-1]
        z_w, green, scored = detect(w, gamma=0.5, prompt_last_token=last)
        z_p, _, _ = detect(p, gamma=0.5, prompt_last_token=last)
        assert scored == n and z_w > 4.0, (z_w, green)
        assert z_p < 2.5, z_p

def test_text_detector_scores_the_retokenized_text(engine):
    # the tiny model's output is byte soup that does not re-tokenize to itself; ASCII text does
    ids = engine.tokenizer.encode("the watermark detector reads text as well as ids", add_special_tokens=False)
    text = engine.tokenizer.decode(ids)
    assert detect_text(text, engine.tokenizer) == detect(ids)


def test_details_through_the_engine_loop(engine):
    import threading

    from tgi_backend.serving.engine_loop import EngineLoop, Job

    class ListSink:
        def __init__(self) -> None:
            self.chunks: list = []
            self.done = threading.Event()

        def send(self, chunk, final: bool) -> None:
            self.chunks.append(chunk)
            if final:
                self.done.set()

        def send_error(self, error: Exception) -> None:
            raise AssertionError(error)

        def is_cancelled(self) -> bool:
            return False

        def wait(self) -> "ListSink":
            assert self.done.wait(120.0), "the request never finished"
            return self

    loop = EngineLoop(engine)
    loop.start()
    try:
        whole, stream = ListSink(), ListSink()
        sp = params(engine, details=True, top_n_tokens=2, max_new_tokens=5, ignore_eos=True, do_sample=True, seed=3)
        loop.submit(Job(prompt_token_ids=prompt(8), params=sp), whole)
        loop.submit(Job(prompt_token_ids=prompt(8), params=sp, stream=True), stream)
        (chunk,) = whole.wait().chunks
        parts = [c.details for c in stream.wait().chunks if c is not None]
    finally:
        loop.stop()
    d = chunk.details
    assert [t["id"] for t in d["tokens"]] == chunk.token_ids and len(d["top_tokens"]) == 5
    assert (d["finish_reason"], d["generated_tokens"], d["seed"]) == ("length", 5, 3)
    assert all(len(p["tokens"]) == 1 for p in parts) and "finish_reason" in parts[-1]
    assert "finish_reason" not in parts[0]
    assert [p["tokens"][0] for p in parts] == d["tokens"]


def test_prompt_logprobs_survive_chunked_prefill(tiny_llama_dir, engine):
    from tgi_backend.engine.engine import LLMEngine

    chunked = LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=256,
                                     block_size=BLOCK, max_batch_total_tokens=2048, max_batch_prefill_tokens=12,
                                     enable_prefill_logprobs=True))
    ids = prompt(45, offset=6)
    given = dict(max_new_tokens=2, decoder_input_details=True)
    small = details_of(run(chunked, {"c": (ids, given)})["c"])["prefill"]
    whole = details_of(run(engine, {"w": (ids, given)})["w"])["prefill"]
    assert [p["logprob"] for p in small] == pytest.approx([p["logprob"] for p in whole], abs=1e-4, nan_ok=True)


def test_min_new_tokens_holds_back_a_stop_token(engine):
    ids = prompt(6, 2)
    first = tokens_of(run(engine, {"g": (ids, dict(max_new_tokens=8))})["g"])
    stopped = run(engine, {"s": (ids, dict(max_new_tokens=8, stop_token_ids=[first[1]]))})["s"]
    assert tokens_of(stopped) == first[:2] and stopped[-1].finish_reason == "eos_token"
    held = run(engine, {"m": (ids, dict(max_new_tokens=8, min_new_tokens=6, stop_token_ids=[first[1]]))})["m"]
    assert first[1] not in tokens_of(held)[:6] and len(tokens_of(held)) >= 6


def test_job_parsing_return_full_text_stop_input_and_limits():
    import numpy as np

    from tgi_backend.errors import ValidationError
    from tgi_backend.serving.inputs import parse_job

    arrays = dict(text_input=np.array([b"hi"], dtype=object), exclude_input_in_output=np.array([True]),
                  sampling_parameters=np.array([b'{"return_full_text": true}'], dtype=object),
                  stop=np.array([b"a", "b\u00e9".encode()], dtype=object))
    job, _ = parse_job(arrays.get)
    assert not job.exclude_input_in_output and job.params.stop == ("a", "b\u00e9")
    arrays["stop"] = np.array([b"1", b"2", b"3"], dtype=object)
    with pytest.raises(ValidationError, match="`stop` supports up to 2 stop sequences. Given: 3"):
        parse_job(arrays.get, limits=ValidationLimits(max_stop_sequences=2))


def test_best_of_reserves_room_for_its_sequences(tiny_llama_dir):
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.errors import OverloadedError

    small = LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=64,
                                   max_batch_total_tokens=1024, max_concurrent_requests=3))
    limits = ValidationLimits.from_config(small.config)
    small.add_request("g", prompt(5), parse_sampling_parameters(
        dict(do_sample=True, best_of=2, max_new_tokens=3, ignore_eos=True), limits=limits))
    small.add_request("one", prompt(5, 1), parse_sampling_parameters(dict(max_new_tokens=3), limits=limits))
    with pytest.raises(OverloadedError):  # the group's child is not admitted yet, but its place is taken
        small.add_request("two", prompt(5, 2), parse_sampling_parameters(dict(max_new_tokens=3), limits=limits))
    outputs = []
    while small.has_unfinished_requests():
        outputs.extend(small.step())
    (group,) = [o for o in outputs if o.request_id == "g"]
    assert len(group.details["best_of_sequences"]) == 1
