"""The engine's own metrics through the Python backend's custom metrics (Triton's metrics port).

Triton's `nv_inference_*` cannot see inside a decoupled engine, so the loop reports to `EngineMetrics`, an
`EngineObserver`. TGI's metric names where TGI has the metric, ours (same `tgi_` prefix) for the rest; every
series carries the Triton model's labels (`model`, `version`). The `pb` module is passed in (in Triton:
`triton_python_backend_utils`), so the mapping is tested without Triton. Each update is a round trip to the
Triton process, hence gauges are set only when their value changed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

from tgi_backend.serving.observer import RequestTimings

# TGI's duration buckets: 35 geometric steps from 0.15 ms, factor 1.5 (up to ~2.4 minutes).
DURATION_BUCKETS = [1.5e-4 * 1.5**i for i in range(35)]


def token_buckets(max_tokens: int) -> list[float]:
    """Powers of two up to the first one >= max_tokens."""
    out = [1.0]
    while out[-1] < max(1, max_tokens):
        out.append(out[-1] * 2)
    return out


@dataclass(frozen=True, slots=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    description: str


# Gauges: name -> (EngineStats -> value).
GAUGES: dict[str, tuple[str, Callable[[Any], float]]] = {
    "tgi_queue_size": ("Requests waiting to be scheduled (TGI)", lambda s: s.num_waiting),
    "tgi_batch_current_size": ("Requests in the running batch (TGI)", lambda s: s.num_running),
    "tgi_kv_cache_blocks_total": ("KV-cache blocks in the pool", lambda s: s.kv_blocks_total),
    "tgi_kv_cache_blocks_free": ("KV-cache blocks free, cached ones included", lambda s: s.kv_blocks_free),
    "tgi_kv_cache_blocks_used": ("KV-cache blocks held by requests", lambda s: s.kv_blocks_used),
    "tgi_kv_cache_blocks_cached": ("KV-cache blocks holding a reusable prefix", lambda s: s.kv_blocks_cached),
    "tgi_prefix_cache_hit_rate": (
        "Prompt tokens served from the prefix cache / prompt tokens admitted, since start",
        lambda s: s.prefix_cache_hit_rate,
    ),
}
# Counters fed from the growth of a cumulative EngineStats field: name -> (description, field).
STAT_COUNTERS: dict[str, tuple[str, str]] = {
    "tgi_prompt_tokens_total": ("Prompt tokens admitted (recomputation after preemption included)",
                                "prompt_tokens"),
    "tgi_prefix_cache_tokens_total": ("Prompt tokens the prefix cache supplied", "cached_tokens"),
    "tgi_preemptions_total": ("Running requests preempted because the KV pool ran short", "preemptions"),
    "tgi_spec_decode_draft_tokens_total": ("Speculated (n-gram draft) tokens verified", "draft_tokens"),
    "tgi_spec_decode_accepted_tokens_total": ("Speculated tokens accepted", "accepted_tokens"),
}
COUNTERS: dict[str, str] = {
    "tgi_request_count": "Requests received (TGI; counted when they end)",
    "tgi_request_success": "Requests that ended with a finish reason (TGI)",
    "tgi_request_failure": "Requests that failed, by err: validation, overloaded, generation, cancelled (TGI)",
    "tgi_generated_tokens_total": "Tokens generated, cancelled requests included",
}
# Histograms observed when a request succeeds: name -> (description, buckets, RequestTimings -> value | None).
HISTOGRAMS: dict[str, tuple[str, str, Callable[[RequestTimings], float | None]]] = {
    "tgi_request_duration": ("End-to-end request latency, seconds (TGI)", "seconds", lambda t: t.duration),
    "tgi_request_queue_duration": ("Time in the queue, seconds (TGI)", "seconds", lambda t: t.queue_duration),
    "tgi_request_inference_duration": ("Time from scheduling to the end, seconds (TGI)", "seconds",
                                       lambda t: t.inference_duration),
    "tgi_request_mean_time_per_token_duration": ("Inference time per generated token, seconds (TGI)", "seconds",
                                                 lambda t: t.mean_time_per_token),
    "tgi_request_time_to_first_token_duration": ("Time to first token, seconds", "seconds",
                                                 lambda t: t.time_to_first_token),
    "tgi_request_input_length": ("Prompt tokens per request (TGI)", "tokens", lambda t: t.num_prompt_tokens),
    "tgi_request_generated_tokens": ("Generated tokens per request (TGI)", "tokens",
                                     lambda t: t.num_generated_tokens),
    "tgi_request_max_new_tokens": ("max_new_tokens per request (TGI)", "tokens", lambda t: t.max_new_tokens),
}
INTER_TOKEN = "tgi_request_inter_token_duration"  # one observation per token after the first, when asked for
INTER_TOKEN_DESCRIPTION = "Time between consecutive generated tokens of a request, seconds"
FAILURE_KINDS = ("validation", "overloaded", "generation", "cancelled")


class EngineMetrics:
    """Owns the metric families (kept alive as attributes: a collected family deletes its metrics)."""

    def __init__(self, pb: Any, labels: Mapping[str, str], max_total_tokens: int, inter_token: bool = False) -> None:
        self.labels = dict(labels)
        self.inter_token = inter_token  # a round trip to tritonserver per generated token
        self.families: dict[str, Any] = {}
        self.metrics: dict[str, Any] = {}
        buckets = {"seconds": DURATION_BUCKETS, "tokens": token_buckets(max_total_tokens)}
        kinds = pb.MetricFamily
        for name, (description, _) in GAUGES.items():
            self._add(pb, name, description, kinds.GAUGE)
        for name, (description, _) in STAT_COUNTERS.items():
            self._add(pb, name, description, kinds.COUNTER)
        for name, description in COUNTERS.items():
            if name != "tgi_request_failure":
                self._add(pb, name, description, kinds.COUNTER)
        family = self._family(pb, "tgi_request_failure", COUNTERS["tgi_request_failure"], kinds.COUNTER)
        for kind in FAILURE_KINDS:
            self.metrics[f"tgi_request_failure/{kind}"] = family.Metric(labels={**self.labels, "err": kind})
        for name, (description, unit, _) in HISTOGRAMS.items():
            self._add(pb, name, description, kinds.HISTOGRAM, buckets[unit])
        if inter_token:
            self._add(pb, INTER_TOKEN, INTER_TOKEN_DESCRIPTION, kinds.HISTOGRAM, DURATION_BUCKETS)
        self._gauge_values: dict[str, float] = {}
        self._stat_values: dict[str, int] = {field: 0 for _, field in STAT_COUNTERS.values()}

    def _family(self, pb: Any, name: str, description: str, kind: Any) -> Any:
        family = pb.MetricFamily(name=name, description=description, kind=kind)
        self.families[name] = family
        return family

    def _add(self, pb: Any, name: str, description: str, kind: Any, buckets: list[float] | None = None) -> None:
        family = self._family(pb, name, description, kind)
        if buckets is None:
            self.metrics[name] = family.Metric(labels=self.labels)
        else:
            self.metrics[name] = family.Metric(labels=self.labels, buckets=buckets)

    # ---- EngineObserver -------------------------------------------------------------------------
    def on_step(self, stats: Any) -> None:
        for name, (_, value_of) in GAUGES.items():
            value = float(value_of(stats))
            if self._gauge_values.get(name) != value:
                self.metrics[name].set(value)
                self._gauge_values[name] = value
        for name, (_, field) in STAT_COUNTERS.items():
            value = int(getattr(stats, field))
            if value > self._stat_values[field]:
                self.metrics[name].increment(value - self._stat_values[field])
                self._stat_values[field] = value

    def on_finish(self, batch: list[RequestTimings]) -> None:
        """The counters, one update each for the whole batch."""
        failures = {kind: 0 for kind in FAILURE_KINDS}
        for t in batch:
            if not t.succeeded:
                failures["cancelled" if t.finish_reason == "cancelled" else "generation"] += 1
        self.metrics["tgi_request_count"].increment(len(batch))
        generated = sum(t.num_generated_tokens for t in batch)
        if generated:
            self.metrics["tgi_generated_tokens_total"].increment(generated)
        succeeded = len(batch) - sum(failures.values())
        if succeeded:
            self.metrics["tgi_request_success"].increment(succeeded)
        for kind, count in failures.items():
            if count:
                self.metrics[f"tgi_request_failure/{kind}"].increment(count)

    def after_finish(self, batch: list[RequestTimings]) -> None:
        """The histograms, successes only (as TGI): one observation per value, no batch form exists."""
        for timings in batch:
            if not timings.succeeded:
                continue
            for name, (_, _, value_of) in HISTOGRAMS.items():
                value = value_of(timings)
                if value is not None:
                    self.metrics[name].observe(float(value))
            if self.inter_token:
                inter_token = self.metrics[INTER_TOKEN]
                for gap in timings.inter_token_latencies:
                    inter_token.observe(gap)

    def on_reject(self, kind: str) -> None:
        self.metrics["tgi_request_count"].increment(1)
        kind = kind if kind in FAILURE_KINDS else "generation"
        self.metrics[f"tgi_request_failure/{kind}"].increment(1)
