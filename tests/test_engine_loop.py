"""The engine loop with a real tiny engine: streaming, whole responses, errors, cancellation, shutdown."""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.engine.request import SamplingParams
from tgi_backend.errors import GenerationError, OverloadedError, ValidationError
from tgi_backend.serving import engine_loop
from tgi_backend.serving.engine_loop import Chunk, EngineLoop, Job, _Active
from tgi_backend.tokenizer.detokenizer import decode_window

WAIT = 120.0  # a generous bound for a stuck loop, not a timing assertion


class ListSink:
    """Collects responses; `cancel_after` chunks, it reports itself cancelled."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.chunks: list[Chunk | None] = []
        self.error: Exception | None = None
        self.finals = 0
        self.done = threading.Event()
        self.cancel_after = cancel_after

    def send(self, chunk: Chunk | None, final: bool) -> None:
        assert not self.done.is_set(), "response after the final one"
        self.chunks.append(chunk)
        if final:
            self.finals += 1
            self.done.set()

    def send_error(self, error: Exception) -> None:
        assert not self.done.is_set(), "error after the final response"
        self.error = error
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.chunks) >= self.cancel_after

    def wait(self) -> "ListSink":
        assert self.done.wait(WAIT), "the request never finished"
        return self

    @property
    def text(self) -> str:
        return "".join(c.text for c in self.chunks if c is not None)

    @property
    def ids(self) -> list[int]:
        return [i for c in self.chunks if c is not None for i in c.token_ids]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str):
    from tgi_backend.engine.engine import LLMEngine

    config = EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=64,
                          max_batch_total_tokens=512, max_concurrent_requests=8)
    return LLMEngine(config)


@pytest.fixture()
def loop(engine):
    loop = EngineLoop(engine)
    loop.cancel_poll_interval = 0.005  # a tiny model's 40 tokens take less than the default interval
    loop.start()
    yield loop
    loop.stop()


def _stats(loop: EngineLoop) -> tuple[int, int]:
    sink = ListSink()
    loop.submit(Job(kv_stats=True), sink)
    chunk = sink.wait().chunks[-1]
    assert chunk is not None and chunk.kv_blocks is not None
    return chunk.kv_blocks


def test_stream_and_whole_response_agree(loop: EngineLoop):
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    streamed, whole, bare = ListSink(), ListSink(), ListSink()
    loop.submit(Job(prompt_text="Hello world", params=params, stream=True), streamed)
    loop.submit(Job(prompt_text="Hello world", params=params), whole)
    loop.submit(Job(prompt_text="Hello world", params=params, exclude_input_in_output=True), bare)
    for sink in (streamed, whole, bare):
        sink.wait()
        assert sink.error is None and sink.finals == 1
    assert len(streamed.chunks) == 12 and len(whole.chunks) == 1
    assert streamed.ids == whole.ids == bare.ids and len(whole.ids) == 12
    assert whole.chunks[0].text == "Hello world" + streamed.text and bare.chunks[0].text == streamed.text
    last = streamed.chunks[-1]
    assert last.finish_reason == "length" and last.num_output_tokens == 12 and last.num_input_tokens > 0
    assert all(c.finish_reason == "" for c in streamed.chunks[:-1])


def test_bad_requests_get_errors_and_the_loop_keeps_serving(loop: EngineLoop, engine):
    bad = [
        Job(),  # no prompt
        Job(prompt_text=""),
        Job(prompt_token_ids=[]),
        Job(prompt_text="x " * 200),  # longer than max_input_tokens
        Job(prompt_text="hi", params=SamplingParams(max_new_tokens=100)),  # over max_total_tokens
        Job(prompt_text="hi", params=SamplingParams(max_new_tokens=0)),
    ]
    sinks = [ListSink() for _ in bad]
    for job, sink in zip(bad, sinks):
        loop.submit(job, sink)
    for sink in sinks:
        assert isinstance(sink.wait().error, ValidationError), sink.error
        assert str(sink.error).startswith("Input validation error")
    good = ListSink()
    loop.submit(Job(prompt_token_ids=engine.tokenize("ok"), params=SamplingParams(max_new_tokens=3)), good)
    assert good.wait().error is None and len(good.ids) == 3


def test_cancellation_aborts_and_frees_the_blocks(loop: EngineLoop):
    free_before, total = _stats(loop)
    assert free_before == total
    cancelled = ListSink(cancel_after=2)
    loop.submit(Job(prompt_text="a long story " * 3, params=SamplingParams(max_new_tokens=40, ignore_eos=True),
                    stream=True), cancelled)
    cancelled.wait()
    assert cancelled.error is None and cancelled.chunks[-1] is None  # flag-only final
    assert 2 <= len(cancelled.ids) < 40
    assert _stats(loop) == (total, total)


def test_cancellation_is_polled_at_most_once_per_interval(engine):
    class CountingSink(ListSink):
        polls = 0
        threads: set[str] = set()

        def is_cancelled(self) -> bool:
            CountingSink.polls += 1
            CountingSink.threads.add(threading.current_thread().name)
            return False

    loop = EngineLoop(engine)
    loop.cancel_poll_interval = 0.05
    loop.start()
    try:
        start = time.monotonic()
        sink = CountingSink()
        loop.submit(Job(prompt_text="a story", params=SamplingParams(max_new_tokens=40, ignore_eos=True),
                        stream=True), sink)
        sink.wait()
        elapsed = time.monotonic() - start
    finally:
        loop.stop()
    assert len(sink.ids) == 40
    assert CountingSink.polls <= elapsed / 0.05 + 2  # an IPC round trip each in Triton: not once per step
    assert CountingSink.threads <= {"tgi-cancel"}  # never on the engine thread, which it would stall


def test_cancellation_sweeps_space_out_to_the_poll_budget(engine):
    loop = EngineLoop(engine)
    loop.cancel_poll_interval, loop.cancel_polls_per_second = 0.1, 100
    assert loop._sweep_interval() == 0.1
    loop._active = {str(i): None for i in range(10)}  # 100 polls/s: the interval still holds
    assert loop._sweep_interval() == 0.1
    loop._active = {str(i): None for i in range(128)}  # each takes the GIL from the engine thread: 100/s at most
    assert loop._sweep_interval() == pytest.approx(1.28)


def test_stream_interval_sends_the_first_token_then_groups_and_the_last_at_once(engine, loop: EngineLoop):
    """vLLM's --stream-interval: same tokens, text and details as one-per-token, in fewer responses."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True, details=True)
    single = ListSink()
    loop.submit(Job(prompt_text="a story", params=params, stream=True), single)
    single.wait()  # one loop at a time drives the shared engine
    grouped_loop = EngineLoop(engine, stream_interval=4)
    grouped_loop.start()
    try:
        grouped, raised = ListSink(), ListSink()
        grouped_loop.submit(Job(prompt_text="a story", params=params, stream=True), grouped)
        grouped_loop.submit(Job(prompt_text="a story", params=params, stream=True, stream_interval=6), raised)
        grouped.wait(), raised.wait()
    finally:
        grouped_loop.stop()
    assert [len(c.token_ids) for c in single.chunks] == [1] * 10
    assert [len(c.token_ids) for c in grouped.chunks] == [1, 4, 4, 1]  # the last leaves with the finish reason
    assert [len(c.token_ids) for c in raised.chunks] == [1, 6, 3]  # a request's own interval may raise it
    for sink in (grouped, raised):
        assert sink.ids == single.ids and sink.text == single.text
        assert [c.finish_reason for c in sink.chunks][-1] == "length" and not any(c.finish_reason for c in sink.chunks[:-1])
        tokens = [t for c in sink.chunks for t in c.details["tokens"]]
        expected = [t for c in single.chunks for t in c.details["tokens"]]
        assert [(t["id"], t["text"]) for t in tokens] == [(t["id"], t["text"]) for t in expected]
        assert [t["logprob"] for t in tokens] == pytest.approx([t["logprob"] for t in expected], abs=1e-4)  # batch of 2
        assert sink.chunks[-1].details["generated_tokens"] == 10


