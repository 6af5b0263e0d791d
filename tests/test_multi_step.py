"""Multi-step decoding (EngineConfig.decode_steps): the scheduler holds slots ahead for few plain greedy rows,
the runner feeds each greedy token back natively, and the outputs are those of one step at a time."""
from __future__ import annotations

import pytest

from test_scheduler import make_request, make_scheduler
from tgi_backend.config import EngineConfig
from tgi_backend.engine.scheduler import MULTI_STEP_MAX_ROWS
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tgi_backend.kernels.cpu import library
from tgi_backend.layers import linear as linear_module
from tgi_backend.sampling.params import ValidationLimits, parse_sampling_parameters


def _ahead_run(out: SchedulerOutput, token: int = 7) -> ModelRunnerOutput:
    """A runner that takes every held step: 1 + num_lookahead tokens per row."""
    result = ModelRunnerOutput()
    for c in out.chunks:
        if c.sample:
            result.request_ids += [c.request_id] * (1 + c.num_lookahead)
            result.sampled_token_ids += [token] * (1 + c.num_lookahead)
            if c.num_lookahead:
                result.num_ahead[c.request_id] = c.num_lookahead
    return result


def _decoding(s, rid, prompt=6, max_new=10, lookahead=3, eos=frozenset()):
    r = make_request(rid, prompt, max_new=max_new, eos=eos)
    r.lookahead = s.max_lookahead = lookahead
    s.add_request(r)
    return r


def test_decode_rows_hold_slots_ahead_up_to_their_last_token():
    s = make_scheduler(block_size=4)
    r = _decoding(s, "a", prompt=6, max_new=10)
    out = s.schedule()  # the prompt: no lookahead
    assert out.chunks[0].num_lookahead == 0
    s.update_from_output(out, _ahead_run(out))
    seen = []
    while s.has_unfinished_requests():
        out = s.schedule()
        (chunk,) = out.chunks
        seen.append(chunk.num_lookahead)
        assert len(r.block_ids) * 4 >= chunk.start_pos + 1 + chunk.num_lookahead  # the slots are held
        s.forget(s.update_from_output(out, _ahead_run(out)))
        assert r.is_finished or r.num_computed_tokens == r.num_tokens - 1
    assert seen == [3, 3, 0]  # 1 + 4 + 4 + 1 tokens: never past max_new_tokens
    assert r.num_output_tokens == 10 and r.finish_reason.value == "length"
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_eos_inside_the_steps_ends_the_request_there():
    s = make_scheduler()
    r = _decoding(s, "a", max_new=10, eos=frozenset({7}))
    out = s.schedule()
    s.update_from_output(out, _ahead_run(out, token=5))
    out = s.schedule()
    assert out.chunks[0].num_lookahead == 3
    done = s.update_from_output(out, _ahead_run(out, token=7))
    assert done == [r] and r.num_output_tokens == 2 and r.finish_reason.value == "eos_token"
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_no_steps_ahead_while_a_request_waits_or_past_the_row_limit():
    s = make_scheduler(budget=64, blocks=256)
    for i in range(MULTI_STEP_MAX_ROWS + 1):
        _decoding(s, f"r{i}", prompt=2)
    out = s.schedule()  # all prompts
    s.update_from_output(out, _ahead_run(out))
    out = s.schedule()
    assert [c.num_lookahead for c in out.chunks] == [0] * (MULTI_STEP_MAX_ROWS + 1)
    s.update_from_output(out, _ahead_run(out))
    s.abort_request("r0")
    out = s.schedule()
    assert [c.num_lookahead for c in out.chunks] == [3] * MULTI_STEP_MAX_ROWS
    s.update_from_output(out, _ahead_run(out))
    _decoding(s, "late", prompt=40)
    s.waiting[0].token_ids = list(range(1, 41))
    out = s.schedule()  # the newcomer is prefilled in this step: nobody runs ahead of it
    assert all(c.num_lookahead == 0 for c in out.chunks)


def test_a_runner_that_does_not_run_ahead_keeps_the_accounting():
    s = make_scheduler()
    r = _decoding(s, "a", max_new=6)
    while s.has_unfinished_requests():
        out = s.schedule()
        s.forget(s.update_from_output(out, ModelRunnerOutput([c.request_id for c in out.chunks],
                                                              [9] * len(out.chunks))))
        assert r.is_finished or r.num_computed_tokens == r.num_tokens - 1
    assert r.num_output_tokens == 6
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_total_blocks


def test_the_engines_cap_holds_requests_to_fewer_steps():
    s = make_scheduler()
    r = _decoding(s, "a", max_new=20)
    out = s.schedule()
    s.update_from_output(out, _ahead_run(out))
    s.max_lookahead = 1  # the engine's MULTI_STEP_WINDOW over its decode steps' time
    out = s.schedule()
    assert out.chunks[0].num_lookahead == 1
    s.max_lookahead = 0
    s.update_from_output(out, _ahead_run(out))
    assert s.schedule().chunks[0].num_lookahead == 0 and r.num_output_tokens == 3


def test_no_steps_ahead_on_a_pool_with_fewer_free_blocks_than_rows():
    s = make_scheduler(blocks=3, block_size=4)
    r = _decoding(s, "a", prompt=6, max_new=5)
    out = s.schedule()
    s.update_from_output(out, _ahead_run(out))
    assert s.kv.pool.num_free_blocks == 1
    out = s.schedule()
    assert out.chunks[0].num_lookahead == 0
    s.update_from_output(out, _ahead_run(out))
    while s.has_unfinished_requests():
        out = s.schedule()
        s.forget(s.update_from_output(out, _ahead_run(out)))
    assert r.num_output_tokens == 5 and s.kv.pool.num_free_blocks == 3


