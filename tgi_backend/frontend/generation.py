"""One generation through tgi_llm, shared by the TGI and OpenAI routes: TGI parameters in, tokens out.

The front always asks tgi_llm for `details` (per-token id, text, logprob, special): TGI's stream events
and OpenAI's logprobs need them, and carry the token ids, the finish reason and the token count too.
"""
from __future__ import annotations

import json
import time
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Mapping

from tgi_backend.errors import TGIError
from tgi_backend.frontend.bridge import FRONT_OUTPUTS, TritonBridge, TritonRequest
from tgi_backend.frontend.errors import IncompleteGenerationError, as_tgi_error, validation
from tgi_backend.frontend.metrics import FrontMetrics
from tgi_backend.frontend.model import ServedModel

# TGI's GenerateParameters; other keys are ignored, as TGI's serde ignores them.
TGI_PARAMETERS = frozenset({
    "adapter_id", "best_of", "decoder_input_details", "details", "do_sample", "frequency_penalty", "grammar",
    "max_new_tokens", "repetition_penalty", "seed", "stop", "temperature", "top_k", "top_n_tokens", "top_p",
    "truncate", "typical_p", "watermark",
})
FINAL_FIELDS = ("finish_reason", "generated_tokens", "seed", "prefill", "best_of_sequences")


@dataclass(slots=True)
class Piece:
    """One tgi_llm response."""

    text: str
    tokens: list[dict[str, Any]]
    top_tokens: list[list[dict[str, Any]]]
    finish_reason: str
    num_input_tokens: int
    num_output_tokens: int
    final: dict[str, Any] = field(default_factory=dict)  # details fields of the last response


@dataclass(slots=True)
class Timing:
    start: float = field(default_factory=time.perf_counter)
    first: float | None = None
    end: float | None = None

    def headers(self, characters: int, prompt_tokens: int, generated: int) -> dict[str, str]:
        """TGI's timing headers (seconds for x-compute-time, milliseconds for the rest)."""
        end = self.end or time.perf_counter()
        total = end - self.start
        per_token = total / max(generated, 1)
        ms = lambda s: str(int(s * 1000))  # noqa: E731
        return {
            "x-compute-type": "tgi-triton",
            "x-compute-time": f"{total:.6f}",
            "x-compute-characters": str(characters),
            "x-total-time": ms(total),
            "x-validation-time": "0",
            "x-queue-time": "0",  # the queue is inside tgi_llm; its time is in tgi_request_queue_duration
            "x-inference-time": ms(total),
            "x-time-per-token": ms(per_token),
            "x-prompt-tokens": str(prompt_tokens),
            "x-generated-tokens": str(generated),
        }


@dataclass(slots=True)
class Outcome:
    """A whole generation (non-streaming, or a stream joined)."""

    text: str = ""
    tokens: list[dict[str, Any]] = field(default_factory=list)
    top_tokens: list[list[dict[str, Any]]] = field(default_factory=list)
    finish_reason: str = "length"
    input_length: int = 0
    final: dict[str, Any] = field(default_factory=dict)
    timing: Timing = field(default_factory=Timing)

    @property
    def generated_tokens(self) -> int:
        return int(self.final.get("generated_tokens") or len(self.tokens))

    def add(self, piece: Piece) -> None:
        self.text += piece.text
        self.tokens.extend(piece.tokens)
        self.top_tokens.extend(piece.top_tokens)
        self.finish_reason = piece.finish_reason or self.finish_reason
        self.input_length = piece.num_input_tokens or self.input_length
        self.final.update(piece.final)

    def details(self) -> dict[str, Any]:
        """TGI's Details: top_tokens and best_of_sequences omitted when empty."""
        out: dict[str, Any] = {
            "finish_reason": self.final.get("finish_reason") or self.finish_reason,
            "generated_tokens": self.generated_tokens,
            "seed": self.final.get("seed"),
            "prefill": self.final.get("prefill") or [],
            "tokens": self.tokens,
        }
        if any(self.top_tokens):
            out["top_tokens"] = self.top_tokens
        if self.final.get("best_of_sequences"):
            out["best_of_sequences"] = self.final["best_of_sequences"]
        return out


def forwarded_parameters(parameters: Any) -> dict[str, Any]:
    """The client's `parameters` as tgi_llm's sampling_parameters: TGI's keys, nulls dropped, details on."""
    if parameters is None:
        parameters = {}
    if not isinstance(parameters, Mapping):
        raise validation("`parameters` must be an object")
    out = {k: v for k, v in parameters.items() if k in TGI_PARAMETERS and v is not None}
    if out.get("stop") == []:
        del out["stop"]
    out["details"] = True
    return out


class Generator:
    def __init__(self, bridge: TritonBridge, model: ServedModel, metrics: FrontMetrics) -> None:
        self.bridge = bridge
        self.model = model
        self.metrics = metrics

    def request(self, inputs: str, params: Mapping[str, Any], stream: bool) -> TritonRequest:
        bools = {"exclude_input_in_output": True, "return_num_input_tokens": True}
        return TritonRequest(inputs, json.dumps(params), stream, bools, FRONT_OUTPUTS)

    async def pieces(self, inputs: str, params: Mapping[str, Any], *, stream: bool,
                     timing: Timing | None = None) -> AsyncIterator[Piece]:
        """tgi_llm's responses as Pieces; the stream ends after the piece with a finish reason."""
        timing = timing or Timing()
        self.metrics.request_started(params.get("max_new_tokens"))
        generated, prompt_tokens, outcome = 0, 0, "cancelled"
        try:
            async with aclosing(self.bridge.stream(self.request(inputs, params, stream))) as results:
                async for result in results:
                    piece = self.parse(result)
                    timing.first = timing.first or time.perf_counter()
                    generated += len(piece.tokens)
                    prompt_tokens = piece.num_input_tokens or prompt_tokens
                    yield piece
                    if piece.finish_reason:
                        outcome = "success"
                        return
            outcome = "incomplete"
            raise IncompleteGenerationError()
        except TGIError as exc:
            outcome = exc.error_type
            raise
        except Exception as exc:
            outcome = "generation"
            raise as_tgi_error(exc) from exc
        finally:
            timing.end = time.perf_counter()
            self.metrics.request_ended(outcome, timing, prompt_tokens, generated)

    async def generate(self, inputs: str, params: Mapping[str, Any]) -> Outcome:
        outcome = Outcome()
        async with aclosing(self.pieces(inputs, params, stream=False, timing=outcome.timing)) as pieces:
            async for piece in pieces:
                outcome.add(piece)
        return outcome

    def parse(self, result: Mapping[str, Any]) -> Piece:
        """One response as the bridge decoded it (`text_output`, `details`; counts as a list of ints)."""
        text = result.get("text_output") or ""
        raw = result.get("details")
        details = json.loads(raw) if raw else {}
        tokens = details.get("tokens") or []
        return Piece(
            text=text,
            tokens=tokens,
            top_tokens=details.get("top_tokens") or [[] for _ in tokens],
            finish_reason=result.get("finish_reason") or details.get("finish_reason") or "",
            num_input_tokens=_first(result.get("num_input_tokens")),
            num_output_tokens=int(details.get("generated_tokens") or 0),
            final={k: details[k] for k in FINAL_FIELDS if k in details},
        )

def _first(value: Any) -> int:
    if isinstance(value, list):
        return int(value[0]) if value else 0
    return int(value or 0)