def test_decode_windows_rebuild_the_full_text(loop: EngineLoop, engine):
    sink = ListSink()
    prompt = "Grüße 你好 🙂 and more"
    loop.submit(Job(prompt_text=prompt, params=SamplingParams(max_new_tokens=30, ignore_eos=True), stream=True,
                    decode_window=True), sink)
    sink.wait()
    pieces = [decode_window(engine.tokenizer, c.context_ids, c.unread_ids, final=bool(c.finish_reason))
              for c in sink.chunks]
    assert "".join(pieces) == sink.text
    prompt_ids = engine.tokenize(prompt)
    full = engine.tokenizer.decode(prompt_ids + sink.ids, skip_special_tokens=True)
    assert full == engine.tokenizer.decode(prompt_ids, skip_special_tokens=True) + sink.text


def test_stop_ends_requests_in_flight(engine):
    loop = EngineLoop(engine)
    loop.start()
    sink = ListSink()
    loop.submit(Job(prompt_text="x", params=SamplingParams(max_new_tokens=50, ignore_eos=True), stream=True), sink)
    loop.stop()
    sink.wait()
    assert sink.finals == 1 or isinstance(sink.error, GenerationError)
    late = ListSink()
    loop.submit(Job(prompt_text="x"), late)
    assert isinstance(late.wait().error, GenerationError)
    assert not engine.has_unfinished_requests()


