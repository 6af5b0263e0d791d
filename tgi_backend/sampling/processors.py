"""Batched logits processors. Each one acts on the rows that ask for it, all of them in one tensor expression
with per-row parameters side by side; none loops over the vocabulary in Python.

A processor says which rows it acts on (`active`) and gets only those rows' logits ([rows, vocab] float32);
it returns new logits for them. Order (TGI's): watermark, repetition / frequency / presence penalties, the
min-tokens EOS mask (where TGI has its grammar mask), temperature, top-k, top-p, typical-p, then vLLM's min-p.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from tgi_backend.engine.request import SamplingParams

NEG_INF = float("-inf")


@dataclass(slots=True)
class SamplingRow:
    """One row of the logits: whose it is, what it asks for, how many tokens it has generated.

    `token_ids` (prompt + generated so far) is given only to rows whose processors read the history
    (penalties, watermark); it is the request's own list, not a copy.
    """

    request_id: str
    params: SamplingParams
    num_output_tokens: int = 0
    token_ids: list[int] | None = None
    num_prompt_tokens: int = 0

    @property
    def last_token(self) -> int:
        return self.token_ids[-1] if self.token_ids else 0

    @property
    def needs_history(self) -> bool:
        return self.params.penalized or self.params.watermark


class LogitsProcessor(Protocol):
    def active(self, params: SamplingParams) -> bool: ...

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """logits: [len(rows), vocab] float32, only the active rows; returns the new logits."""
        ...


def _column(rows: Sequence[SamplingRow], name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """One parameter of every row as a [rows, 1] tensor."""
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype).unsqueeze(1)


class Penalties:
    """repetition_penalty (TGI / transformers: prompt + generated tokens, logit * p if < 0 else / p),
    frequency_penalty (TGI: minus penalty * count / tokens so far) and presence_penalty (vLLM: minus penalty
    for each token generated at least once), from one scatter of the rows' histories."""

    def active(self, params: SamplingParams) -> bool:
        return params.penalized

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # logits: [rows, vocab]
        num_rows, vocab = logits.shape
        histories = [r.token_ids or [] for r in rows]
        lengths = torch.tensor([len(h) for h in histories])
        ids = torch.tensor(list(itertools.chain.from_iterable(histories)), dtype=torch.long).clamp_(0, vocab - 1)
        row_of = torch.repeat_interleave(torch.arange(num_rows), lengths)  # [tokens]
        counts = torch.zeros(num_rows, vocab).index_put_((row_of, ids), torch.ones(len(ids)), accumulate=True)
        starts = torch.cumsum(lengths, 0) - lengths
        prompt_len = torch.tensor([r.num_prompt_tokens for r in rows])
        generated = (torch.arange(len(ids)) - starts[row_of]) >= prompt_len[row_of]  # [tokens]
        presence = torch.zeros(num_rows, vocab, dtype=torch.bool).index_put_((row_of[generated], ids[generated]),
                                                                             torch.tensor(True))
        rep = _column(rows, "repetition_penalty")
        penalized = torch.where(logits < 0, logits * rep, logits / rep)
        logits = torch.where(counts > 0, penalized, logits)
        freq = _column(rows, "frequency_penalty") / lengths.clamp(min=1).unsqueeze(1)
        return logits - counts * freq - presence * _column(rows, "presence_penalty")


class MinNewTokens:
    """EOS (and stop_token_ids) masked while a row has generated fewer than `min_new_tokens`."""

    def __init__(self) -> None:
        self.eos_token_ids: frozenset[int] = frozenset()

    def active(self, params: SamplingParams) -> bool:
        return params.min_new_tokens > 0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        num_rows, vocab = logits.shape
        banned = torch.zeros(num_rows, vocab, dtype=torch.bool)
        banned[:, [i for i in self.eos_token_ids if 0 <= i < vocab]] = True
        own = [(i, t) for i, r in enumerate(rows) for t in r.params.stop_token_ids if 0 <= t < vocab]
        if own:
            banned[[i for i, _ in own], [t for _, t in own]] = True
        young = torch.tensor([r.num_output_tokens < r.params.min_new_tokens for r in rows]).unsqueeze(1)
        return logits.masked_fill(young & banned, NEG_INF)


class Temperature:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.temperature != 1.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # temperature 0 means greedy and is resolved before us (sampling.params); the floor only avoids inf
        return logits / _column(rows, "temperature").clamp(min=1e-6)


class TopK:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.top_k > 0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[-1]
        k = _column(rows, "top_k", torch.long).clamp(max=vocab)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, k - 1)  # [rows, 1]
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.top_p < 1.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # TGI / transformers: drop the low tail whose mass is <= 1 - top_p, keep at least one
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - _column(rows, "top_p")
        remove[:, -1] = False
        return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


class TypicalP:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.typical_p < 1.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # TGI / transformers: keep the tokens closest to the entropy until their mass reaches typical_p
        logp = logits.log_softmax(dim=-1)
        entropy = -(logp * logp.exp()).nansum(dim=-1, keepdim=True)
        shifted, order = (-logp - entropy).abs().sort(dim=-1)
        cumulative = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)
        last = (cumulative < _column(rows, "typical_p")).sum(dim=1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        remove = shifted > shifted.gather(1, last)
        return logits.masked_fill(remove.scatter(1, order, remove), NEG_INF)


class MinP:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.min_p > 0.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # vLLM: drop tokens whose probability is below min_p times the row's top probability
        probs = logits.softmax(dim=-1)
        floor = probs.amax(dim=-1, keepdim=True) * _column(rows, "min_p")
        return logits.masked_fill(probs < floor, NEG_INF)


def default_processors(watermark_gamma: float = 0.5, watermark_delta: float = 2.0) -> list[LogitsProcessor]:
    from tgi_backend.sampling.watermark import Watermark

    return [
        Watermark(watermark_gamma, watermark_delta),
        Penalties(),
        MinNewTokens(),
        Temperature(),
        TopK(),
        TopP(),
        TypicalP(),
        MinP(),
    ]
