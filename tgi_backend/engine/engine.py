"""The engine: add_request / abort_request / step, where step = schedule, execute, update. Single-threaded."""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from tgi_backend.config import EngineConfig
from tgi_backend.engine.best_of import Group
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.request import FinishReason, Request, SamplingParams
from tgi_backend.engine.scheduler import MULTI_STEP_MAX_ROWS, Scheduler
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tgi_backend.errors import OverloadedError, ValidationError
from tgi_backend.sampling import details as D
from tgi_backend.sampling.stop import StopMatcher


@dataclass(slots=True)
class EngineStats:
    """A snapshot for metrics: queue, batch, KV pool and prefix cache."""

    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    kv_blocks_cached: int
    prompt_tokens: int  # prompt tokens admitted so far (recomputed ones included)
    cached_tokens: int  # of which the prefix cache supplied
    preemptions: int
    draft_tokens: int = 0  # speculation: drafts verified so far, and how many were accepted
    accepted_tokens: int = 0

    @property
    def kv_blocks_used(self) -> int:
        return self.kv_blocks_total - self.kv_blocks_free

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request: new token ids and the text they complete."""

    request_id: str
    new_token_ids: list[int]
    text: str  # text delta; may be "" while a multi-byte character is incomplete
    finished: bool
    finish_reason: str | None
    num_input_tokens: int
    num_output_tokens: int
    details: dict[str, Any] | None = None  # TGI's details for these tokens (sampling.details), if asked


@dataclass(slots=True)
class _State:
    """The engine's side of a request: detokenizer, stop strings, prompt logprobs, best_of group."""

    request: Request
    detok: Any  # IncrementalDetokenizer; None when the request needs no text
    stop: StopMatcher | None = None
    prompt_logprobs: dict[int, float] | None = None  # position -> logprob (decoder_input_details)
    group: Group | None = None


# Multi-step decoding holds a request that arrives meanwhile until its steps end: they run at most this many
# seconds (small model, one row: 4 steps of ~2.6 ms here; medium, ~14 ms a step: one at a time).
MULTI_STEP_WINDOW = 0.012