def test_overload_refuses_past_max_concurrent_requests(loop: EngineLoop):
    total = _stats(loop)[1]
    sinks = [ListSink() for _ in range(10)]  # the engine admits 8
    for sink in sinks:
        loop.submit(Job(prompt_text="busy", params=SamplingParams(max_new_tokens=40, ignore_eos=True),
                        stream=True), sink)
    for sink in sinks:
        sink.wait()
    refused = [s.error for s in sinks if s.error is not None]
    assert len(refused) == 2 and all(isinstance(e, OverloadedError) for e in refused)
    assert str(refused[0]) == "Model is overloaded"
    assert _stats(loop) == (total, total)


# ---- tensors -> Job (serving/inputs.py, what tgi_llm's execute() runs on each request) ------------------
def _getter(**arrays):
    return lambda name: arrays.get(name)


def test_parse_job_reads_vllm_style_inputs():
    import numpy as np

    from tgi_backend.serving.inputs import output_arrays, parse_job

    job, flags = parse_job(
        _getter(text_input=np.array([b"hi"], dtype=object), stream=np.array([True]),
                max_tokens=np.array([5], dtype=np.int32),
                sampling_parameters=np.array([b'{"max_tokens": 9, "temperature": 0}'], dtype=object),
                return_num_input_tokens=np.array([True])),
        '{"ignore_eos": true, "triton_enable_empty_final_response": true}',
    )
    assert job.prompt_text == "hi" and job.stream and flags["return_num_input_tokens"]
    assert job.stream_interval == 1
    grouped, _ = parse_job(_getter(text_input=np.array([b"hi"], dtype=object),
                                   sampling_parameters=np.array([b'{"stream_interval": 8}'], dtype=object)))
    assert grouped.stream_interval == 8
    assert job.params.max_new_tokens == 5 and job.params.ignore_eos and job.params.greedy
    out = output_arrays(Chunk(text="é", token_ids=[1, 2], finish_reason="length", num_input_tokens=3), flags)
    assert set(out) == {"text_output", "output_ids", "finish_reason", "num_input_tokens", "details"}
    assert out["details"][0] == b""  # filled only for requests that asked for details
    assert out["text_output"][0].decode() == "é" and out["output_ids"].dtype == np.int32
    only_ids = output_arrays(Chunk(token_ids=[1, 2]), flags, frozenset({"output_ids"}))
    assert set(only_ids) == {"output_ids", "num_input_tokens"}  # plus what the request's flags ask for

    from tgi_backend.serving.inputs import skip_unread_text

    for wanted, detokenize in ((None, True), (frozenset({"text_output", "output_ids"}), True),
                               (frozenset({"output_ids", "finish_reason"}), False)):
        asked, _ = parse_job(_getter(text_input=np.array([b"hi"], dtype=object)))
        skip_unread_text(asked, wanted)
        assert asked.params.detokenize is detokenize, wanted


