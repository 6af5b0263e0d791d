"""The engine thread and the response thread, with no Triton import (testable alone).

`EngineLoop.submit` is called from Triton's execute() and returns at once. The engine thread builds the engine
(`EngineLoop.build`): every torch op then runs on that one thread, because libgomp throttles its spin-waits
once a second thread has run a parallel region, which halved decode speed here. It then admits jobs, ends
the requests found cancelled, runs `engine.step()` while there is work and turns outputs into `Chunk`s; the
response thread hands them to each job's `ResponseSink` in order, so a slow send never stalls a step (those of a
fused decode step go out during the next one's native call, when the GIL is free). A third
thread polls `is_cancelled()` (an IPC round trip in Triton) and tells the engine thread which requests left.
"""
from __future__ import annotations

import functools
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from tgi_backend.engine.request import SamplingParams
from tgi_backend.errors import GenerationError, OverloadedError, TGIError, ValidationError
from tgi_backend.sampling.details import merge as merge_details
from tgi_backend.serving.coalesce import coalesce, extend
from tgi_backend.serving.observer import EngineObserver, RequestTimings

log = logging.getLogger(__name__)
_STOP = object()
# With stream coalescing the response thread yields the cores to the engine's OpenMP threads (a preempted one
# stalls the other at its barrier) and, lagging, merges each request's queued tokens (serving/coalesce.py).
# Small model via Triton on two cores: 32 streams 1,164 -> 1,204 tok/s, 128 streams 1,547 -> 1,689.
RESPONSE_NICENESS = 10
# Each is_cancelled() is an IPC round trip to tritonserver (~150 us under load): polled on the engine thread
# every step, 32 streams spent 12% of it there; every 0.1 s there, 128 streams still 19%. So a thread of its
# own sweeps the requests every CANCEL_POLL_INTERVAL seconds: a client that leaves is noticed that late.
CANCEL_POLL_INTERVAL = 0.1
# Each poll also takes the GIL from the engine thread: 128 streams polled every 0.1 s (1,280 polls/s) ran
# 3,245 tok/s against 3,512 every 1 s (small model, ABBA). So the sweeps space out to at most this many polls
# per second, all requests together: 128 streams are each polled every 1.3 s, 10 or fewer every 0.1 s.
CANCEL_POLLS_PER_SECOND = 100
# Each streamed response costs a fixed price in CPU (the stub's IPC round trip, tritonserver, gRPC, the client):
# one per token took 0.6 of a host's two cores at 128 streams. Past this many responses per second per core, all
# streams together, each stream's tokens are grouped (EngineLoop._hold). On a Zen 3 host the server's side alone
# took 0.3-0.43 ms a response (250 a core: 8-11% of the cores); 125 against 250, two servers alternated, small
# model: 32 streams 1.044x (8 rounds, 1.003-1.166), 128 streams 1.075x (6 rounds, 0.98-1.19).
STREAM_BUDGET_PER_CORE = 125
# Under a budget no stream sends more than a 60 Hz display shows: one stream's ~400 tok/s were a response
# (0.3 ms of serving CPU) per token; grouped, small model via Triton at 1 stream 418 -> 482 tok/s (ABBA).
STREAM_MAX_RATE = 60
# Each gauge or counter update is an IPC round trip to tritonserver too, and the KV gauges moved nearly every
# step: while the engine runs its stats go out at most every STATS_INTERVAL seconds (a Prometheus scrape every
# few seconds sees no difference), and at once when a load starts and when it goes idle. Small model via
# Triton, 32 streams: 4,661 -> 4,926 tok/s (ABBA, 6 rounds), tritonserver's CPU per 1,000 tokens 7 -> 2 ms:
# more than the CPU saved, as python_backend's gauge set() (unlike increment and observe) keeps the GIL
# through its round trip.
STATS_INTERVAL = 0.1
# A burst of requests reaching an idle engine arrives over ~5-15 ms, 0.15-0.5 ms apart. Stepping at the first
# one, the engine ran that lone prompt (18 ms alone) for 18-67 ms while the others' arrivals took CPU and GIL
# from it, and they all waited for it. So an idle engine admits until no job came for BURST_GAP seconds (what a
# lone request's first token waits), BURST_GATHER_MAX at most. Small model via Triton, 32 streams, toggled
# between loads in one server (ABBA): TTFT p50 183 -> 151 ms, tok/s 1.039x (gaps of 1 and 2 ms: 1.019x,
# 1.009x), served / in-process then 0.953 (662 / 631 ms a load; it was ~0.92); 128 streams 1.020x; medium, 32
# streams, 1.067x (TTFT 982 -> 864 ms), once 0.915x on a host that drifts that much between runs. The price:
# one stream 1.001x and 0.987x, TTFT p50 +1.0 and +2.5 ms.
BURST_GAP = 0.0005
BURST_GATHER_MAX = 0.02


