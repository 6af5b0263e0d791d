"""Frozen configuration, read once: from launcher flags, or from the model config's parameters in Triton."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

DTYPES = ("float32", "bfloat16", "float16", "auto")
MAX_SPECULATE = 16  # draft tokens per step: past a few, a wrong guess early wastes the rest
MAX_DECODE_STEPS = 16  # multi-step decoding: a request arriving meanwhile waits for all of them


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything the engine needs. Names follow TGI's launcher flags (dashes become underscores).

    model_id is a local folder or a hub id; `weights.hub.resolve_model_path` turns it into a folder.
    Token limits left at 0 are derived from the model once its config is read (see `resolve`).
    """

    model_id: str
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 for checkpoints stored in 16 bits, else float32
    max_input_tokens: int = 0  # 0: max_total_tokens - 1
    max_total_tokens: int = 0  # 0: min(max_position_embeddings, 4096)
    max_batch_prefill_tokens: int = 0  # per-step token budget; 0: max(max_input_tokens + 50, 4096)
    max_batch_total_tokens: int = 0  # size of the KV pool in tokens; 0: max(16 * max_total_tokens, 65536) capped by memory
    max_concurrent_requests: int = 128
    max_num_seqs: int = 256  # running requests at once
    block_size: int = 16
    enable_prefix_caching: bool = True
    num_threads: int = 0  # torch intra-op threads; 0: leave torch's default
    trust_remote_code: bool = False
    # quantization and LoRA (TGI's --quantize names; --lora-adapters "name=path,..." or "path,...")
    quantize: str | None = None  # None: plain, or what config.json's quantization_config says
    lora_adapters: str | None = None
    lora_root: str | None = None  # adapters under this folder load on first use (adapter_id = subfolder)
    max_loras: int = 8  # adapters loaded at once; past it, the least recently used idle one is unloaded
    # generation contract (TGI's launcher flags and defaults)
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_best_of: int = 2
    watermark_gamma: float = 0.5
    watermark_delta: float = 2.0
    enable_prefill_logprobs: bool = False
    # serving: merge a lagging stream's queued tokens into one response (fewer, larger responses under load)
    stream_coalescing: bool = False
    # serving: a stream's tokens leave in responses of this many (vLLM's --stream-interval); 1: one per token
    stream_interval: int = 1
    # serving: streamed responses per second for all streams together before a stream's tokens are grouped,
    # and under a budget at most serving/engine_loop.py's STREAM_MAX_RATE a second for one stream (each
    # response is an IPC round trip through tritonserver and a gRPC message); 0: one per token;
    # -1: serving/engine_loop.py's STREAM_BUDGET_PER_CORE per CPU core
    stream_budget: int = -1
    # metrics: tgi_request_inter_token_duration, one sample per token; each sample is an IPC round trip to
    # tritonserver (as costly as a streamed response), so it is off unless asked for
    inter_token_metrics: bool = False
    # n-gram speculation (TGI's --speculate): up to this many proposed tokens verified per step; 0: off
    speculate: int = 0
    # multi-step decoding: plain greedy decode steps of a few rows run this many at a time, each token fed back
    # natively, while no request waits (scheduler.py's MULTI_STEP_MAX_ROWS); 1: one step at a time
    decode_steps: int = 4
    # GPU only: decode batch sizes captured as CUDA graphs (TGI's --cuda-graphs); "0": none
    cuda_graphs: str = "1,2,4,8,16,32"
    extra: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_strings(cls, values: Mapping[str, Any]) -> "EngineConfig":
        """Builds from string values (Triton model-config parameters); unknown keys go to `extra`."""
        kwargs: dict[str, Any] = {}
        extra: dict[str, str] = {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key, raw in values.items():
            name = key.replace("-", "_")
            if name not in fields or name == "extra":
                extra[key] = str(raw)
                continue
            kwargs[name] = _coerce(fields[name].type, raw)
        return cls(extra=extra, **kwargs)

    def to_strings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for f in dataclasses.fields(self):
            if f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = str(value).lower() if isinstance(value, bool) else str(value)
        out.update(self.extra)
        return out

    def resolve(self, max_position_embeddings: int) -> "EngineConfig":
        """Fills the derived token limits, as TGI's launcher does, and checks they fit together."""
        total = self.max_total_tokens or min(max_position_embeddings, 4096)
        inputs = self.max_input_tokens or total - 1
        prefill = self.max_batch_prefill_tokens or max(inputs + 50, 4096)
        pool = self.max_batch_total_tokens or max(16 * total, 65536)
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if inputs >= total:
            raise ValueError(
                f"`max_input_tokens` must be < `max_total_tokens`; given {inputs} and {total}"
            )
        if total > pool:
            raise ValueError(
                f"`max_total_tokens` must be <= `max_batch_total_tokens`; given {total} and {pool}"
            )
        if prefill < 1 or self.block_size < 1:
            raise ValueError("`max_batch_prefill_tokens` and `block_size` must be positive")
        if not 0 <= self.speculate <= MAX_SPECULATE:
            raise ValueError(f"`speculate` must be between 0 and {MAX_SPECULATE}, got {self.speculate}")
        if not 1 <= self.decode_steps <= MAX_DECODE_STEPS:
            raise ValueError(f"`decode_steps` must be between 1 and {MAX_DECODE_STEPS}, got {self.decode_steps}")
        if self.stream_interval < 1:
            raise ValueError(f"`stream_interval` must be at least 1, got {self.stream_interval}")
        if self.stream_budget < -1:
            raise ValueError(f"`stream_budget` must be >= 0 (or -1: per CPU core), got {self.stream_budget}")
        return dataclasses.replace(
            self,
            max_total_tokens=total,
            max_input_tokens=inputs,
            max_batch_prefill_tokens=prefill,
            max_batch_total_tokens=pool,
        )

    @property
    def num_blocks(self) -> int:
        return -(-self.max_batch_total_tokens // self.block_size)


def _coerce(type_name: Any, raw: Any) -> Any:
    text = str(raw).strip()
    kind = str(type_name)
    if kind.startswith("bool"):
        return text.lower() in ("1", "true", "yes", "on")
    if kind.startswith("int"):
        return int(text)
    if kind.startswith("float"):
        return float(text)
    if "None" in kind and text.lower() in ("", "none", "null"):
        return None
    return text