@pytest.mark.parametrize(
    "arrays, message",
    [
        (dict(), "give `text_input` or `input_ids`"),
        (dict(text_input=b"a", input_ids=[1]), "not both"),
        (dict(text_input=b"\xff"), "not valid UTF-8"),
        (dict(text_input=b"a", stream=1), "`stream` must be a boolean"),
        (dict(text_input=b"a", sampling_parameters=b"[1]"), "must be a JSON object"),
        (dict(text_input=b"a", sampling_parameters=b"{bad"), "not valid JSON"),
        (dict(input_ids=[1.5]), "`input_ids` must be integers"),
        (dict(text_input=b"a", sampling_parameters=b'{"stream_interval": 0}'), "`stream_interval` must be at least 1"),
    ],
)
def test_parse_job_refuses_bad_tensors(arrays, message):
    import numpy as np

    from tgi_backend.serving.inputs import parse_job

    typed = {k: np.array([v], dtype=object) if isinstance(v, bytes) else np.array(v if isinstance(v, list) else [v])
             for k, v in arrays.items()}
    with pytest.raises(ValidationError, match=message):
        parse_job(_getter(**typed))


def test_build_makes_the_engine_on_the_engine_thread(engine):
    """torch must run on one thread only (libgomp throttles its spin-waits once two threads run it)."""
    made_on: list[str] = []

    def make():
        made_on.append(threading.current_thread().name)
        return engine

    loop = EngineLoop.build(make)
    loop.start()
    try:
        assert made_on == ["tgi-engine"] and loop.engine is engine
        sink = ListSink()
        loop.submit(Job(prompt_token_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3)), sink)
        assert len(sink.wait().ids) == 3
    finally:
        loop.stop()


def test_build_failure_is_raised_by_start():
    def make():
        raise ValueError("no such checkpoint")

    loop = EngineLoop.build(make)
    with pytest.raises(ValueError, match="no such checkpoint"):
        loop.start()


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="thread names are read from Linux's /proc")
def test_threads_carry_os_names(loop):
    # the benchmark tells the engine's CPU time (its thread and the OpenMP workers it starts) by these names
    wanted = {"tgi-engine", "tgi-responses", "tgi-cancel"}
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:  # each thread names itself as it starts
        names = set()
        for comm in Path(f"/proc/{os.getpid()}/task").glob("*/comm"):
            try:
                names.add(comm.read_text().strip())
            except OSError:  # a thread that ended meanwhile
                pass
        if wanted <= names:
            break
        time.sleep(0.01)
    assert wanted <= names


def test_stream_budget_groups_tokens_past_it_first_and_last_at_once(engine):
    """Past the response budget a stream's tokens wait for its gap (streams / budget seconds): one stream at
    one response per 1,000 s sends its first token, then the rest with the finish reason."""
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    sinks = {}
    for budget in (0.0, 1e-3):
        loop = EngineLoop(engine, stream_budget=budget)
        loop.start()
        try:
            sinks[budget] = ListSink()
            loop.submit(Job(prompt_text="a story", params=params, stream=True), sinks[budget])
            sinks[budget].wait()
        finally:
            loop.stop()
    assert [len(c.token_ids) for c in sinks[0.0].chunks] == [1] * 10  # no budget: one response per token
    grouped = sinks[1e-3]
    assert [len(c.token_ids) for c in grouped.chunks] == [1, 9]
    assert grouped.ids == sinks[0.0].ids and grouped.text == sinks[0.0].text
    assert grouped.chunks[-1].finish_reason == "length" and not grouped.chunks[0].finish_reason


def test_stream_budget_caps_each_stream_at_the_max_rate(engine):
    loop = EngineLoop(engine, stream_budget=500.0)
    assert loop._stream_gap() == pytest.approx(1 / engine_loop.STREAM_MAX_RATE)  # one stream: 60/s, not 500/s
    loop._active = {str(i): _Active(job=Job(stream=True), sink=ListSink(), prompt_ids=[1]) for i in range(128)}
    assert loop._stream_gap() == pytest.approx(128 / 500)  # the budget, shared
    assert EngineLoop(engine, stream_budget=0.0)._stream_gap() == 0.0  # no budget: a response per token