def stream_budget(configured: int) -> float:
    """Responses per second for all streams (0: no limit); -1: STREAM_BUDGET_PER_CORE per usable CPU core."""
    if configured >= 0:
        return float(configured)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return float(STREAM_BUDGET_PER_CORE * cores)


def _finish_reason(out: Any) -> str:
    """An engine output's finish reason for its chunk: "" until the request ends."""
    return (out.finish_reason or "") if out.finished else ""


@dataclass(slots=True)
class Job:
    """One inference request as the adapter parsed it."""

    prompt_text: str | None = None
    prompt_token_ids: list[int] | None = None
    params: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = False
    exclude_input_in_output: bool = False
    decode_window: bool = False  # ensemble mode: every chunk carries context/unread ids
    kv_stats: bool = False  # final chunk carries the KV pool's free/total blocks
    stream_interval: int = 1  # tokens per streamed response; the server's --stream-interval may raise it

    @property
    def is_stats_query(self) -> bool:
        return self.kv_stats and self.prompt_text is None and self.prompt_token_ids is None


@dataclass(slots=True)
class Chunk:
    """One response's content. `finish_reason` is "" until the request ends."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    num_input_tokens: int = 0
    num_output_tokens: int = 0
    context_ids: list[int] | None = None
    unread_ids: list[int] | None = None
    kv_blocks: tuple[int, int] | None = None  # (free, total)
    details: dict[str, Any] | None = None  # TGI's details (sampling.details), when the request asked for them


class ResponseSink(Protocol):
    """Where a job's responses go. Called from the response thread only, except is_cancelled."""

    def send(self, chunk: Chunk | None, final: bool) -> None: ...  # None + final: flag-only end

    def send_error(self, error: Exception) -> None: ...  # also ends the request

    def is_cancelled(self) -> bool: ...  # called from the cancellation thread


class _GuardedSink:
    """A job's sink whose is_cancelled (the cancellation thread) never runs once its final response or error
    went out (the response thread): tritonserver frees a request's response factory at its final response, and
    a poll racing that crashed the server (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled)."""

    __slots__ = ("sink", "lock", "ended")

    def __init__(self, sink: ResponseSink) -> None:
        self.sink = sink
        self.lock = threading.Lock()
        self.ended = False

    def send(self, chunk: Chunk | None, final: bool) -> None:
        if not final:
            self.sink.send(chunk, False)
            return
        with self.lock:
            self.ended = True
            self.sink.send(chunk, True)

    def send_error(self, error: Exception) -> None:
        with self.lock:
            self.ended = True
            self.sink.send_error(error)

    def is_cancelled(self) -> bool:
        with self.lock:
            return not self.ended and self.sink.is_cancelled()


@dataclass(slots=True)
class _Finished:
    """A request's end for the observer, queued among its responses (the response thread counts it in bulk)."""

    timings: RequestTimings


