"""What the engine loop tells a metrics sink: engine snapshots and each request's timings. No Triton import.

The loop calls an `EngineObserver` from its response thread (never from the engine thread, so a slow sink
never stalls a step): `on_step` with an `EngineStats` snapshot when it changed (at most once per loop
iteration), `on_finish` and then `after_finish` once for each admitted request, in batches, and `on_reject`
once per request refused before admission.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(slots=True)
class RequestTimings:
    """One request's life, in `time.monotonic()` seconds and token counts."""

    arrival_time: float  # handed to the loop (Triton's execute)
    finish_time: float
    scheduled_time: float | None  # first admitted to the running batch: queue time ends here
    first_token_time: float | None
    num_prompt_tokens: int
    num_cached_tokens: int  # prompt tokens the prefix cache supplied (at the last admission)
    num_generated_tokens: int
    max_new_tokens: int
    finish_reason: str  # "length", "eos_token", "stop_sequence", "cancelled" or "error"
    inter_token_latencies: list[float] = field(default_factory=list)  # seconds between consecutive tokens

    @property
    def succeeded(self) -> bool:
        return self.finish_reason in ("length", "eos_token", "stop_sequence")

    @property
    def duration(self) -> float:
        return self.finish_time - self.arrival_time

    @property
    def queue_duration(self) -> float | None:
        return None if self.scheduled_time is None else self.scheduled_time - self.arrival_time

    @property
    def inference_duration(self) -> float | None:
        return None if self.scheduled_time is None else self.finish_time - self.scheduled_time

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def mean_time_per_token(self) -> float | None:
        """TGI's definition: inference time divided by the generated tokens."""
        inference = self.inference_duration
        if inference is None or self.num_generated_tokens < 1:
            return None
        return inference / self.num_generated_tokens


class EngineObserver(Protocol):
    """A metrics sink. Called from one thread (the loop's response thread); must not raise."""

    def on_step(self, stats: Any) -> None: ...  # stats: engine.engine.EngineStats

    # requests that ended, before any of their final responses leaves
    def on_finish(self, batch: list[RequestTimings]) -> None: ...

    # the same requests, after their final responses left and before any later call
    def after_finish(self, batch: list[RequestTimings]) -> None: ...

    def on_reject(self, kind: str) -> None: ...  # "validation", "overloaded" or "generation"