def test_stream_budget_resolves_per_core(monkeypatch):

    monkeypatch.setattr(engine_loop.os, "sched_getaffinity", lambda pid: {0, 1})
    assert engine_loop.stream_budget(-1) == 2 * engine_loop.STREAM_BUDGET_PER_CORE
    assert engine_loop.stream_budget(0) == 0.0 and engine_loop.stream_budget(300) == 300.0
    with pytest.raises(ValueError, match="stream_budget"):
        EngineConfig(model_id="x", stream_budget=-2).resolve(128)


class _NativeStepsEngine:
    """Stands in for LLMEngine: each step calls the forward hook as `native[step]` says and gives every request
    one token (`steps_left` each)."""

    def __init__(self, native: list[bool], steps_left: int = 3) -> None:
        self.native, self.steps_left = native, steps_left
        self.hook = None
        self.left: dict[str, int] = {}
        self.steps = 0

    def set_forward_hook(self, hook) -> None:
        self.hook = hook

    def add_request(self, request_id, prompt_ids, params):
        self.left[request_id] = self.steps_left
        return None

    def abort_request(self, request_id) -> None:
        self.left.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.left)

    def stats(self) -> int:
        return 0  # unchanged: no metrics update

    def step(self):
        from types import SimpleNamespace

        self.hook(self.native[self.steps])
        self.steps += 1
        outputs = []
        for rid in list(self.left):
            self.left[rid] -= 1
            done = self.left[rid] == 0
            if done:
                del self.left[rid]
            outputs.append(SimpleNamespace(request_id=rid, new_token_ids=[self.steps], text=str(self.steps),
                                           finished=done, finish_reason="length" if done else None,
                                           num_input_tokens=2, num_output_tokens=self.steps, details=None))
        return outputs


def _queued(loop: EngineLoop) -> list:
    """What the response thread would get, as the loop queued it (lists: one hand-over)."""
    got = []
    while not loop._responses.empty():
        got.append(loop._responses.get_nowait())
    return got


def _job() -> tuple[Job, ListSink, float]:
    """A streamed job as the loop's queue holds it: (job, sink, arrival time)."""
    return Job(prompt_token_ids=[1, 2], stream=True), ListSink(), 0.0


def _stream_loop(native: list[bool], requests: int = 2) -> tuple[EngineLoop, list[ListSink]]:
    engine = _NativeStepsEngine(native)
    loop = EngineLoop(engine)
    engine.set_forward_hook(loop._on_forward)  # what the engine thread does once it built the engine
    jobs = [_job() for _ in range(requests)]
    for job in jobs:
        loop._admit_one(*job)
    return loop, [sink for _, sink, _ in jobs]


def test_an_idle_loop_admits_a_burst_into_its_first_step():
    loop = EngineLoop(_NativeStepsEngine([True]))
    loop.burst_gap, loop.burst_gather_max = WAIT, 1.0  # a job late by far less than the gap joins the burst
    loop._jobs.put(_job())
    late = threading.Timer(0.05, loop._jobs.put, args=(_job(),))
    late.start()
    loop._admit(block=True)
    late.join()
    assert len(loop._active) == 2 and loop._jobs.empty()


def test_a_busy_loop_or_a_zero_gap_admits_only_what_is_queued():
    for block, gap in ((False, WAIT), (True, 0.0)):
        loop = EngineLoop(_NativeStepsEngine([True]))
        loop.burst_gap, loop.burst_gather_max = gap, WAIT  # waiting at all would stall this test for minutes
        loop._jobs.put(_job())
        loop._jobs.put(_job())
        loop._admit(block=block)
        assert len(loop._active) == 2


