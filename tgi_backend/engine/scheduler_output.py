"""Plain data passed from the scheduler to the model runner and back. No torch."""
from __future__ import annotations

from dataclasses import dataclass, field

from tgi_backend.engine.request import SamplingParams


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens of one request to compute in this step.

    token_ids are the request's tokens [start_pos, start_pos + len(token_ids)); their K/V go to the slots
    given by block_ids (slot = block_ids[pos // block_size] * block_size + pos % block_size) and attention
    covers positions [0, start_pos + len(token_ids)) of this request only, causally.
    """

    request_id: str
    token_ids: list[int]
    start_pos: int
    block_ids: list[int]
    sample: bool  # the chunk reaches the last known token: sample the next one
    sampling: SamplingParams
    num_output_tokens: int = 0  # tokens generated so far (seeded sampling keys on it)
    # speculation: the last num_draft token_ids are proposed, not known; each position samples, and the
    # runner keeps the samples up to the first that differs from the next proposed token
    num_draft: int = 0
    # multi-step decoding: slots are held for this many positions past the chunk's token; the runner may feed
    # each greedy token back for up to that many more decode steps in one engine step (ModelRunnerOutput.num_ahead)
    num_lookahead: int = 0
    # set by the engine, not the scheduler: what the sampler and the prompt logprobs need
    history: list[int] | None = None  # the request's tokens (penalties, watermark): its own list, not a copy
    num_prompt_tokens: int = 0
    prompt_logprobs: bool = False  # logprobs of this chunk's prompt tokens (decoder_input_details)


@dataclass(slots=True)
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    # Requests that left since the last step (finished, aborted, preempted): the runner drops their state.
    finished_request_ids: list[str] = field(default_factory=list)
    # (src, dst) KV blocks to copy before the forward pass: copy on write of a block shared by forked requests
    block_copies: list[tuple[int, int]] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(len(c.token_ids) for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


@dataclass(slots=True)
class ModelRunnerOutput:
    """The new tokens of each chunk with sample=True, in chunk order: one, or with drafts 1 + the number of
    drafts accepted, or with lookahead 1 + num_ahead (consecutive entries of the same request id)."""

    request_ids: list[str] = field(default_factory=list)
    sampled_token_ids: list[int] = field(default_factory=list)
    num_accepted: dict[str, int] = field(default_factory=dict)  # request id -> drafts verified this step
    num_ahead: dict[str, int] = field(default_factory=dict)  # request id -> decode steps run past its chunk's
    # per sampled chunk: the token's logprob and top-n (id, logprob) alternatives, None unless asked
    logprobs: list[float | None] = field(default_factory=list)
    top_tokens: list[list[tuple[int, float]] | None] = field(default_factory=list)
    # request id -> logprobs of the prompt tokens this step computed ({position: logprob of token at position})
    prompt_logprobs: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
