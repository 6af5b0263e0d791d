"""The engine: add_request / abort_request / step, where step = schedule, execute, update. Single-threaded."""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

from tgi_backend.config import EngineConfig
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.request import FinishReason, Request, SamplingParams
from tgi_backend.engine.scheduler import Scheduler
from tgi_backend.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from tgi_backend.errors import ValidationError


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
        self.block_pool = BlockPool(self.config.num_blocks)
        self.scheduler = Scheduler(self.config, self.block_pool)
        self._detokenizers: dict[str, Any] = {}

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
        return max_new

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None
    ) -> Request:
        """Validates and queues a request. Raises ValidationError or OverloadedError; nothing is queued then."""
        from tgi_backend.tokenizer.detokenizer import IncrementalDetokenizer

        params = params or SamplingParams()
        max_new = self.validate(prompt_token_ids, params)
        request = Request(
            request_id=request_id,
            token_ids=list(prompt_token_ids),
            sampling=params,
            max_new_tokens=max_new,
            eos_token_ids=self.eos_token_ids,
            # Prompt logprobs need every prompt token computed: a cache hit would skip them.
            use_prefix_cache=not getattr(params, "decoder_input_details", False),
        )
        self.scheduler.add_request(request)
        self._detokenizers[request_id] = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids)
        return request

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort_request(request_id)
        self._detokenizers.pop(request_id, None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

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
        )

    # ---- the step -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        if scheduled.is_empty:
            if scheduled.finished_request_ids:
                self.runner.release(scheduled.finished_request_ids)
            return []
        runner_output = self.runner.execute(scheduled)
        return self._update(scheduled, runner_output)

    def _update(self, scheduled: SchedulerOutput, runner_output: ModelRunnerOutput) -> list[RequestOutput]:
        finished = self.scheduler.update_from_output(scheduled, runner_output)
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for request_id, token_id in zip(runner_output.request_ids, runner_output.sampled_token_ids):
            request = self.scheduler.get_request(request_id)
            if request is None:
                continue
            if request.first_token_time is None:
                request.first_token_time = now
            detok = self._detokenizers.get(request_id)
            text = detok.push([token_id]) if detok is not None else ""
            done = request.is_finished
            if done:
                if detok is not None:
                    text += detok.flush()
                self._detokenizers.pop(request_id, None)
            outputs.append(
                RequestOutput(
                    request_id=request_id,
                    new_token_ids=[token_id],
                    text=text,
                    finished=done,
                    finish_reason=request.finish_reason.value if request.finish_reason else None,
                    num_input_tokens=request.num_prompt_tokens,
                    num_output_tokens=request.num_output_tokens,
                )
            )
        self.scheduler.forget(finished)
        return outputs

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