def test_a_native_steps_responses_go_out_at_the_next_native_call():
    loop, sinks = _stream_loop([True, True, True])
    loop._iterate()  # step 1: its tokens wait for step 2's native call
    assert _queued(loop) == []
    loop._iterate()  # step 2's call hands over step 1's two responses at once
    (first,) = _queued(loop)
    assert isinstance(first, list) and [(s, c.token_ids) for s, c, _ in first] == [(sinks[0], [1]), (sinks[1], [1])]
    loop._iterate()  # step 3 ends both requests: with no step to come, everything goes at the iteration's end
    second, last = _queued(loop)
    assert [c.token_ids for _, c, _ in second] == [[2], [2]]
    assert [(c.token_ids, final) for _, c, final in last] == [([3], True), ([3], True)]


def test_other_steps_send_each_response_at_once_after_what_was_held():
    loop, sinks = _stream_loop([True, False, False])
    loop._iterate()
    assert _queued(loop) == []
    loop._iterate()  # a step on the modules: the held responses go before its forward, its own at once
    held, *now = _queued(loop)
    assert [c.token_ids for _, c, _ in held] == [[1], [1]]
    assert [(sink, c.token_ids) for sink, c, _ in now] == [(sinks[0], [2]), (sinks[1], [2])]


def test_held_responses_keep_their_order_with_errors_and_metrics():
    loop, sinks = _stream_loop([True, True])
    finished = []

    class Observer:
        def on_finish(self, batch) -> None:
            finished.extend(t.finish_reason for t in batch)

        def after_finish(self, batch) -> None:
            pass

        def on_step(self, stats) -> None:
            pass

    loop.observer = Observer()
    loop._active["0"].request = _Timings()
    loop._iterate()
    loop._drop("0", GenerationError("boom"))  # after its held token: the error must not overtake it
    assert _queued(loop) == []
    loop._iterate()
    got = _queued(loop)[0]
    held = [item for item in got if isinstance(item, tuple)]
    assert [(item[0], type(item[1]).__name__) for item in held[:3]] == [
        (sinks[0], "Chunk"), (sinks[1], "Chunk"), (sinks[0], "GenerationError")]
    assert len([item for item in got if type(item) is engine_loop._Finished]) == 1  # with the stats update
    assert loop._respond(got) and finished == ["error"]


def test_a_batch_of_ends_is_counted_before_its_responses_and_observed_after_them():
    """Counters once per batch before any final response (a client holding one sees its request counted),
    histograms after the responses but before a later metrics update (an idle gauge never precedes them)."""
    calls = []

    class Observer:
        def on_finish(self, batch) -> None:
            calls.append(("count", [t.finish_reason for t in batch]))

        def after_finish(self, batch) -> None:
            calls.append(("observe", [t.finish_reason for t in batch]))

    class Sink(ListSink):
        def send(self, chunk, final) -> None:
            calls.append(("send", chunk.token_ids))

    loop = EngineLoop(None, observer=Observer())
    ends = [engine_loop._Finished(_timings_of(reason)) for reason in ("length", "eos_token")]
    sink = Sink()
    items = [(sink, Chunk(token_ids=[1]), False), ends[0], (sink, Chunk(token_ids=[2]), True), ends[1],
             (sink, Chunk(token_ids=[3]), True), lambda: calls.append(("gauge", None)), (sink, Chunk(token_ids=[4]), False)]
    assert loop._respond(items)
    assert calls == [("count", ["length", "eos_token"]), ("send", [1]), ("send", [2]), ("send", [3]),
                     ("observe", ["length", "eos_token"]), ("gauge", None), ("send", [4])]
    calls.clear()
    assert loop._respond(items[:3])  # no later update: observed at the batch's end
    assert calls == [("count", ["length"]), ("send", [1]), ("send", [2]), ("observe", ["length"])]
    calls.clear()
    assert not loop._respond([ends[0], engine_loop._STOP, (sink, Chunk(token_ids=[5]), True)])
    assert calls == [("count", ["length"]), ("observe", ["length"])]


