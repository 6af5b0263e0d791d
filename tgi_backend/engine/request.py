"""One dataclass per request: token ids, progress counters and block table. Ints only, no torch."""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    # TGI's wire names; CANCELLED is ours (client gone), never sent to a client that is still listening.
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"


@dataclass(slots=True)
class SamplingParams:
    """What a request asks of the sampler and of the output. Validated and resolved by `sampling.params`.

    Every field's default is "off": a request with default parameters costs the sampler nothing beyond argmax.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    seed: int | None = None
    max_new_tokens: int | None = None  # None: up to max_total_tokens - prompt length (TGI's default)
    ignore_eos: bool = False
    typical_p: float = 1.0  # 1.0: off
    min_p: float = 0.0  # 0.0: off (vLLM)
    repetition_penalty: float = 1.0  # 1.0: off (prompt and generated tokens, as TGI / transformers)
    frequency_penalty: float = 0.0  # 0.0: off (TGI: count / number of tokens so far, times the penalty)
    presence_penalty: float = 0.0  # 0.0: off (vLLM: generated tokens only)
    watermark: bool = False
    min_new_tokens: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    truncate: int | None = None  # keep the last N prompt tokens
    return_full_text: bool | None = None  # None: not given (the adapter's exclude_input_in_output decides)
    details: bool = False
    decoder_input_details: bool = False
    top_n_tokens: int = 0
    best_of: int = 1
    adapter_id: str | None = None  # LoRA adapter (TGI adapter_id / vLLM lora_name); None: the base model
    detokenize: bool = True  # False: outputs carry token ids only (vLLM's name); the client reads no text

    @property
    def greedy(self) -> bool:
        return not self.do_sample

    @property
    def wants_details(self) -> bool:
        """The request's responses carry the `details` JSON."""
        return self.details or self.decoder_input_details or self.top_n_tokens > 0 or self.best_of > 1

    @property
    def needs_text(self) -> bool:
        """The engine detokenizes: the text is read, or stop strings and details need it."""
        return self.detokenize or bool(self.stop) or self.wants_details

    @property
    def wants_logprobs(self) -> bool:
        """The sampler returns the chosen tokens' logprobs (details, and best_of ranks by them)."""
        return self.wants_details

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0


@dataclass(slots=True, eq=False)
class Request:
    """A request's whole life. `token_ids` holds the prompt followed by the generated tokens.

    The scheduler's one rule: each step hands out tokens so that `num_computed_tokens` catches up with
    `num_tokens`. A step that computes up to the last known token samples one more.
    """

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    num_prompt_tokens: int = -1
    num_computed_tokens: int = 0
    block_ids: list[int] = field(default_factory=list)
    # prefix cache: hashes of full blocks (chained), how many of block_ids are registered, tokens reused
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    num_cached_tokens: int = 0
    use_prefix_cache: bool = True  # off where reuse would change what is returned (prompt logprobs)
    cache_salt: str = ""  # keeps caches apart where the same tokens give other K/V (e.g. a LoRA adapter)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    scheduled_time: float | None = None  # first admission to the running batch: queue time ends here
    first_token_time: float | None = None
    pending_finish: FinishReason | None = None  # set by the engine (stop string on decoded text) before append
    pending_at: int = 0  # ... for the token that makes this many tokens (steps of several tokens end there)
    speculate: int = 0  # draft tokens per step for this request (0: best_of forks it, or off)
    draft_backoff: int = 0  # steps without drafts after the next fully rejected draft (doubles each time)
    draft_wait: int = 0  # steps left without drafts
    lookahead: int = 0  # multi-step decoding: decode steps past the first that one engine step may run (0: off)

    def __post_init__(self) -> None:
        if self.num_prompt_tokens < 0:
            self.num_prompt_tokens = len(self.token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def check_stop(self) -> FinishReason | None:
        """Finish reason after the last appended token, or None to go on."""
        if self.pending_finish is not None and len(self.token_ids) >= self.pending_at:
            return self.pending_finish
        last = self.token_ids[-1]
        if self.num_output_tokens >= self.sampling.min_new_tokens:
            if last in self.sampling.stop_token_ids:
                return FinishReason.EOS_TOKEN
            if not self.sampling.ignore_eos and last in self.eos_token_ids:
                return FinishReason.EOS_TOKEN
        if self.num_output_tokens >= self.max_new_tokens:
            return FinishReason.LENGTH
        return None
