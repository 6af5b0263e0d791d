"""The `details` JSON of tgi_llm's responses, in TGI's shapes (Token, PrefillToken, BestOfSequence).

Every response of a request that asked for details carries the tokens it adds ("tokens", and "top_tokens"
with top_n_tokens); the final one also "finish_reason", "generated_tokens", "seed", "prefill" (with
decoder_input_details) and "best_of_sequences" (best_of > 1). `merge` joins a stream's parts into the one
object a non-streaming response carries.
"""
from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

FINAL_KEYS = ("finish_reason", "generated_tokens", "seed", "prefill", "best_of_sequences")


class DetailsBuilder:
    """Builds one request's details from token ids, text deltas and logprobs (needs only the tokenizer)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.special_ids = frozenset(getattr(tokenizer, "all_special_ids", None) or ())

    def text_of(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def step(
        self, token_id: int, text: str, logprob: float | None, top: list[tuple[int, float]] | None
    ) -> dict[str, Any]:
        """One new token (its text is the detokenizer's delta; a special token's own text); `top`: top_n_tokens."""
        special = token_id in self.special_ids
        own_text = self.text_of(token_id) if special else text
        result: dict[str, Any] = {"tokens": [token(token_id, own_text, logprob, special)]}
        if top is not None:
            result["top_tokens"] = [[token(i, self.text_of(i), lp, i in self.special_ids) for i, lp in top]]
        return result

    def finish(self, details: dict[str, Any], request: Any, prompt_logprobs: dict[int, float] | None) -> None:
        """Adds the final keys: finish reason, token count, seed (null when greedy), prefill if asked."""
        sp = request.sampling
        details["finish_reason"] = request.finish_reason.value if request.finish_reason else None
        details["generated_tokens"] = request.num_output_tokens
        details["seed"] = sp.seed if sp.do_sample else None
        if sp.decoder_input_details:
            details["prefill"] = self.prefill(request.prompt_token_ids, prompt_logprobs or {})

    def prefill(self, prompt_ids: Sequence[int], logprobs: dict[int, float]) -> list[dict[str, Any]]:
        """The prompt tokens with their logprobs (TGI: the first has none)."""
        return [prefill_token(t, self.text_of(t), logprobs.get(p) if p else None) for p, t in enumerate(prompt_ids)]


def token(token_id: int, text: str, logprob: float | None, special: bool) -> dict[str, Any]:
    return {"id": int(token_id), "text": text, "logprob": _finite(logprob), "special": bool(special)}


def prefill_token(token_id: int, text: str, logprob: float | None) -> dict[str, Any]:
    return {"id": int(token_id), "text": text, "logprob": _finite(logprob)}


def _finite(value: float | None) -> float | None:
    # -inf (a token the processors removed) is not JSON: TGI's clients read null as "no logprob"
    if value is None or value != value or value in (float("inf"), float("-inf")):
        return None
    return float(value)


def merge(parts: Iterable[dict[str, Any] | None]) -> dict[str, Any] | None:
    """Concatenates the per-response tokens; final keys come from the last part that has them."""
    merged: dict[str, Any] | None = None
    for part in parts:
        if part is None:
            continue
        if merged is None:
            merged = {"tokens": []}
        merged["tokens"].extend(part.get("tokens", []))
        if "top_tokens" in part:
            merged.setdefault("top_tokens", []).extend(part["top_tokens"])
        for key in FINAL_KEYS:
            if key in part:
                merged[key] = part[key]
    return merged


def dumps(details: dict[str, Any] | None) -> str:
    return "" if details is None else json.dumps(details, ensure_ascii=False, separators=(",", ":"))


def best_of_sequence(
    generated_text: str,
    finish_reason: str,
    tokens: Sequence[dict[str, Any]],
    top_tokens: Sequence[list[dict[str, Any]]] | None,
    seed: int | None,
    prefill: list[dict[str, Any]] | None,
) -> dict[str, Any]:
    seq: dict[str, Any] = {
        "generated_text": generated_text,
        "finish_reason": finish_reason,
        "generated_tokens": len(tokens),
        "seed": seed,
        "prefill": prefill or [],
        "tokens": list(tokens),
    }
    if top_tokens:
        seq["top_tokens"] = list(top_tokens)
    return seq