def _timings_of(reason: str):
    from tgi_backend.serving.observer import RequestTimings

    return RequestTimings(arrival_time=0.0, finish_time=1.0, scheduled_time=0.1, first_token_time=0.2,
                          num_prompt_tokens=2, num_cached_tokens=0, num_generated_tokens=3, max_new_tokens=3,
                          finish_reason=reason)


def test_failing_every_request_sends_the_held_responses_then_the_errors_at_once():
    """As the engine thread does after an unexpected error: no later step would carry what is held."""
    loop, sinks = _stream_loop([True, True])
    loop._iterate()
    loop._fail_all(GenerationError("boom"))
    items = [item for got in _queued(loop) for item in (got if isinstance(got, list) else [got])]
    assert [(item[0], type(item[1]).__name__) for item in items] == [
        (sinks[0], "Chunk"), (sinks[1], "Chunk"), (sinks[0], "GenerationError"), (sinks[1], "GenerationError")]
    assert loop._deferred == []


class _Timings:
    scheduled_time = first_token_time = None
    num_prompt_tokens = 2
    num_cached_tokens = 0
    max_new_tokens = 3


def test_a_bf16_engine_streams_through_its_native_calls(tiny_llama_dir: str):
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.kernels.cpu import library

    if library("decoder") is None:
        pytest.skip("no C compiler: no fused decoder")
    engine = LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="bfloat16", max_total_tokens=64,
                                    max_batch_total_tokens=512))
    if engine.runner.fused is None:
        pytest.skip("no fused decoder for bf16 here")
    loop = EngineLoop(engine)
    loop.start()
    native = []
    fused = engine.runner.fused
    hook = fused.on_native
    fused.on_native = lambda: (native.append(1), hook())
    try:
        params = SamplingParams(max_new_tokens=10, ignore_eos=True)
        streamed = [ListSink() for _ in range(3)]
        whole = ListSink()
        for sink in streamed:
            loop.submit(Job(prompt_text="Hello world", params=params, stream=True), sink)
        loop.submit(Job(prompt_text="Hello world", params=params), whole)
        for sink in streamed + [whole]:
            assert sink.wait().error is None and sink.finals == 1
        assert native, "no step went through the fused decoder's native call"
        for sink in streamed:
            assert sink.ids == whole.ids and len(sink.chunks) == 10
            assert whole.chunks[0].text == "Hello world" + sink.text
    finally:
        loop.stop()


def test_a_sink_is_never_polled_once_its_final_response_went_out():
    """tritonserver frees a request's response factory at its final response: a poll racing it crashed the
    server. A poll in flight holds the final response back; after the final, no poll reaches the sink."""
    events = []
    polling, release = threading.Event(), threading.Event()

    class Sink(ListSink):
        def is_cancelled(self) -> bool:
            events.append("poll")
            polling.set()
            release.wait(WAIT)
            events.append("poll done")
            return False

        def send(self, chunk, final) -> None:
            events.append(("send", final))

        def send_error(self, error) -> None:
            events.append("error")

    guarded = engine_loop._GuardedSink(Sink())
    guarded.send(Chunk(token_ids=[1]), False)
    poller = threading.Thread(target=guarded.is_cancelled)
    poller.start()
    assert polling.wait(WAIT)
    sender = threading.Thread(target=guarded.send, args=(Chunk(token_ids=[2]), True))
    sender.start()
    time.sleep(0.05)  # gives the final send the chance to overtake the poll, which it must not take
    release.set()
    poller.join(WAIT)
    sender.join(WAIT)
    assert events == [("send", False), "poll", "poll done", ("send", True)]
    assert guarded.is_cancelled() is False and events[-1] == ("send", True)
    errored = engine_loop._GuardedSink(Sink())
    errored.send_error(GenerationError("boom"))
    assert errored.is_cancelled() is False and events[-1] == "error"


def test_submitted_jobs_reach_the_engine_with_guarded_sinks():
    loop = EngineLoop(_NativeStepsEngine([True]))
    sink = ListSink()
    loop.submit(Job(prompt_token_ids=[1, 2], stream=True), sink)
    _, guarded, _ = loop._jobs.get_nowait()
    assert isinstance(guarded, engine_loop._GuardedSink) and guarded.sink is sink
