"""Batched sampling: a small pipeline of logits processors, then argmax (greedy rows) or a draw (sampled rows).

Each processor says which rows it acts on (`active`) and transforms the logits of those rows only, so a row
with default parameters costs nothing beyond the argmax. To add a step (penalties, typical_p, ...), write a
processor and put it in the list: penalties go before temperature, as in TGI.

Seeded rows draw from their own torch.Generator, reseeded each step from (seed, tokens generated so far), so a
seed gives the same tokens whatever shares the batch, and again after a preemption recomputes the request.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from tgi_backend.engine.request import SamplingParams

_MASK64 = (1 << 64) - 1


@dataclass(slots=True)
class SamplingRow:
    """One row of the logits: whose it is, what it asks for, how many tokens it has generated."""

    request_id: str
    params: SamplingParams
    num_output_tokens: int = 0


class LogitsProcessor(Protocol):
    def active(self, params: SamplingParams) -> bool: ...

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """logits: [len(rows), vocab] float32, only the active rows; returns the new logits."""
        ...


class Temperature:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.temperature != 1.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # temperature 0 means greedy and is resolved before us (sampling.params); the floor only avoids inf
        t = torch.tensor([max(r.params.temperature, 1e-6) for r in rows], dtype=logits.dtype).unsqueeze(1)
        return logits / t


class TopK:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.top_k > 0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[-1]
        k = torch.tensor([min(r.params.top_k, vocab) for r in rows]).unsqueeze(1)
        kth = logits.topk(int(k.max()), dim=-1).values.gather(1, k - 1)  # [rows, 1]
        return logits.masked_fill(logits < kth, float("-inf"))


class TopP:
    def active(self, params: SamplingParams) -> bool:
        return params.do_sample and params.top_p < 1.0

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        # transformers' TopPLogitsWarper: drop the low tail whose mass is <= 1 - top_p, keep at least one
        p = torch.tensor([r.params.top_p for r in rows], dtype=logits.dtype).unsqueeze(1)
        sorted_logits, order = logits.sort(dim=-1)
        remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= 1 - p
        remove[:, -1] = False
        return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def default_processors() -> list[LogitsProcessor]:
    return [Temperature(), TopK(), TopP()]


def _mix_seed(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a well-spread 63-bit seed for torch.Generator.manual_seed."""
    z = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


class Sampler:
    def __init__(self, processors: list[LogitsProcessor] | None = None, seed: int | None = None) -> None:
        self.processors = default_processors() if processors is None else processors
        self._generators: dict[str, torch.Generator] = {}
        self._global = torch.Generator()
        if seed is None:
            self._global.seed()
        else:
            self._global.manual_seed(seed)

    def release(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)

    def __call__(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> list[int]:
        # logits: [rows, vocab] -> one token id per row
        active = [[i for i, r in enumerate(rows) if proc.active(r.params)] for proc in self.processors]
        sampled = [i for i, r in enumerate(rows) if r.params.do_sample]
        if not sampled and not any(active):
            return logits.argmax(dim=-1).tolist()
        logits = logits.to(torch.float32, copy=True)  # processors write rows in place: not the caller's
        for proc, idx in zip(self.processors, active):
            if idx:
                index = torch.tensor(idx)
                logits[index] = proc(logits.index_select(0, index), [rows[i] for i in idx])
        tokens = logits.argmax(dim=-1)
        if sampled:
            index = torch.tensor(sampled)
            probs = logits.index_select(0, index).softmax(dim=-1)
            tokens[index] = self._draw(probs, [rows[i] for i in sampled])
        return tokens.tolist()

    def _draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """Exponential race (argmax of p / E, E ~ Exp(1)) = a draw from p; one noise row per seeded row."""
        noise = torch.empty_like(probs)
        unseeded = [i for i, r in enumerate(rows) if r.params.seed is None]
        if unseeded:
            index = torch.tensor(unseeded)
            noise[index] = torch.empty(len(unseeded), probs.shape[1]).exponential_(generator=self._global)
        for i, r in enumerate(rows):
            if r.params.seed is not None:
                noise[i].exponential_(generator=self._generator(r))
        return (probs / noise).argmax(dim=-1)

    def _generator(self, row: SamplingRow) -> torch.Generator:
        gen = self._generators.get(row.request_id)
        if gen is None:
            gen = self._generators[row.request_id] = torch.Generator()
        gen.manual_seed(_mix_seed(int(row.params.seed), row.num_output_tokens))
        return gen
