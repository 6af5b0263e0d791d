"""Request parameters -> SamplingParams, validated as TGI validates them, with TGI's messages.

Accepts TGI's `parameters` names (do_sample, max_new_tokens, ...) and the JSON of Triton's vLLM backend
`sampling_parameters` input (max_tokens, ignore_eos, n, ...), in one dict. Differences from TGI, on purpose:
temperature 0 means greedy (vLLM / OpenAI), top_p 1.0 means off, top_k -1 means off (vLLM), `n` is `best_of`.
Validated values SamplingParams has no field for (vLLM's logprobs, ...) are returned in
`RequestParameters.options`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from tgi_backend.engine.request import SamplingParams
from tgi_backend.errors import ValidationError

PREFIX = "Input validation error: "


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    """TGI launcher limits that parameter validation needs (TGI's defaults)."""

    max_best_of: int = 2
    max_stop_sequences: int = 4
    max_top_n_tokens: int = 5
    max_input_tokens: int | None = None  # None: `truncate` is only checked to be positive
    enable_prefill_logprobs: bool = False  # TGI: prompt logprobs only behind --enable-prefill-logprobs

    @classmethod
    def from_config(cls, config: Any) -> "ValidationLimits":
        """From an EngineConfig: its fields (launcher flags), else its `extra` strings, else TGI's defaults."""
        extra = getattr(config, "extra", None) or {}

        def pick(name: str, default: Any) -> Any:
            if hasattr(config, name):
                return getattr(config, name)
            raw = extra.get(name, extra.get(name.replace("_", "-")))
            if raw in (None, ""):
                return default
            return str(raw).lower() in ("1", "true", "yes", "on") if isinstance(default, bool) else int(raw)

        tgi = cls()
        return cls(
            max_best_of=pick("max_best_of", tgi.max_best_of),
            max_stop_sequences=pick("max_stop_sequences", tgi.max_stop_sequences),
            max_top_n_tokens=pick("max_top_n_tokens", tgi.max_top_n_tokens),
            max_input_tokens=getattr(config, "max_input_tokens", 0) or None,
            enable_prefill_logprobs=pick("enable_prefill_logprobs", tgi.enable_prefill_logprobs),
        )


@dataclass(slots=True)
class RequestParameters:
    sampling: SamplingParams
    options: dict[str, Any] = field(default_factory=dict)  # validated values SamplingParams has no field for


# ---- types: raw value -> typed value, or a message --------------------------------------------------------------
def _plain(value: Any) -> Any:
    """numpy scalars and one-element arrays (Triton tensors) -> Python values; anything else as is."""
    if callable(getattr(value, "item", None)) and getattr(value, "size", 1) == 1:
        return value.item()
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _error(f"`{name}` must be a number, got {value!r}")
    return float(value)


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _error(f"`{name}` must be an integer, got {value!r}")
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _error(f"`{name}` must be a boolean, got {value!r}")
    return value


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _error(f"`{name}` must be a string, got {value!r}")
    return value


def _as_str_list(name: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value  # vLLM allows one string
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _error(f"`{name}` must be a list of strings, got {value!r}")
    return items


def _as_int_list(name: str, value: Any) -> list[int]:
    if not isinstance(value, list):
        raise _error(f"`{name}` must be a list of integers, got {value!r}")
    return [_as_int(name, _plain(v)) for v in value]


def _as_any(name: str, value: Any) -> Any:
    return value


@dataclass(frozen=True, slots=True)
class _Field:
    convert: Callable[[str, Any], Any]
    canonical: str | None = None  # the name values are stored under; None: the field's own name


# Every accepted key. TGI names first, then vLLM's (aliases point at the TGI name they mean).
FIELDS: dict[str, _Field] = {
    "do_sample": _Field(_as_bool),
    "temperature": _Field(_as_float),
    "top_k": _Field(_as_int),
    "top_p": _Field(_as_float),
    "typical_p": _Field(_as_float),
    "seed": _Field(_as_int),
    "max_new_tokens": _Field(_as_int),
    "min_new_tokens": _Field(_as_int),
    "repetition_penalty": _Field(_as_float),
    "frequency_penalty": _Field(_as_float),
    "presence_penalty": _Field(_as_float),
    "min_p": _Field(_as_float),
    "stop": _Field(_as_str_list),
    "truncate": _Field(_as_int),
    "watermark": _Field(_as_bool),
    "details": _Field(_as_bool),
    "decoder_input_details": _Field(_as_bool),
    "return_full_text": _Field(_as_bool),
    "top_n_tokens": _Field(_as_int),
    "best_of": _Field(_as_int),
    "adapter_id": _Field(_as_str),
    "grammar": _Field(_as_any),
    # vLLM (Triton's vllm_backend `sampling_parameters`)
    "max_tokens": _Field(_as_int, "max_new_tokens"),
    "min_tokens": _Field(_as_int, "min_new_tokens"),
    "truncate_prompt_tokens": _Field(_as_int, "truncate"),
    "lora_name": _Field(_as_str, "adapter_id"),
    "n": _Field(_as_int, "best_of"),  # one request, several sequences: best first, the rest in best_of_sequences
    "ignore_eos": _Field(_as_bool),
    "stop_token_ids": _Field(_as_int_list),
    "logprobs": _Field(_as_int),
    "stream_interval": _Field(_as_int),  # tokens per streamed response (the serving loop reads it)
    "prompt_logprobs": _Field(_as_int),
    "skip_special_tokens": _Field(_as_bool),
    "spaces_between_special_tokens": _Field(_as_bool),
    "include_stop_str_in_output": _Field(_as_bool),
    "detokenize": _Field(_as_bool),
}


def _error(detail: str) -> ValidationError:
    return ValidationError(PREFIX + detail)


# ---- reading the inputs -------------------------------------------------------------------------------------
def _load(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    if raw is None:
        return {}
    if isinstance(raw, (str, bytes)):
        if not raw.strip():
            return {}
        try:
            raw = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise _error(f"`sampling_parameters` is not valid JSON: {exc}") from exc
    if not isinstance(raw, Mapping):
        raise _error(f"`sampling_parameters` must be a JSON object, got {type(raw).__name__}")
    return dict(raw)


def _canonical(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed values under canonical names; null means "not given"; two aliases may not disagree."""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, raw in values.items():
        spec = FIELDS.get(key)
        if spec is None:
            raise _error(f"unknown parameter `{key}`")
        value = _plain(raw)
        if value is None:
            continue
        value = spec.convert(key, value)
        name = spec.canonical or key
        if name in out and out[name] != value:
            raise _error(f"`{given_as[name]}` and `{key}` are the same parameter and disagree")
        out[name] = value
        given_as[name] = key
    return out


# ---- checks: one per parameter, TGI's texts -----------------------------------------------------------------
def _check_ranges(p: Mapping[str, Any], limits: ValidationLimits) -> None:
    def require(name: str, ok: Callable[[Any], bool], message: str) -> None:
        if name in p and not ok(p[name]):
            raise _error(message)

    require("temperature", lambda v: v >= 0, "`temperature` must be strictly positive")
    require("top_p", lambda v: 0 < v <= 1, "`top_p` must be > 0.0 and < 1.0")
    require("top_k", lambda v: v > 0 or v == -1, "`top_k` must be strictly positive")
    require("typical_p", lambda v: 0 < v < 1, "`typical_p` must be > 0.0 and < 1.0")
    require("repetition_penalty", lambda v: v > 0, "`repetition_penalty` must be strictly positive")
    require("frequency_penalty", lambda v: -2 <= v <= 2, "`frequency_penalty` must be >= -2.0 and <= 2.0")
    require("presence_penalty", lambda v: -2 <= v <= 2, "`presence_penalty` must be >= -2.0 and <= 2.0")
    require("min_p", lambda v: 0 <= v <= 1, "`min_p` must be >= 0.0 and <= 1.0")
    require("max_new_tokens", lambda v: v > 0, "`max_new_tokens` must be strictly positive")
    require("min_new_tokens", lambda v: v >= 0, "`min_new_tokens` must be >= 0")
    require("seed", lambda v: 0 <= v < 2**64, "`seed` must be >= 0 and < 2^64")
    require("logprobs", lambda v: v >= 0, "`logprobs` must be >= 0")
    require("prompt_logprobs", lambda v: v >= 0, "`prompt_logprobs` must be >= 0")
    require("stop_token_ids", lambda v: all(i >= 0 for i in v), "`stop_token_ids` must be >= 0")
    require("stream_interval", lambda v: v >= 1, "`stream_interval` must be at least 1")
    top_n, best_of, stops = limits.max_top_n_tokens, limits.max_best_of, limits.max_stop_sequences
    require(
        "top_n_tokens",
        lambda v: 0 <= v <= top_n,
        f"`top_n_tokens` must be >= 0 and <= {top_n}. Given: {p.get('top_n_tokens')}",
    )
    require("best_of", lambda v: 0 < v <= best_of, f"`best_of` must be > 0 and <= {best_of}. Given: {p.get('best_of')}")
    require(
        "stop",
        lambda v: len(v) <= stops,
        f"`stop` supports up to {stops} stop sequences. Given: {len(p.get('stop', []))}",
    )
    _check_truncate(p.get("truncate"), limits.max_input_tokens)
    if "grammar" in p:
        raise _error("grammar is not supported")


def _check_truncate(truncate: int | None, max_input: int | None) -> None:
    if truncate is None:
        return
    if max_input is None:
        if truncate <= 0:
            raise _error("`truncate` must be strictly positive")
    elif not 0 < truncate <= max_input:
        raise _error(f"`truncate` must be strictly positive and less than {max_input}. Given: {truncate}")


def _wants_sampling(p: Mapping[str, Any]) -> bool:
    """TGI: sampling is on with do_sample, or any warper; temperature 0 (vLLM / OpenAI) forces greedy."""
    if p.get("temperature") == 0:
        return False
    return bool(
        p.get("do_sample")
        or p.get("temperature", 1.0) != 1.0
        or p.get("top_k", -1) > 0
        or p.get("top_p", 1.0) < 1.0
        or p.get("typical_p", 1.0) < 1.0
    )


def _check_combinations(p: Mapping[str, Any], sampling: bool, stream: bool, limits: ValidationLimits) -> None:
    best_of = p.get("best_of", 1)
    if best_of > 1 and not sampling:
        raise _error("you must use sampling when `best_of` is > 1")
    if best_of > 1 and "seed" in p:
        raise _error("`seed` must not be set when `best_of` > 1")
    if stream and best_of != 1:
        raise _error("`best_of` != 1 is not supported when streaming tokens")
    if stream and p.get("decoder_input_details"):
        raise _error("`decoder_input_details` == true is not supported when streaming tokens")
    if p.get("decoder_input_details") and not limits.enable_prefill_logprobs:
        raise _error("`decoder_input_details` == true is not supported: prefill logprobs are disabled "
                     "(start the server with --enable-prefill-logprobs)")
    if p.get("min_new_tokens", 0) > p.get("max_new_tokens", math.inf):
        raise _error("`min_new_tokens` must be <= `max_new_tokens`")


# ---- entry points -------------------------------------------------------------------------------------------
def parse_request_parameters(
    raw: str | Mapping[str, Any] | None,
    *,
    stream: bool = False,
    limits: ValidationLimits | None = None,
    **plain_inputs: Any,
) -> RequestParameters:
    """Validates `raw` (a JSON object or dict) and `plain_inputs` (separate tensors; they win over the JSON).

    Raises ValidationError with TGI's message for anything a client got wrong.
    """
    params = _canonical(_load(raw))
    params.update(_canonical({k: v for k, v in plain_inputs.items() if v is not None}))
    limits = limits or ValidationLimits()
    _check_ranges(params, limits)
    sampling = _wants_sampling(params)
    _check_combinations(params, sampling, stream, limits)
    sp = _sampling_params(params, sampling)
    options = {k: v for k, v in params.items() if k not in _STORED}
    return RequestParameters(sampling=sp, options=options)


# canonical names SamplingParams holds; the rest stays in RequestParameters.options
_STORED = frozenset({
    "do_sample", "temperature", "top_k", "top_p", "seed", "max_new_tokens", "ignore_eos", "typical_p", "min_p",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "watermark", "min_new_tokens", "stop",
    "stop_token_ids", "truncate", "return_full_text", "details", "decoder_input_details", "top_n_tokens", "best_of",
    "adapter_id", "detokenize",
})


def _sampling_params(p: Mapping[str, Any], sampling: bool) -> SamplingParams:
    greedy_by_temperature = p.get("temperature") == 0
    return SamplingParams(
        do_sample=sampling,
        temperature=1.0 if greedy_by_temperature else p.get("temperature", 1.0),
        top_k=max(p.get("top_k", 0), 0),
        top_p=p.get("top_p", 1.0),
        seed=p.get("seed"),
        max_new_tokens=p.get("max_new_tokens"),
        ignore_eos=p.get("ignore_eos", False),
        typical_p=p.get("typical_p", 1.0),
        min_p=p.get("min_p", 0.0),
        repetition_penalty=p.get("repetition_penalty", 1.0),
        frequency_penalty=p.get("frequency_penalty", 0.0),
        presence_penalty=p.get("presence_penalty", 0.0),
        watermark=p.get("watermark", False),
        min_new_tokens=p.get("min_new_tokens", 0),
        stop=tuple(s for s in p.get("stop", ()) if s),  # an empty stop string would stop at once
        stop_token_ids=tuple(p.get("stop_token_ids", ())),
        truncate=p.get("truncate"),
        return_full_text=p.get("return_full_text"),
        details=p.get("details", False),
        decoder_input_details=p.get("decoder_input_details", False),
        top_n_tokens=p.get("top_n_tokens", 0),
        best_of=p.get("best_of", 1),
        adapter_id=p.get("adapter_id") or None,
        detokenize=p.get("detokenize", True),
    )


def parse_sampling_parameters(
    raw: str | Mapping[str, Any] | None,
    *,
    stream: bool = False,
    limits: ValidationLimits | None = None,
    **plain_inputs: Any,
) -> SamplingParams:
    """Like `parse_request_parameters`, keeping only what SamplingParams holds."""
    return parse_request_parameters(raw, stream=stream, limits=limits, **plain_inputs).sampling