def test_decode_steps_is_bounded():
    with pytest.raises(ValueError, match="decode_steps"):
        EngineConfig(model_id="x", decode_steps=0).resolve(64)


# ---- the engine ---------------------------------------------------------------------------------
native = pytest.mark.skipif(
    library("decoder") is None or not getattr(linear_module.matmul_plan(0), "native_rows", 0),
    reason="no fused decoder in this build: decode steps run one at a time")


def _engine(folder: str, steps: int):
    from tgi_backend.engine.engine import LLMEngine

    return LLMEngine(EngineConfig(model_id=folder, dtype="bfloat16", max_total_tokens=256, block_size=4,
                                  max_batch_total_tokens=4096, decode_steps=steps))


def _run(engine, requests: dict[str, tuple[list[int], dict]]) -> dict[str, list]:
    limits = ValidationLimits.from_config(engine.config)
    for rid, (prompt, given) in requests.items():
        engine.add_request(rid, prompt, parse_sampling_parameters(given, limits=limits))
    outputs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


@native
def test_outputs_are_those_of_single_steps(tiny_llama_dir: str, monkeypatch):
    one, many = _engine(tiny_llama_dir, 1), _engine(tiny_llama_dir, 4)
    ran = []
    monkeypatch.setattr(many.runner, "_run_ahead",
                        lambda *a, _f=many.runner._run_ahead: ran.append(a[-1]) or _f(*a))
    first = _run(one, {"x": ([5, 6, 7], {"max_new_tokens": 40})})["x"]
    text = "".join(o.text for o in first)
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    requests = {
        "greedy": ([5, 6, 7], {"max_new_tokens": 37}),  # not a multiple of the steps
        "eos": ([40, 41, 42, 43], {"max_new_tokens": 60}),  # may end early on the model's EOS
        "stop": ([5, 6, 7], {"max_new_tokens": 40, "stop": [stop]} if stop.strip() else {"max_new_tokens": 40}),
        "sampled": ([9, 10], {"max_new_tokens": 20, "do_sample": True, "seed": 3, "temperature": 0.8}),
    }
    for batch in ({k: requests[k]} for k in requests), [requests]:  # alone, then together
        for group in batch:
            want, got = _run(one, group), _run(many, group)
            for rid in group:
                assert [o.new_token_ids for o in got[rid]] and _flat(got[rid]) == _flat(want[rid]), rid
                assert "".join(o.text for o in got[rid]) == "".join(o.text for o in want[rid]), rid
                assert got[rid][-1].finish_reason == want[rid][-1].finish_reason
                assert [o.finished for o in got[rid]] == [False] * (len(got[rid]) - 1) + [True]
                assert [o.num_output_tokens for o in got[rid]] == list(range(1, len(got[rid]) + 1))
    pool = many.block_pool
    assert pool.num_free_blocks == pool.num_total_blocks
    fused = many.runner.fused
    if fused is not None and (fused.lm_head_panel is not None or fused.greedy_rows(1)):
        assert ran and max(ran) == 3  # the steps did run ahead


def _flat(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


@native
def test_steps_one_by_one_give_the_native_loops_tokens(tiny_llama_dir: str, monkeypatch):
    from tgi_backend.kernels.cpu import decoder

    engine = _engine(tiny_llama_dir, 4)
    want = _run(engine, {"a": ([5, 6, 7], {"max_new_tokens": 30}), "b": ([8, 9], {"max_new_tokens": 23})})
    monkeypatch.setattr(decoder.FusedDecoder, "run_ahead", lambda *a, **k: None)
    got = _run(engine, {"a": ([5, 6, 7], {"max_new_tokens": 30}), "b": ([8, 9], {"max_new_tokens": 23})})
    assert {k: _flat(v) for k, v in got.items()} == {k: _flat(v) for k, v in want.items()}


@native
def test_steps_longer_than_the_window_run_one_at_a_time(tiny_llama_dir: str, monkeypatch):
    from tgi_backend.engine import engine as engine_module

    engine = _engine(tiny_llama_dir, 4)
    ran = []
    monkeypatch.setattr(engine.runner, "_run_ahead", lambda *a, _f=engine.runner._run_ahead: ran.append(a[-1]) or _f(*a))
    monkeypatch.setattr(engine_module, "MULTI_STEP_WINDOW", 0.0)
    _run(engine, {"a": ([5, 6, 7], {"max_new_tokens": 30})})
    assert ran == [] and engine.scheduler.max_lookahead == 0


@native
def test_steps_with_the_lm_head_inside_the_step(tiny_llama_dir: str, monkeypatch):
    """Where no screen gives the tokens (AVX-512 and AMX builds), run_ahead takes each step's own greedy tokens."""
    one, many = _engine(tiny_llama_dir, 1), _engine(tiny_llama_dir, 4)
    for engine in (one, many):
        if engine.runner.fused is None or not engine.runner.fused.head_in_step:
            pytest.skip("no LM head inside the fused step in this build")
        engine.runner.fused.lm_head_screen = None
    ran = []
    monkeypatch.setattr(many.runner, "_run_ahead", lambda *a, _f=many.runner._run_ahead: ran.append(a[-1]) or _f(*a))
    requests = {"a": ([5, 6, 7], {"max_new_tokens": 29}), "b": ([8, 9], {"max_new_tokens": 18})}
    want, got = _run(one, requests), _run(many, requests)
    assert {k: _flat(v) for k, v in got.items()} == {k: _flat(v) for k, v in want.items()}
    assert ran and many.runner.fused.head_in_step_for(2)