@dataclass(slots=True)
class _Active:
    job: Job
    sink: ResponseSink
    prompt_ids: list[int]
    texts: list[str] = field(default_factory=list)  # non-streaming: the whole completion
    output_ids: list[int] = field(default_factory=list)
    window: Any = None  # IncrementalDetokenizer for decode windows
    details: list[Any] = field(default_factory=list)  # non-streaming: each output's details, merged at the end
    request: Any = None  # the engine's Request (timings, token counts)
    arrival_time: float = 0.0  # submitted to the loop
    last_token_time: float | None = None
    inter_token: list[float] = field(default_factory=list)
    interval: int = 1  # tokens per streamed response: the job's or the server's stream interval, the larger
    held: Chunk | None = None  # streamed tokens waiting for the stream interval or the budget's gap
    streamed: bool = False  # a response left already (the first one never waits)
    last_sent: float = 0.0  # when the last response left (engine-thread clock)


class EngineLoop:
    def __init__(
        self, engine: Any, observer: EngineObserver | None = None, coalesce: bool = False, stream_interval: int = 1,
        stream_budget: float = 0.0,
    ) -> None:
        self.engine = engine
        self.observer = observer  # metrics: called on the response thread
        self.coalesce = coalesce  # merge a lagging stream's queued chunks (off: one response per token)
        self.stream_interval = stream_interval  # tokens per streamed response (vLLM's --stream-interval)
        self.stream_budget = stream_budget  # responses per second, all streams (0: one per token)
        self._build: Callable[[], Any] | None = None
        self._build_error: BaseException | None = None
        self._ready = threading.Event()
        self._last_stats: Any = None
        self._stats_time = 0.0  # when the stats were last looked at (engine thread)
        self._published_busy = False  # whether the engine had requests then
        self.stats_interval = STATS_INTERVAL
        self.burst_gap = BURST_GAP  # an idle engine's wait for the next job of a burst (0: none)
        self.burst_gather_max = BURST_GATHER_MAX
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()  # items, or lists of items
        self._deferred: list[Any] = []  # engine thread: items held for the next native call
        self._defer = False  # the last step ran natively: hold its items (_queue)
        self._native = False  # the running step reached its native call
        self._active: dict[str, _Active] = {}  # engine thread only
        self._ids = itertools.count()
        self.cancel_poll_interval = CANCEL_POLL_INTERVAL  # the shortest time between two sweeps
        self.cancel_polls_per_second = CANCEL_POLLS_PER_SECOND
        self._cancelled: queue.SimpleQueue[str] = queue.SimpleQueue()  # request ids, for the engine thread
        self._stopping = threading.Event()
        self._engine_thread = threading.Thread(target=self._run_engine, name="tgi-engine", daemon=True)
        self._response_thread = threading.Thread(target=self._run_responses, name="tgi-responses", daemon=True)
        self._cancel_thread = threading.Thread(target=self._run_cancellation, name="tgi-cancel", daemon=True)

    @classmethod
    def build(
        cls, make_engine: Callable[[], Any], observer: EngineObserver | None = None, coalesce: bool = False,
        stream_interval: int = 1, stream_budget: float = 0.0,
    ) -> EngineLoop:
        """A loop whose engine `make_engine()` creates on the engine thread, in `start()`."""
        loop = cls(None, observer, coalesce, stream_interval, stream_budget)
        loop._build = make_engine
        return loop

    # ---- called by the adapter ----------------------------------------------------------------
    def start(self) -> None:
        """Starts the threads; with `build`, returns once the engine exists and re-raises its failure."""
        self._response_thread.start()
        self._engine_thread.start()
        self._ready.wait()
        if self._build_error is not None:
            self.stop()
            raise self._build_error
        self._cancel_thread.start()

    def submit(self, job: Job, sink: ResponseSink) -> None:
        if self._stopping.is_set():
            sink.send_error(GenerationError("the server is shutting down"))
            return
        self._jobs.put((job, _GuardedSink(sink), time.monotonic()))

    def stop(self, timeout: float = 10.0) -> None:
        """Ends every request (error "shutting down") and joins the threads."""
        self._stopping.set()
        self._jobs.put(_STOP)
        if self._cancel_thread.is_alive():
            self._cancel_thread.join(timeout)
        self._engine_thread.join(timeout)
        self._responses.put(_STOP)
        self._response_thread.join(timeout)

    # ---- engine thread ------------------------------------------------------------------------
    def _run_engine(self) -> None:
        # before torch's first parallel region: its OpenMP workers, cloned from this thread, inherit the name
        name_os_thread("tgi-engine")
        try:
            if self._build is not None:
                self.engine = self._build()
        except BaseException as exc:  # start() re-raises it on the caller's thread
            self._build_error = exc
            return
        finally:
            self._ready.set()
        self.engine.set_forward_hook(self._on_forward)
        while not self._stopping.is_set():
            try:
                self._iterate()
            except Exception as exc:  # a bug outside step(): end what is in flight, keep the thread alive
                log.exception("engine loop iteration failed")
                self._fail_all(GenerationError(f"Request failed during generation: {exc}"))
        self._shutdown_requests()

    def _iterate(self) -> None:
        busy = bool(self._active) or self.engine.has_unfinished_requests()
        self._admit(block=not busy)
        self._end_cancelled()
        if self.engine.has_unfinished_requests():
            self._step()
        self._observe_stats()
        if not self.engine.has_unfinished_requests():  # no step to carry the held items
            self._flush()

    def _admit(self, block: bool) -> None:
        """Admits the queued jobs; when idle (`block`), waits for the first and then for the rest of its burst."""
        try:
            item = self._jobs.get(timeout=0.1) if block else self._jobs.get_nowait()
        except queue.Empty:
            return
        gather_until = time.monotonic() + self.burst_gather_max if block else 0.0
        while item is not None:
            if item is _STOP:
                return
            self._admit_one(*item)
            item = self._next_job(gather_until)

    def _next_job(self, gather_until: float) -> Any:
        """The next queued job, None if there is none; before `gather_until`, one arriving within burst_gap."""
        wait = min(self.burst_gap, gather_until - time.monotonic())
        try:
            return self._jobs.get(timeout=wait) if wait > 0 else self._jobs.get_nowait()
        except queue.Empty:
            return None

    def _admit_one(self, job: Job, sink: ResponseSink, arrival_time: float) -> None:
        try:
            if job.is_stats_query:
                self._emit(sink, Chunk(kv_blocks=self._kv_blocks()), final=True)
                return
            prompt_ids = self._prompt_ids(job)
            request_id = str(next(self._ids))
            request = self.engine.add_request(request_id, prompt_ids, job.params)
        except Exception as exc:  # a bad request must never take the loop down
            error = _as_user_error(exc)
            self._notify("on_reject", _failure_kind(error))  # counted before the client can see the error
            self._queue((sink, error))
            return
        active = _Active(job=job, sink=sink, prompt_ids=prompt_ids, request=request, arrival_time=arrival_time,
                         interval=max(self.stream_interval, job.stream_interval))
        if job.decode_window and job.stream:
            from tgi_backend.tokenizer.detokenizer import IncrementalDetokenizer

            active.window = IncrementalDetokenizer(self.engine.tokenizer, prompt_ids)
        self._active[request_id] = active

    def _prompt_ids(self, job: Job) -> list[int]:
        if job.prompt_token_ids is not None:
            ids = list(job.prompt_token_ids)
        elif job.prompt_text is None:
            raise ValidationError("Input validation error: give `text_input` or `input_ids`")
        elif job.prompt_text == "":
            raise ValidationError("Input validation error: `inputs` cannot be empty")
        else:
            ids = self.engine.tokenize(job.prompt_text)
        if not ids:
            raise ValidationError("Input validation error: `inputs` cannot be empty")
        return ids

    def _end_cancelled(self) -> None:
        """Aborts the requests the cancellation thread found cancelled (those still running)."""
        while True:
            try:
                request_id = self._cancelled.get_nowait()
            except queue.Empty:
                return
            active = self._active.pop(request_id, None)
            if active is None:  # finished meanwhile
                continue
            self.engine.abort_request(request_id)
            self._queue(*self._ended(active, "cancelled"), (active.sink, None, True))

    # ---- cancellation thread ------------------------------------------------------------------
    def _run_cancellation(self) -> None:
        name_os_thread("tgi-cancel")
        while not self._stopping.wait(self._sweep_interval()):
            for request_id, active in list(self._active.items()):  # a snapshot: the engine thread owns the dict
                try:
                    cancelled = active.sink.is_cancelled()
                except Exception:  # the request is gone: treat as cancelled
                    cancelled = True
                if cancelled:
                    self._cancelled.put(request_id)

    def _sweep_interval(self) -> float:
        """Seconds to the next sweep: the poll interval, longer where the requests would pass the poll budget."""
        return max(self.cancel_poll_interval, len(self._active) / self.cancel_polls_per_second)

    def _step(self) -> None:
        self._native = False
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_all(GenerationError(f"Request failed during generation: {exc}"))
            return
        finally:
            self._defer = self._native
        now = time.monotonic()
        gap = self._stream_gap()
        for out in outputs:
            active = self._active.get(out.request_id)
            if active is None:
                continue
            if active.last_token_time is not None:
                active.inter_token.append(now - active.last_token_time)
            active.last_token_time = now
            try:
                self._deliver(active, out, now, gap)
            except Exception as exc:  # e.g. detokenizing failed: end this request only
                log.exception("request %s failed", out.request_id)
                self._drop(out.request_id, GenerationError(f"Request failed during generation: {exc}"))
                continue
            if out.finished:
                del self._active[out.request_id]

    def _stream_gap(self) -> float:
        """Seconds between two responses of one stream that keep all streams within the budget, and each at
        most STREAM_MAX_RATE a second (0: no budget, one response per token)."""
        if not self.stream_budget:
            return 0.0
        streams = sum(1 for a in self._active.values() if a.job.stream)
        return max(streams / self.stream_budget, 1.0 / STREAM_MAX_RATE)

    def _deliver(self, active: _Active, out: Any, now: float, gap: float) -> None:
        job = active.job
        active.output_ids.extend(out.new_token_ids)
        if not job.stream:
            active.texts.append(out.text)
            active.details.append(out.details)
            if out.finished:
                self._finish(active, out, self._whole(active, out))
            return
        chunk = self._hold(active, out, now, gap)
        if chunk is None:
            return
        if active.window is not None:
            _, chunk.context_ids, chunk.unread_ids = active.window.push_with_window(list(out.new_token_ids))
        if out.finished and job.kv_stats:
            chunk.kv_blocks = self._kv_blocks()
        if out.finished:
            self._finish(active, out, chunk)
        else:
            self._emit(active.sink, chunk, final=False)

    def _finish(self, active: _Active, out: Any, chunk: Chunk) -> None:
        # metrics first: a client holding its last response sees the request counted
        self._queue(*self._ended(active, out.finish_reason or "length"), (active.sink, chunk, True))

    # Most steps of a budgeted stream only hold its token: it goes straight into the held chunk (no chunk a
    # token, no merge): 1.45 -> 0.5 us a row (fake engine, 128 streams), ~0.8% of a small model's decode step.
    def _hold(self, active: _Active, out: Any, now: float, gap: float) -> Chunk | None:
        """The streamed chunk to send for `out`, or None while it waits in `active.held`. vLLM's stream interval
        and the response budget: the first response and the last leave at once, the others once they hold
        `interval` tokens and `gap` seconds have passed since the stream's last response."""
        interval = active.interval
        if (interval == 1 and not gap) or active.window is not None:  # decode windows: the ensemble's protocol
            return self._stream_chunk(out)
        held = active.held
        if held is None:
            held = self._stream_chunk(out)
        else:  # the held chunk is this stream's alone until it leaves
            extend(held, out.text, out.new_token_ids, _finish_reason(out), out.num_output_tokens, out.details)
        if active.streamed and not out.finished and (len(held.token_ids) < interval or now - active.last_sent < gap):
            active.held = held
            return None
        active.held = None
        active.streamed, active.last_sent = True, now
        return held

    def _stream_chunk(self, out: Any) -> Chunk:
        chunk = self._chunk(out, out.text, list(out.new_token_ids))
        chunk.details = out.details
        return chunk

    def _whole(self, active: _Active, out: Any) -> Chunk:
        """The one non-streaming response: prompt + completion unless exclude_input_in_output."""
        job = active.job
        text = "".join(active.texts)
        if not job.exclude_input_in_output and job.params.detokenize:
            text = self._prompt_text(active) + text
        chunk = self._chunk(out, text, list(active.output_ids))
        chunk.details = merge_details(active.details)
        if job.decode_window:
            chunk.context_ids = []
            prefix = [] if job.exclude_input_in_output else list(active.prompt_ids)
            chunk.unread_ids = prefix + list(active.output_ids)
        if job.kv_stats:
            chunk.kv_blocks = self._kv_blocks()
        return chunk

    def _prompt_text(self, active: _Active) -> str:
        if active.job.prompt_text is not None:
            return active.job.prompt_text
        return self.engine.tokenizer.decode(active.prompt_ids, skip_special_tokens=True)

    @staticmethod
    def _chunk(out: Any, text: str, token_ids: list[int]) -> Chunk:
        return Chunk(
            text=text,
            token_ids=token_ids,
            finish_reason=_finish_reason(out),
            num_input_tokens=out.num_input_tokens,
            num_output_tokens=out.num_output_tokens,
        )

    def _kv_blocks(self) -> tuple[int, int]:
        pool = self.engine.block_pool
        return pool.num_free_blocks, pool.num_total_blocks

    def _drop(self, request_id: str, error: Exception) -> None:
        active = self._active.pop(request_id, None)
        try:
            self.engine.abort_request(request_id)
        except Exception:
            log.exception("abort of %s failed", request_id)
        if active is not None:
            self._queue((active.sink, error), *self._ended(active, "error"))

    def _fail_all(self, error: Exception) -> None:
        for request_id in list(self._active):
            self._drop(request_id, error)
        self._flush()  # no step is left to carry the held items

    def _shutdown_requests(self) -> None:
        error = GenerationError("the server is shutting down")
        self._fail_all(error)
        while True:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                self._flush()
                return
            if item is not _STOP:
                self._queue((item[1], error))

    def _emit(self, sink: ResponseSink, chunk: Chunk | None, final: bool) -> None:
        self._queue((sink, chunk, final))

    # The response thread needs the GIL for each response; amid a step's Python (or torch ops, each handing the GIL
    # back) it stalls the engine thread. So what a fused decode step produced is queued at the next step's native
    # call, which holds no GIL for milliseconds (LLMEngine.set_forward_hook). Small model via Triton, 32 streams,
    # toggled every 40 steps in one server, decode tok/s: 0.99-1.06x in 6 runs (median 1.025); medium 1.033x and
    # 1.017x. After steps on the modules (hundreds of ops) each item still goes at once.
    def _queue(self, *items: Any) -> None:
        """To the response thread, in order and in one hand-over (a request's end reaches the response thread's
        batch with its last response): held while the last step ran natively, at once otherwise."""
        if self._defer:
            self._deferred.extend(items)
            return
        self._flush()
        self._responses.put(items[0] if len(items) == 1 else list(items))

    def _flush(self) -> None:
        if self._deferred:
            items, self._deferred = self._deferred, []
            self._responses.put(items)

    def _on_forward(self, native: bool) -> None:
        """The engine's forward hook (engine thread): the held items go now, amid the native call's free GIL,
        or before the modules' forward where the step runs there."""
        self._native = native
        self._flush()

    # ---- metrics (the observer runs on the response thread) -------------------------------------
    def _notify(self, method: str, *args: Any) -> None:
        if self.observer is not None:
            self._queue(functools.partial(getattr(self.observer, method), *args))

    def _observe_stats(self) -> None:
        if self.observer is None:
            return
        now = time.monotonic()
        busy = self.engine.has_unfinished_requests()
        # a load's first state goes at once: one shorter than the interval that came soon after the last idle
        # state would otherwise never show
        if busy and self._published_busy and now - self._stats_time < self.stats_interval:
            return
        self._stats_time = now
        self._published_busy = busy
        stats = self.engine.stats()
        if stats != self._last_stats:
            self._last_stats = stats
            self._notify("on_step", stats)

    def _ended(self, active: _Active, reason: str) -> tuple[Any, ...]:
        """The request's end for the observer, to queue with its last response (none without an observer)."""
        if self.observer is None or active.request is None:
            return ()
        r = active.request
        return (_Finished(RequestTimings(
            arrival_time=active.arrival_time, finish_time=time.monotonic(), scheduled_time=r.scheduled_time,
            first_token_time=r.first_token_time, num_prompt_tokens=r.num_prompt_tokens,
            num_cached_tokens=r.num_cached_tokens, num_generated_tokens=len(active.output_ids),
            max_new_tokens=r.max_new_tokens, finish_reason=reason, inter_token_latencies=active.inter_token,
        )),)

    # ---- response thread ----------------------------------------------------------------------
    def _run_responses(self) -> None:
        name_os_thread("tgi-responses")
        if self.coalesce:
            _lower_priority(RESPONSE_NICENESS)
        while True:
            got = self._responses.get()
            items = got if type(got) is list else [got]
            while self.coalesce:  # everything queued meanwhile: a lagging thread merges each request's chunks
                try:
                    got = self._responses.get_nowait()
                except queue.Empty:
                    break
                items.extend(got if type(got) is list else [got])
            if not self._respond(coalesce(items) if self.coalesce else items):
                return

    # Each metric update is an IPC round trip to tritonserver (~13 us): 11 per finished request (3 counters, 8
    # histograms) went before each final response. Small model via Triton, 32 streams ending in one step, from
    # the last step's end to the client's last token: 13.8 -> 5.6 ms (median of 12 loads, toggled in one server);
    # 128 streams 20.5 -> 15.4 ms.
    def _respond(self, items: list[Any]) -> bool:
        """Sends one batch of items in order; False at the stop marker. The batch's finished requests are
        counted once before anything leaves (a client holding its final response sees its request counted),
        their distributions observed after the responses, ahead of any later metrics update."""
        ended = [item.timings for item in items if type(item) is _Finished]
        self._observe("on_finish", ended)
        pending = ended  # for after_finish
        stopped = False
        for item in items:
            if item is _STOP:
                stopped = True
                break
            if type(item) is _Finished:
                continue
            try:
                if callable(item):  # a metrics update
                    self._observe("after_finish", pending)
                    pending = []
                    item()
                elif len(item) == 2:
                    item[0].send_error(item[1])
                else:
                    item[0].send(item[1], item[2])
            except Exception:  # the client is gone (cancellation polling ends the request), or a metric failed
                log.warning("sending a response or a metric failed", exc_info=True)
        self._observe("after_finish", pending)
        return not stopped

    def _observe(self, method: str, timings: list[RequestTimings]) -> None:
        if not timings or self.observer is None:
            return
        try:
            getattr(self.observer, method)(timings)
        except Exception:
            log.warning("a metrics update failed", exc_info=True)


def name_os_thread(name: str) -> None:
    """Names the calling thread for top -H, ps and /proc (Linux, 15 bytes), best effort: the benchmark tells
    the engine's CPU time from the serving stack's by it."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _lower_priority(niceness: int) -> None:
    """Raises this thread's nice value (Linux: per thread), best effort."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (AttributeError, OSError):
        pass


def _failure_kind(error: Exception) -> str:
    if isinstance(error, ValidationError):
        return "validation"
    return "overloaded" if isinstance(error, OverloadedError) else "generation"


def _as_user_error(exc: Exception) -> Exception:
    if isinstance(exc, TGIError):
        return exc
    log.exception("request rejected by an unexpected error", exc_info=exc)
    return GenerationError(f"Request failed during generation: {exc}")
