"""Streamed chunks merged when the response thread lags: per-sink order, finals, errors, what never merges."""
from __future__ import annotations

import threading

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.engine.request import SamplingParams
from tgi_backend.serving.coalesce import coalesce, merge
from tgi_backend.serving.engine_loop import Chunk, EngineLoop, Job


def _tok(i: int) -> dict:
    return {"id": i, "text": f"t{i}", "logprob": -1.0, "special": False}


def test_consecutive_chunks_of_a_sink_merge_in_order():
    a, b = object(), object()
    items = [
        (a, Chunk(text="x", token_ids=[1], num_output_tokens=1, details={"tokens": [_tok(1)]}), False),
        (b, Chunk(text="p", token_ids=[7], num_output_tokens=1), False),
        (a, Chunk(text="y", token_ids=[2], num_output_tokens=2, details={"tokens": [_tok(2)]}), False),
        "metric",
        (a, Chunk(text="z", token_ids=[3], finish_reason="length", num_output_tokens=3,
                  details={"tokens": [_tok(3)], "finish_reason": "length"}), True),
        (a, Chunk(text="late", token_ids=[4]), False),  # after a final: never merged into it
    ]
    out = coalesce(items)
    assert [o if isinstance(o, str) else o[0] for o in out] == [a, b, "metric", a]
    sink, chunk, final = out[0]
    assert final and chunk.text == "xyz" and chunk.token_ids == [1, 2, 3] and chunk.finish_reason == "length"
    assert chunk.num_output_tokens == 3 and [t["id"] for t in chunk.details["tokens"]] == [1, 2, 3]
    assert chunk.details["finish_reason"] == "length"
    assert out[1][1].text == "p" and out[3][1].text == "late"


def test_merge_writes_the_later_chunk_into_the_first():
    first = Chunk(text="x", token_ids=[1], num_input_tokens=4, num_output_tokens=1, details={"tokens": [_tok(1)]})
    then = Chunk(text="y", token_ids=[2], finish_reason="length", num_input_tokens=4, num_output_tokens=2,
                 details={"tokens": [_tok(2)], "finish_reason": "length"})
    got = merge(first, then)
    assert got is first
    assert got.text == "xy" and got.token_ids == [1, 2] and got.finish_reason == "length"
    assert got.num_input_tokens == 4 and got.num_output_tokens == 2
    assert [t["id"] for t in got.details["tokens"]] == [1, 2] and got.details["finish_reason"] == "length"
    assert then.token_ids == [2] and then.text == "y"  # the later chunk is left as it was


def test_errors_flag_only_ends_and_decode_windows_are_not_merged():
    a = object()
    window = Chunk(text="w", token_ids=[5], context_ids=[1], unread_ids=[5])
    items = [(a, Chunk(token_ids=[1]), False), (a, ValueError("boom")), (a, Chunk(token_ids=[2]), False),
             (a, None, True), (a, window, False), (a, window, False)]
    assert coalesce(items) == items


def test_merge_keeps_details_none_when_neither_has_them():
    assert merge(Chunk(text="a", token_ids=[1]), Chunk(text="b", token_ids=[2])).details is None


class SlowSink:
    """Blocks on its first response until released, so the engine runs ahead of the response thread."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.responses: list[tuple[Chunk | None, bool]] = []
        self.done = threading.Event()

    def send(self, chunk, final):
        self.entered.set()
        self.release.wait(60)
        self.responses.append((chunk, final))
        if final:
            self.done.set()

    def send_error(self, error):
        raise AssertionError(error)

    def is_cancelled(self):
        return False


@pytest.mark.parametrize("coalescing", [True, False])
def test_a_lagging_stream_gets_fewer_responses_with_every_token(tiny_llama_dir, coalescing: bool):
    """With --stream-coalescing; without it (the default), one response per token whatever the lag."""
    from tgi_backend.engine.engine import LLMEngine

    config = EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=64, max_batch_total_tokens=512)
    engine = LLMEngine(config)
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    expected = engine.generate([[5, 6, 7]], params)[0]
    loop = EngineLoop(engine, coalesce=coalescing)
    loop.start()
    try:
        sink = SlowSink()
        loop.submit(Job(prompt_token_ids=[5, 6, 7], params=params, stream=True), sink)
        assert sink.entered.wait(60)  # the first token is being sent, and blocks there
        while engine.has_unfinished_requests():  # the engine finishes meanwhile: the rest queue up
            threading.Event().wait(0.01)
        sink.release.set()
        assert sink.done.wait(60)
    finally:
        loop.stop()
    ids = [i for chunk, _ in sink.responses for i in chunk.token_ids]
    assert (len(sink.responses) < 12) if coalescing else (len(sink.responses) == 12)
    assert [final for _, final in sink.responses].count(True) == 1
    assert sink.responses[-1][1] and sink.responses[-1][0].finish_reason == "length"
    assert ids == expected
