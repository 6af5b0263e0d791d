"""best_of: one request, several sequences sharing the prompt's KV blocks; the best by summed logprob wins.

The parent computes the prompt. When it samples its first token, each child is a new Request with the same
prompt, forked from the parent's blocks (shared; the scheduler copies a partly filled block on first write),
set to recompute only the last prompt token so that it draws its own first token with its own seed. The
group's outputs are held back and sent as one response once every sequence has finished. Ints only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SequenceResult:
    """What one finished sequence produced."""

    request_id: str
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)  # details' Token objects
    top_tokens: list[list[dict[str, Any]]] = field(default_factory=list)
    finish_reason: str = ""
    seed: int | None = None
    finished: bool = False

    @property
    def score(self) -> float:
        """Sum of the tokens' logprobs (TGI's ranking); a removed token (null) counts as -inf."""
        total = 0.0
        for t in self.tokens:
            if t["logprob"] is None:
                return float("-inf")
            total += t["logprob"]
        return total


@dataclass(slots=True)
class Group:
    parent_id: str
    size: int  # sequences asked for
    child_ids: list[str] = field(default_factory=list)
    forked: bool = False
    prefill: list[dict[str, Any]] | None = None  # the parent's (decoder_input_details)
    results: dict[str, SequenceResult] = field(default_factory=dict)

    @property
    def member_ids(self) -> list[str]:
        return [self.parent_id, *self.child_ids]

    def result(self, request_id: str) -> SequenceResult:
        res = self.results.get(request_id)
        if res is None:
            res = self.results[request_id] = SequenceResult(request_id)
        return res

    @property
    def done(self) -> bool:
        return self.forked and all(self.result(r).finished for r in self.member_ids)

    def ranked(self) -> list[SequenceResult]:
        """Best first; ties keep the parent first."""
        return sorted((self.result(r) for r in self.member_ids), key=lambda s: -s.score)
