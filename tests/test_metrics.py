"""Metrics without Triton: what the engine loop reports to an observer, and how EngineMetrics maps it."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import pytest

from tgi_backend.config import EngineConfig
from tgi_backend.engine.engine import EngineStats
from tgi_backend.engine.request import SamplingParams
from tgi_backend.serving.engine_loop import Chunk, EngineLoop, Job
from tgi_backend.serving.metrics import DURATION_BUCKETS, GAUGES, HISTOGRAMS, INTER_TOKEN, EngineMetrics, token_buckets
from tgi_backend.serving.observer import RequestTimings

WAIT = 120.0  # a bound for a stuck loop, not a timing assertion


class Sink:
    def __init__(self, cancel_after: int | None = None) -> None:
        self.chunks: list[Chunk | None] = []
        self.error: Exception | None = None
        self.done = threading.Event()
        self.cancel_after = cancel_after

    def send(self, chunk: Chunk | None, final: bool) -> None:
        self.chunks.append(chunk)
        if final:
            self.done.set()

    def send_error(self, error: Exception) -> None:
        self.error = error
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.chunks) >= self.cancel_after

    def wait(self) -> "Sink":
        assert self.done.wait(WAIT), "the request never finished"
        return self


class RecordingObserver:
    def __init__(self) -> None:
        self.steps: list[EngineStats] = []
        self.finished: list[RequestTimings] = []
        self.observed: list[RequestTimings] = []
        self.rejected: list[str] = []
        self.threads: set[str] = set()

    def on_step(self, stats: EngineStats) -> None:
        self.threads.add(threading.current_thread().name)
        self.steps.append(stats)

    def on_finish(self, batch: list[RequestTimings]) -> None:
        self.threads.add(threading.current_thread().name)
        self.finished.extend(batch)

    def after_finish(self, batch: list[RequestTimings]) -> None:
        self.threads.add(threading.current_thread().name)
        self.observed.extend(batch)

    def on_reject(self, kind: str) -> None:
        self.rejected.append(kind)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: str):
    from tgi_backend.engine.engine import LLMEngine

    config = EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_total_tokens=64,
                          max_batch_total_tokens=512, max_concurrent_requests=4)
    return LLMEngine(config)


def _run(engine: Any, jobs: list[tuple[Job, Sink]], stats_interval: float = 0.0) -> RecordingObserver:
    observer = RecordingObserver()
    loop = EngineLoop(engine, observer=observer)
    loop.cancel_poll_interval = 0.005  # the tiny model's 50 tokens take less than the default 0.1 s
    loop.cancel_polls_per_second = 1e6
    loop.stats_interval = stats_interval  # and the stats' interval
    loop.start()
    try:
        for job, sink in jobs:
            loop.submit(job, sink)
        for _, sink in jobs:
            sink.wait()
    finally:
        loop.stop()  # joins the response thread: every observer call has run
    return observer


def test_loop_reports_steps_finishes_and_rejections(engine):
    ok = [(Job(prompt_token_ids=[5, 6, 7, 8] * (i + 1), params=SamplingParams(max_new_tokens=6, ignore_eos=True),
               stream=True), Sink()) for i in range(3)]
    cancelled = (Job(prompt_token_ids=[9, 10, 11], params=SamplingParams(max_new_tokens=50, ignore_eos=True),
                     stream=True), Sink(cancel_after=2))
    invalid = (Job(prompt_token_ids=[1] * 100), Sink())  # longer than max_total_tokens
    stats_query = (Job(kv_stats=True), Sink())  # not a request: never reported
    observer = _run(engine, ok + [cancelled, invalid, stats_query])

    assert observer.threads == {"tgi-responses"}  # never the engine thread
    assert observer.rejected == ["validation"]
    by_reason = sorted(t.finish_reason for t in observer.finished)
    assert by_reason == ["cancelled", "length", "length", "length"]
    for t in observer.finished:
        assert t.arrival_time <= t.scheduled_time <= t.first_token_time <= t.finish_time
        assert len(t.inter_token_latencies) == t.num_generated_tokens - 1
        assert all(gap >= 0 for gap in t.inter_token_latencies)
        if t.succeeded:
            assert t.num_generated_tokens == t.max_new_tokens == 6
            assert t.time_to_first_token <= t.duration
            assert t.mean_time_per_token == pytest.approx(t.inference_duration / 6)
    assert sorted(t.num_prompt_tokens for t in observer.finished if t.succeeded) == [4, 8, 12]
    assert sorted(map(id, observer.observed)) == sorted(map(id, observer.finished))
    assert any(s.num_running > 0 and s.kv_blocks_used > 0 for s in observer.steps)
    last = observer.steps[-1]
    assert (last.num_running, last.num_waiting, last.kv_blocks_used) == (0, 0, 0)
    assert last.kv_blocks_free == last.kv_blocks_total
    assert all(a != b for a, b in zip(observer.steps, observer.steps[1:]))  # only changes are reported


def test_stats_go_out_at_most_once_per_interval_while_busy_and_when_idle(engine):
    jobs = [(Job(prompt_token_ids=[5, 6, 7, 8], params=SamplingParams(max_new_tokens=30, ignore_eos=True),
                 stream=True), Sink()) for _ in range(2)]
    observer = _run(engine, jobs, stats_interval=60.0)  # each stats update is an IPC round trip in Triton
    busy = [s for s in observer.steps if s.num_running or s.num_waiting]
    assert len(busy) == 1  # the load's first state goes at once (it may be shorter than the interval), no more
    assert len(observer.steps) <= 3 and busy[0].kv_blocks_used > 0  # and the idle state before the jobs came
    last = observer.steps[-1]  # ... but the idle state at the end always
    assert (last.num_running, last.kv_blocks_used) == (0, 0) and last.kv_blocks_free == last.kv_blocks_total


def test_overload_is_reported_as_overloaded(engine):
    jobs = [(Job(prompt_token_ids=[3, 4, 5], params=SamplingParams(max_new_tokens=40, ignore_eos=True)), Sink())
            for _ in range(8)]
    observer = _run(engine, jobs)
    errors = [s.error for _, s in jobs if s.error is not None]
    assert len(errors) == len(observer.rejected) >= 1
    assert set(observer.rejected) == {"overloaded"}
    assert len(observer.finished) + len(observer.rejected) == 8


# ---- EngineMetrics with a fake pb_utils -----------------------------------------------------------
@dataclass
class FakeMetric:
    labels: dict
    buckets: list | None
    value: float = 0.0
    sets: int = 0
    increments: int = 0
    observed: list = field(default_factory=list)

    def set(self, v: float) -> None:
        self.value, self.sets = v, self.sets + 1

    def increment(self, v: float) -> None:
        assert v >= 0, "a counter only grows"
        self.value += v
        self.increments += 1

    def observe(self, v: float) -> None:
        self.observed.append(v)


class FakeFamily:
    COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"
    created: dict[str, "FakeFamily"] = {}

    def __init__(self, name: str, description: str, kind: str) -> None:
        assert name not in FakeFamily.created, f"family {name} created twice"
        self.name, self.kind, self.metrics = name, kind, []
        FakeFamily.created[name] = self

    def Metric(self, labels: dict, buckets: list | None = None) -> FakeMetric:  # noqa: N802 (pb_utils' name)
        assert (buckets is not None) == (self.kind == "histogram")
        metric = FakeMetric(dict(labels), buckets)
        self.metrics.append(metric)
        return metric


class FakePb:
    MetricFamily = FakeFamily


def _stats(**kw: int) -> EngineStats:
    base = dict(num_running=0, num_waiting=0, kv_blocks_total=32, kv_blocks_free=32, kv_blocks_cached=0,
                prompt_tokens=0, cached_tokens=0, preemptions=0)
    return EngineStats(**{**base, **kw})


def _timings(reason: str = "length", generated: int = 4) -> RequestTimings:
    return RequestTimings(arrival_time=10.0, finish_time=11.0, scheduled_time=10.25, first_token_time=10.5,
                          num_prompt_tokens=20, num_cached_tokens=16, num_generated_tokens=generated,
                          max_new_tokens=8, finish_reason=reason, inter_token_latencies=[0.1] * (generated - 1))


@pytest.fixture(params=[True, False], ids=["inter-token", "default"])
def metrics(request) -> EngineMetrics:
    FakeFamily.created = {}
    return EngineMetrics(FakePb, {"model": "tgi_llm", "version": "1"}, max_total_tokens=100, inter_token=request.param)


def _metric(name: str, **labels: str) -> FakeMetric:
    for m in FakeFamily.created[name].metrics:
        if all(m.labels.get(k) == v for k, v in labels.items()):
            return m
    raise KeyError(name)


def test_families_use_tgi_names_and_model_labels(metrics):
    for name in ("tgi_queue_size", "tgi_batch_current_size", "tgi_request_queue_duration", "tgi_request_duration",
                 "tgi_request_input_length", "tgi_request_generated_tokens", "tgi_request_count",
                 "tgi_request_success", "tgi_request_failure", "tgi_request_mean_time_per_token_duration"):
        assert name in FakeFamily.created
    for family in FakeFamily.created.values():
        for m in family.metrics:
            assert m.labels["model"] == "tgi_llm" and m.labels["version"] == "1"
    assert _metric("tgi_request_duration").buckets == DURATION_BUCKETS
    assert _metric("tgi_request_input_length").buckets == token_buckets(100) == [1, 2, 4, 8, 16, 32, 64, 128]
    assert metrics.families.keys() == FakeFamily.created.keys()  # kept alive by the instance


def test_gauges_set_on_change_and_counters_grow_by_deltas(metrics):
    metrics.on_step(_stats(num_running=2, num_waiting=1, kv_blocks_free=20, kv_blocks_cached=3,
                           prompt_tokens=40, cached_tokens=10, preemptions=1))
    assert _metric("tgi_batch_current_size").value == 2
    assert _metric("tgi_queue_size").value == 1
    assert _metric("tgi_kv_cache_blocks_used").value == 12
    assert _metric("tgi_kv_cache_blocks_free").value == 20
    assert _metric("tgi_kv_cache_blocks_total").value == 32
    assert _metric("tgi_prefix_cache_hit_rate").value == pytest.approx(0.25)
    metrics.on_step(_stats(num_running=2, num_waiting=0, kv_blocks_free=20, kv_blocks_cached=3,
                           prompt_tokens=60, cached_tokens=10, preemptions=1))
    assert _metric("tgi_batch_current_size").sets == 1  # unchanged: not sent again
    assert _metric("tgi_queue_size").value == 0
    assert _metric("tgi_prompt_tokens_total").value == 60
    assert _metric("tgi_prefix_cache_tokens_total").value == 10
    assert _metric("tgi_preemptions_total").value == 1
    metrics.on_step(_stats(num_running=2, kv_blocks_free=20, kv_blocks_cached=3, prompt_tokens=60, cached_tokens=10,
                           preemptions=1, draft_tokens=8, accepted_tokens=5))
    assert (_metric("tgi_spec_decode_draft_tokens_total").value, _metric("tgi_spec_decode_accepted_tokens_total").value) == (8, 5)
    metrics.on_step(_stats(kv_blocks_cached=3, prompt_tokens=60, cached_tokens=10, preemptions=1))
    assert _metric("tgi_batch_current_size").value == 0
    assert _metric("tgi_kv_cache_blocks_used").value == 0
    assert _metric("tgi_kv_cache_blocks_cached").value == 3  # cached free blocks count as free


def test_finish_and_reject_fill_counters_and_histograms(metrics):
    batch = [_timings(), _timings("cancelled", generated=2)]
    metrics.on_finish(batch)
    assert _metric("tgi_request_count").increments == 1  # each update is a round trip: one per batch
    assert _metric("tgi_request_duration").observed == []  # the histograms come after the final responses
    metrics.after_finish(batch)
    metrics.on_reject("overloaded")
    metrics.on_reject("validation")
    assert _metric("tgi_request_count").value == 4
    assert _metric("tgi_request_success").value == 1
    assert _metric("tgi_request_failure", err="cancelled").value == 1
    assert _metric("tgi_request_failure", err="overloaded").value == 1
    assert _metric("tgi_request_failure", err="validation").value == 1
    assert _metric("tgi_generated_tokens_total").value == 6
    assert _metric("tgi_request_duration").observed == [pytest.approx(1.0)]  # successes only, as TGI
    assert _metric("tgi_request_queue_duration").observed == [pytest.approx(0.25)]
    assert _metric("tgi_request_time_to_first_token_duration").observed == [pytest.approx(0.5)]
    assert _metric("tgi_request_inference_duration").observed == [pytest.approx(0.75)]
    assert _metric("tgi_request_mean_time_per_token_duration").observed == [pytest.approx(0.75 / 4)]
    assert _metric("tgi_request_input_length").observed == [20]
    assert _metric("tgi_request_generated_tokens").observed == [4]
    if metrics.inter_token:  # one sample per token after the first
        assert _metric(INTER_TOKEN).observed == [pytest.approx(0.1)] * 3
    else:  # no family at all: each sample would be a round trip to tritonserver
        assert INTER_TOKEN not in FakeFamily.created
    assert set(HISTOGRAMS) | set(GAUGES) <= set(FakeFamily.created)