class LLMEngine:
    """Owns the scheduler, the model runner and the detokenizers. Not thread-safe: one thread calls it."""

    def __init__(self, config: EngineConfig, *, model_path: str | None = None) -> None:
        from tgi_backend.engine.model_runner import ModelRunner
        from tgi_backend.tokenizer.loader import load_tokenizer
        from tgi_backend.weights.hub import resolve_model_path

        self.model_path = model_path or resolve_model_path(config.model_id, config.revision)
        hf_config = _read_json(os.path.join(self.model_path, "config.json"))
        max_pos = int(hf_config.get("max_position_embeddings") or 4096)
        self.config = config.resolve(max_pos)
        self.tokenizer = load_tokenizer(self.model_path)
        self.eos_token_ids = _eos_token_ids(self.model_path, hf_config, self.tokenizer)
        self.runner = ModelRunner(self.config, self.model_path)
        self.runner.sampler.set_eos_token_ids(self.eos_token_ids)
        self.block_pool = BlockPool(self.config.num_blocks)
        self.scheduler = Scheduler(self.config, self.block_pool)
        self._states: dict[str, _State] = {}
        self._step_time: float | None = None  # seconds a decode step of few rows takes (multi-step's cap)
        self._groups: dict[str, Group] = {}  # best_of parent id -> its group, until the group's response
        self._details = D.DetailsBuilder(self.tokenizer)
        self._seeds = random.Random()  # seeds for sampled requests that gave none (reported in details)

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Checks lengths as TGI does; returns the request's max_new_tokens."""
        n = len(prompt_token_ids)
        cfg = self.config
        if n == 0:
            raise ValidationError("Input validation error: `inputs` cannot be empty")
        if n > cfg.max_input_tokens:
            raise ValidationError(
                f"Input validation error: `inputs` must have less than {cfg.max_input_tokens} tokens. "
                f"Given: {n}"
            )
        max_new = params.max_new_tokens
        if max_new is None:
            max_new = cfg.max_total_tokens - n
        if max_new <= 0:
            raise ValidationError("Input validation error: `max_new_tokens` must be strictly positive")
        if n + max_new > cfg.max_total_tokens:
            raise ValidationError(
                f"Input validation error: `inputs` tokens + `max_new_tokens` must be <= {cfg.max_total_tokens}. "
                f"Given: {n} `inputs` tokens and {max_new} `max_new_tokens`"
            )
        if params.decoder_input_details and not cfg.enable_prefill_logprobs:
            raise ValidationError(
                "Input validation error: `decoder_input_details` == true is not supported: prefill logprobs are "
                "disabled (start the server with --enable-prefill-logprobs)"
            )
        return max_new

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None
    ) -> Request:
        """Validates and queues a request. Raises ValidationError or OverloadedError; nothing is queued then."""
        params = params or SamplingParams()
        prompt = list(prompt_token_ids)
        if params.truncate and len(prompt) > params.truncate:
            prompt = prompt[-params.truncate :]  # TGI keeps the last `truncate` tokens
        max_new = self.validate(prompt, params)
        self._check_room(params.best_of)
        if params.do_sample and params.seed is None:  # TGI draws one and reports it in details
            params = dataclasses.replace(params, seed=self._new_seed())
        request = Request(
            request_id=request_id,
            token_ids=prompt,
            sampling=params,
            max_new_tokens=max_new,
            eos_token_ids=self.eos_token_ids,
            use_prefix_cache=not params.decoder_input_details,  # a cache hit would skip prompt positions
            speculate=self.config.speculate if _speculates(params) else 0,
            lookahead=self._lookahead(params),
        )
        if params.adapter_id:  # same tokens, other K/V: the prefix cache keeps adapters (and versions) apart
            request.cache_salt = self._acquire_adapter(params.adapter_id)
        self.scheduler.add_request(request)
        state = self._new_state(request)
        if params.decoder_input_details:
            state.prompt_logprobs = {}
        if params.best_of > 1:
            state.group = self._groups[request_id] = Group(request_id, params.best_of)
        self._states[request_id] = state
        return request

    def _lookahead(self, params: SamplingParams) -> int:
        """Decode steps past the first that one engine step may run for a request (multi-step decoding): plain
        greedy ones (tokens taken natively, no logprobs), not speculating, on a runner that feeds tokens back."""
        if (self.config.decode_steps <= 1 or self.config.speculate or params.best_of > 1
                or not self.runner.runs_ahead or not self.runner.sampler.is_plain(params)):
            return 0
        return self.config.decode_steps - 1

    def _check_room(self, sequences: int) -> None:
        """Room for all of a request's sequences, counting the children that best_of groups will add."""
        reserved = sum(g.size - 1 for g in self._groups.values() if not g.forked)
        if len(self.scheduler.requests) + reserved + sequences > self.config.max_concurrent_requests:
            raise OverloadedError()

    def _new_state(self, request: Request) -> _State:
        from tgi_backend.tokenizer.detokenizer import IncrementalDetokenizer

        stop = StopMatcher(request.sampling.stop) if request.sampling.stop else None
        # ~4 us a token with two window decodes: skipped when nothing reads the text (detokenize=False)
        needs_text = request.sampling.needs_text
        detok = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids) if needs_text else None
        return _State(request, detok, stop)

    def _new_seed(self) -> int:
        return self._seeds.getrandbits(63)

    def abort_request(self, request_id: str) -> None:
        group = self._groups.pop(request_id, None)
        for rid in group.member_ids if group is not None else [request_id]:
            self.scheduler.abort_request(rid)
            self._states.pop(rid, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    # ---- LoRA adapters (see layers/lora.py) -------------------------------------------------------
    def _adapters_in_use(self) -> set[str]:
        return {r.sampling.adapter_id for r in self.scheduler.requests.values() if r.sampling.adapter_id}

    def _acquire_adapter(self, name: str) -> str:
        """Loads the adapter if needed; returns its prefix-cache salt."""
        lora = self.runner.lora
        if lora is None:
            raise ValidationError(
                f"Input validation error: adapter `{name}` requested but LoRA is off "
                "(start with --lora-adapters or --lora-root)"
            )
        try:
            lora.acquire(name, self.config.lora_root, self._adapters_in_use())
        except KeyError:
            known = ", ".join(sorted(lora.slots)) or "none"
            raise ValidationError(
                f"Input validation error: unknown adapter `{name}` (loaded: {known})"
            ) from None
        except ValueError as exc:  # a broken adapter folder, or every slot busy
            raise ValidationError(f"Input validation error: adapter `{name}`: {exc}") from exc
        return lora.cache_salt(name)

    def load_adapter(self, name: str, path: str) -> None:
        """Loads (or replaces) a PEFT adapter at run time; requests name it by `adapter_id`."""
        from tgi_backend.weights.adapters import read_adapter

        if self.runner.lora is None:
            raise ValueError("LoRA is off (start with --lora-adapters or --lora-root)")
        if name in self._adapters_in_use():
            raise ValueError(f"adapter {name!r} is in use by running requests")
        self.runner.lora.load(read_adapter(path, name))
        self.runner.lora.pinned.add(name)  # loaded on purpose: never evicted, unloaded by unload_adapter

    def unload_adapter(self, name: str) -> None:
        lora = self.runner.lora
        if lora is None or name not in lora.slots:
            raise ValueError(f"adapter {name!r} is not loaded")
        if name in self._adapters_in_use():
            raise ValueError(f"adapter {name!r} is in use by running requests")
        lora.unload(name)
        lora.pinned.discard(name)

    def set_forward_hook(self, hook: Callable[[bool], None] | None) -> None:
        """`hook(native)` runs right before each step's forward: native True where it is the fused decoder's one
        native call, which holds no GIL for the whole step (kernels/cpu/decoder.py), False before the model's
        modules, whose many ops each take the GIL back."""
        self.runner.set_forward_hook(hook)

    def stats(self) -> EngineStats:
        s, pool = self.scheduler, self.block_pool
        return EngineStats(
            num_running=s.num_running,
            num_waiting=s.num_waiting,
            kv_blocks_total=pool.num_total_blocks,
            kv_blocks_free=pool.num_free_blocks,
            kv_blocks_cached=pool.num_cached_blocks,
            prompt_tokens=s.num_prompt_tokens,
            cached_tokens=s.num_cached_tokens,
            preemptions=s.num_preemptions,
            draft_tokens=s.num_draft_tokens,
            accepted_tokens=s.num_accepted_tokens,
        )

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if scheduled.finished_request_ids:
                self.runner.release(scheduled.finished_request_ids)
            return []
        self._annotate(scheduled)
        start = time.perf_counter()
        runner_output = self.runner.execute(scheduled)
        self._time_decode(scheduled, runner_output, time.perf_counter() - start)
        return self._update(scheduled, runner_output)

    def _time_decode(self, scheduled: SchedulerOutput, result: ModelRunnerOutput, seconds: float) -> None:
        """Caps multi-step decoding at MULTI_STEP_WINDOW seconds of steps, from the decode steps timed so far."""
        chunks = scheduled.chunks
        if self.config.decode_steps <= 1 or len(chunks) > MULTI_STEP_MAX_ROWS or any(len(c.token_ids) != 1 for c in chunks):
            return
        per_step = seconds / (1 + max(result.num_ahead.values(), default=0))
        self._step_time = per_step if self._step_time is None else 0.8 * self._step_time + 0.2 * per_step
        steps = min(self.config.decode_steps, int(MULTI_STEP_WINDOW / self._step_time))
        self.scheduler.max_lookahead = max(0, steps - 1)

    def _annotate(self, scheduled: SchedulerOutput) -> None:
        """Hands the runner what the scheduler does not carry: histories (penalties, watermark), prompt logprobs."""
        for chunk in scheduled.chunks:
            state = self._states.get(chunk.request_id)
            if state is None:
                continue
            request, sp = state.request, state.request.sampling
            chunk.num_prompt_tokens = request.num_prompt_tokens
            if chunk.sample and (sp.penalized or sp.watermark):
                chunk.history = request.token_ids
            if state.prompt_logprobs is not None and chunk.start_pos < request.num_prompt_tokens - 1:
                chunk.prompt_logprobs = True
                chunk.history = request.token_ids

    def _update(self, scheduled: SchedulerOutput, out: ModelRunnerOutput) -> list[RequestOutput]:
        for request_id, values in out.prompt_logprobs.items():
            state = self._states.get(request_id)
            if state is not None and state.prompt_logprobs is not None:
                state.prompt_logprobs.update(values)
        deltas = []
        earlier, previous = 0, None  # a request's tokens before this one in the step (consecutive entries)
        for rid, tok in zip(out.request_ids, out.sampled_token_ids):
            earlier = earlier + 1 if rid == previous else 0
            previous = rid
            deltas.append(self._before_append(rid, tok, earlier))
        finished = self.scheduler.update_from_output(scheduled, out)
        # a request's tokens are consecutive entries; the last one delivered may finish it
        last = {rid: i for i, rid in enumerate(out.request_ids) if deltas[i] is not None}
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for i, (request_id, token_id) in enumerate(zip(out.request_ids, out.sampled_token_ids)):
            state = self._states.get(request_id)
            if deltas[i] is None or state is None:
                continue
            request = state.request
            if request.first_token_time is None:
                request.first_token_time = now
            output = self._output(state, token_id, deltas[i], out, i, last[request_id] - i)
            if output.finished:
                self._states.pop(request_id, None)
            if state.group is None:
                outputs.append(output)
            else:
                outputs.extend(self._collect(state, output))
        self.scheduler.forget(finished)
        return outputs

    def _before_append(self, request_id: str, token_id: int, earlier: int = 0) -> str | None:
        """Detokenizes the new token and checks stop strings before the scheduler appends it (and finishes)."""
        state = self._states.get(request_id)
        request = self.scheduler.get_request(request_id)
        if state is None or request is None or request.is_finished or request.pending_finish is not None:
            return None  # (pending: a stop string ended it at an earlier token of this step)
        if state.group is not None and not state.group.forked and request.request_id == state.group.parent_id:
            self._fork(state)
        text = state.detok.push([token_id]) if state.detok is not None else ""
        if state.stop is not None and state.stop.push(text) is not None:
            request.pending_finish = FinishReason.STOP_SEQUENCE
            request.pending_at = len(request.token_ids) + earlier + 1
        return text

    def _output(
        self, state: _State, token_id: int, text: str, out: ModelRunnerOutput, i: int, later: int = 0
    ) -> RequestOutput:
        """`later`: tokens of this request delivered after this one in the same step (speculation)."""
        request = state.request
        done = request.is_finished and not later
        if done and state.detok is not None:
            text += state.detok.flush()
        details = None
        if request.sampling.wants_details:
            top = out.top_tokens[i] if request.sampling.top_n_tokens > 0 else None
            details = self._details.step(token_id, text, out.logprobs[i], top)
            if done:
                self._details.finish(details, request, state.prompt_logprobs)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token_id],
            text=text,
            finished=done,
            finish_reason=request.finish_reason.value if done and request.finish_reason else None,
            num_input_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens - later,
            details=details,
        )

    # ---- best_of --------------------------------------------------------------------------------
    def _fork(self, parent_state: _State) -> None:
        """The parent's prompt is computed: each child shares its blocks and recomputes only the last token."""
        group, parent = parent_state.group, parent_state.request
        assert group is not None
        group.forked = True
        for k in range(1, group.size):
            child = Request(
                request_id=f"{parent.request_id}/{k}",
                token_ids=list(parent.prompt_token_ids),
                sampling=dataclasses.replace(parent.sampling, seed=self._new_seed(), decoder_input_details=False),
                max_new_tokens=parent.max_new_tokens,
                eos_token_ids=parent.eos_token_ids,
                use_prefix_cache=parent.use_prefix_cache,
                cache_salt=parent.cache_salt,
            )
            self.scheduler.kv.fork(parent, child)
            child.num_computed_tokens = parent.num_prompt_tokens - 1  # its own logits for its own first token
            try:
                self.scheduler.add_request(child)
            except OverloadedError:  # no room: the group runs with fewer sequences
                self.scheduler.kv.free(child)
                continue
            group.child_ids.append(child.request_id)
            state = self._new_state(child)
            state.group = group
            self._states[child.request_id] = state

    def _collect(self, state: _State, output: RequestOutput) -> list[RequestOutput]:
        """Holds a group member's output back; returns the group's one response once all have finished."""
        group = state.group
        assert group is not None
        group.add(output.request_id, output.new_token_ids, output.text, output.details, output.finish_reason
                  if output.finished else None, state.request.sampling.seed)
        if not group.done:
            return []
        self._groups.pop(group.parent_id, None)
        best, details = group.response()
        return [RequestOutput(
            request_id=group.parent_id,
            new_token_ids=list(best.token_ids),
            text=best.text,
            finished=True,
            finish_reason=best.finish_reason,
            num_input_tokens=state.request.num_prompt_tokens,
            num_output_tokens=len(best.token_ids),
            details=details,
        )]

    # ---- in-process convenience ------------------------------------------------------------------
    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | None = None
    ) -> list[list[int]]:
        """Runs prompts (token ids) to completion together; returns the generated ids of each."""
        ids = []
        for i, prompt in enumerate(prompts):
            rid = f"gen-{i}-{time.monotonic_ns()}"
            self.add_request(rid, prompt, params)
            ids.append(rid)
        results: dict[str, list[int]] = {rid: [] for rid in ids}
        while self.has_unfinished_requests():
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[rid] for rid in ids]


def _speculates(params: SamplingParams) -> bool:
    """Drafts need one sequence per request (best_of forks); samplers reading the history (penalties,
    watermark) see each draft row's own (the runner's `_history`)."""
    return params.best_of <= 1


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _eos_token_ids(model_path: str, hf_config: dict, tokenizer: Any) -> frozenset[int]:
    """All EOS ids: generation_config.json's (may be a list), config.json's, and the tokenizer's."""
    ids: set[int] = set()
    for source in (_read_json(os.path.join(model_path, "generation_config.json")), hf_config):
        value = source.get("eos_token_id")
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(int(v) for v in value)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tok_eos, int):
        ids.add(tok_eos)
    return frozenset(ids)


__all__ = ["EngineStats", "LLMEngine", "RequestOutput", "FinishReason"]
