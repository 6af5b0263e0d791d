"""Continuous batching under a per-step token budget. Ints only, no torch.

There are no prefill and decode phases. Each request has `num_computed_tokens` and `num_tokens`; every step
hands out tokens so that the first catches up with the second. Running requests go first (oldest first), so a
decode is never starved by a long prompt; the rest of the budget goes to waiting requests, first in, first out,
a prompt longer than what is left being split across steps (chunked prefill). When the pool runs short, the
newest running request is preempted: its blocks are freed and it goes back to the front of the queue, to be
recomputed from its tokens later.

With speculation, a decoding request's step also carries draft tokens (engine/ngram.py); the runner verifies
them, and computed tokens advance over the accepted ones only: the rejected positions are written again later.
With multi-step decoding, a few plain greedy decoding requests hold slots for a few positions ahead, and the
runner may run that many more decode steps at once, its tokens fed back; computed tokens advance over them.
"""
from __future__ import annotations

import time
from collections import deque

from tgi_backend.config import EngineConfig
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.kv_cache import KVCacheManager
from tgi_backend.engine.ngram import NgramDrafter
from tgi_backend.engine.request import FinishReason, Request, RequestStatus
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, ScheduledChunk, SchedulerOutput
from tgi_backend.errors import OverloadedError

# Drafts only while at most this many requests run: a larger batch keeps the CPU busy already, and the
# rejected drafts would cost compute the other rows need.
SPECULATE_MAX_ROWS = 8
# A fully rejected draft costs a step of 1 + k rows for one token: the request then drafts again only after
# 1, 2, 4, ... steps, up to this many (text that does not repeat itself costs a few percent, not 40%).
MAX_DRAFT_BACKOFF = 32
# Multi-step decoding (EngineConfig.decode_steps) only while at most this many requests run: it saves the
# engine's fixed Python per step (~0.4 ms here), a large share of few rows' steps only; the engine's
# MULTI_STEP_WINDOW bounds how long a request arriving meanwhile waits.
MULTI_STEP_MAX_ROWS = 8


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
        self.drafter = NgramDrafter()
        self.num_draft_tokens = 0  # drafts verified so far, and how many of them were accepted
        self.num_accepted_tokens = 0
        self.max_lookahead = 0  # multi-step: steps a request may run ahead now (the engine sets it from their time)

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
        # multi-step's per-step conditions once (the running list only shrinks below; a preemption fills waiting)
        ahead_ok = self.max_lookahead > 0 and len(self.running) <= MULTI_STEP_MAX_ROWS
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            drafts = self._drafts(request, budget) if n == 1 else []
            if drafts and self.kv.allocate_slots(request, n + len(drafts)):
                out.chunks.append(self._chunk(request, n, drafts))
                budget -= n + len(drafts)
                i += 1
                continue
            ahead = self._lookahead(request, budget) if ahead_ok and n == 1 and not drafts else 0
            if ahead and self.kv.allocate_slots(request, n + ahead):  # never preempts for it
                out.chunks.append(self._chunk(request, n, lookahead=ahead))
                budget -= n + ahead
                i += 1
                continue
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

    def _drafts(self, request: Request, budget: int) -> list[int]:
        """Draft tokens for a decoding request; none past SPECULATE_MAX_ROWS running requests. Never more
        than the request may still generate after this step's own token."""
        if not request.speculate or len(self.running) > SPECULATE_MAX_ROWS:
            return []
        if request.draft_wait > 0:
            request.draft_wait -= 1
            return []
        k = min(request.speculate, budget - 1, request.max_new_tokens - request.num_output_tokens - 1)
        sp = request.sampling
        never = sp.stop_token_ids if sp.ignore_eos else (*sp.stop_token_ids, *request.eos_token_ids)
        return self.drafter.propose(request.request_id, request.token_ids, k, never)

    def _lookahead(self, request: Request, budget: int) -> int:
        """Decode steps past this one to hold slots for (multi-step, at most MULTI_STEP_MAX_ROWS running: the
        caller's check): none while a request waits (it would wait for them all) or with fewer free blocks than
        running requests (the slots held ahead must not take the block another row's next token needs); never
        past the last token."""
        if not request.lookahead or self.waiting or self.kv.pool.num_free_blocks <= len(self.running):
            return 0
        return max(0, min(request.lookahead, self.max_lookahead, budget - 1,
                          request.max_new_tokens - request.num_output_tokens - 1))

    def _chunk(self, request: Request, n: int, drafts: list[int] | None = None, lookahead: int = 0) -> ScheduledChunk:
        start = request.num_computed_tokens
        return ScheduledChunk(
            request_id=request.request_id,
            token_ids=request.token_ids[start : start + n] + (drafts or []),
            start_pos=start,
            block_ids=request.block_ids,
            sample=start + n == request.num_tokens,
            sampling=request.sampling,
            num_output_tokens=request.num_output_tokens,
            num_draft=len(drafts) if drafts else 0,
            num_lookahead=lookahead,
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
        computed: list[Request] = []
        for chunk in out.chunks:
            request = self.requests.get(chunk.request_id)
            if request is not None:
                rejected = chunk.num_draft - result.num_accepted.get(chunk.request_id, 0)
                ahead = result.num_ahead.get(chunk.request_id, 0)  # steps run past the chunk's own token
                request.num_computed_tokens += len(chunk.token_ids) - rejected + ahead
                if ahead:  # the tokens whose K/V it wrote are appended below: their blocks hash after
                    computed.append(request)
                elif chunk.num_draft:  # its accepted drafts are not appended yet: their blocks hash below
                    computed.append(request)
                    _back_off(request, accepted=chunk.num_draft - rejected)
                    self.num_draft_tokens += chunk.num_draft
                    self.num_accepted_tokens += chunk.num_draft - rejected
                else:
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
        for request in computed:
            if not request.is_finished:
                self.kv.register_computed_blocks(request)
        return finished

    def forget(self, finished: list[Request]) -> None:
        """Drops finished requests from the id map once their outputs were built."""
        for request in finished:
            self.requests.pop(request.request_id, None)

    def _finish(self, request: Request, reason: FinishReason) -> None:
        self.kv.free(request)
        self.drafter.forget(request.request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self._left.append(request.request_id)


def _back_off(request: Request, accepted: int) -> None:
    if accepted:
        request.draft_backoff = 0
        return
    request.draft_backoff = min(max(1, 2 * request.draft_backoff), MAX_DRAFT_BACKOFF)
    request.draft_wait = request.draft_backoff
