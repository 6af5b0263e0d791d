"""best_of: one request, several sequences sharing the prompt's KV blocks; the best by summed logprob wins.

The parent computes the prompt. When it samples its first token, each child is a new Request with the same
prompt, forked from the parent's blocks (shared; the scheduler copies a partly filled block on first write),
set to recompute only the last prompt token so that it draws its own first token with its own seed. The
group's outputs are held back and sent as one response once every sequence has finished. Ints only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tgi_backend.sampling import details as D


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

    def add(
        self,
        request_id: str,
        token_ids: list[int],
        text: str,
        details: dict[str, Any] | None,
        finish_reason: str | None,
        seed: int | None,
    ) -> None:
        """One member's output (finish_reason None while it runs)."""
        res = self.result(request_id)
        res.token_ids.extend(token_ids)
        res.text += text
        details = details or {}
        res.tokens.extend(details.get("tokens", []))
        res.top_tokens.extend(details.get("top_tokens", []))
        if finish_reason is not None:
            res.finished, res.finish_reason, res.seed = True, finish_reason, seed
            if request_id == self.parent_id and "prefill" in details:
                self.prefill = details["prefill"]

    def response(self) -> tuple[SequenceResult, dict[str, Any]]:
        """The best sequence and the details of the group's one response (TGI's shape)."""
        best, *others = self.ranked()
        details: dict[str, Any] = {"tokens": best.tokens}
        if best.top_tokens:
            details["top_tokens"] = best.top_tokens
        details.update(finish_reason=best.finish_reason, generated_tokens=len(best.token_ids), seed=best.seed)
        if self.prefill is not None:
            details["prefill"] = self.prefill
        details["best_of_sequences"] = [
            D.best_of_sequence(s.text, s.finish_reason, s.tokens, s.top_tokens, s.seed, self.prefill) for s in others
        ]
        return best, details
