"""Continuous batching under a per-step token budget. Ints only, no torch.

There are no prefill and decode phases. Each request has `num_computed_tokens` and `num_tokens`; every step
hands out tokens so that the first catches up with the second. Running requests go first (oldest first), so a
decode is never starved by a long prompt; the rest of the budget goes to waiting requests, first in, first out,
a prompt longer than what is left being split across steps (chunked prefill). When the pool runs short, the
newest running request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its tokens later.
"""
from __future__ import annotations

import time
from collections import deque

from tgi_backend.config import EngineConfig
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.kv_cache import KVCacheManager
from tgi_backend.engine.request import FinishReason, Request, RequestStatus
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from tgi_backend.errors import OverloadedError


class Scheduler:
    def __init__(self, config: EngineConfig, pool: BlockPool) -> None:
        self.config = config
        self.kv = KVCacheManager(pool, config.block_size, config.enable_prefix_caching)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._left: list[str] = []  # ids that finished or were aborted since the last schedule()
        self.num_preemptions = 0
        self.num_prompt_tokens = 0  # prompt tokens admitted, and how many of them the prefix cache supplied
        self.num_cached_tokens = 0

    # ---- queue ----------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if len(self.requests) >= self.config.max_concurrent_requests:
            raise OverloadedError()
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None or request.is_finished:
            return
        if request.status is RequestStatus.WAITING:
            self.waiting.remove(request)
        else:
            self.running.remove(request)
        self._finish(request, FinishReason.CANCELLED)

    def get_request(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    # ---- the step -------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput(finished_request_ids=self._left)
        self._left = []
        budget = self.config.max_batch_prefill_tokens
        preempted = self._schedule_running(out, budget)
        budget -= out.num_tokens
        if not preempted:
            self._schedule_waiting(out, budget)
        out.block_copies, self.kv.pending_copies = self.kv.pending_copies, []
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> bool:
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, n):
                victim = self.running.pop()
                self._preempt(victim)
                preempted = True
                if victim is request:
                    return preempted
            out.chunks.append(self._chunk(request, n))
            budget -= n
            i += 1
        return preempted

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.find_cached_blocks(request)
            n = request.num_tokens - request.num_computed_tokens - len(cached) * self.config.block_size
            n = min(n, budget)
            if request.block_ids:  # a forked request comes with its parent's blocks
                if not self.kv.allocate_slots(request, n):
                    break
            else:
                if not self.kv.admit(request, cached, n):
                    break
                self.num_prompt_tokens += request.num_tokens
                self.num_cached_tokens += request.num_cached_tokens
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            if request.scheduled_time is None:
                request.scheduled_time = time.monotonic()
            self.running.append(request)
            out.chunks.append(self._chunk(request, n))
            budget -= n

    def _chunk(self, request: Request, n: int) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + n],
            start_pos=start,
            block_ids=request.block_ids,
            sample=start + n == request.num_tokens,
            sampling=request.sampling,
            num_output_tokens=request.num_output_tokens,
        )

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    # ---- after the model ran --------------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, result: ModelRunnerOutput) -> list[Request]:
        """Advances computed tokens, appends sampled tokens, finishes requests; returns the finished ones."""
        for chunk in out.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None:
                request.num_computed_tokens += len(chunk.token_ids)
                self.kv.register_computed_blocks(request)
        finished: list[Request] = []
        for request_id, token_id in zip(result.request_ids, result.sampled_token_ids):
            request = self.requests.get(request_id)
            if request is None or request.is_finished:
                continue
            request.append_token(token_id)
            reason = request.check_stop()
            if reason is not None:
                self.running.remove(request)
                self._finish(request, reason)
                finished.append(request)
        return finished

    def forget(self, finished: list[Request]) -> None:
        """Drops finished requests from the id map once their outputs were built."""
        for request in finished:
            self.requests.pop(request.request_id, None)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.kv.free(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._left.append(request.request_id)
