"""Request tensors -> Job, and Chunk -> output arrays. numpy only (no Triton), so it is testable alone."""
from __future__ import annotations

import json
from typing import Any, Callable, Mapping

import numpy as np

from tgi_backend.errors import ValidationError
from tgi_backend.sampling.details import dumps as dumps_details
from tgi_backend.serving.engine_loop import Chunk, Job

GetInput = Callable[[str], "np.ndarray | None"]
BOOL_INPUTS = ("stream", "exclude_input_in_output", "return_num_input_tokens", "return_num_output_tokens",
               "return_kv_stats", "return_decode_window")


def parse_job(
    get: GetInput,
    request_parameters: str | Mapping[str, Any] | None = None,
    limits: Any = None,
) -> tuple[Job, dict[str, bool]]:
    """Builds a Job from the tgi_llm inputs; returns it with the flags that choose optional outputs.

    `limits` (sampling.params.ValidationLimits, from the engine's config) bound stop / top_n_tokens / best_of.
    """
    flags = {name: _bool(get, name) for name in BOOL_INPUTS}
    text = _string(get, "text_input")
    ids = get("input_ids")
    token_ids = None
    if ids is not None:
        if ids.dtype.kind not in "iu":
            raise ValidationError(f"Input validation error: `input_ids` must be integers, got {ids.dtype}")
        token_ids = ids.reshape(-1).tolist()  # Python ints: ~1 us for 128 ids, a comprehension ~17 us
    if text is not None and token_ids is not None:
        raise ValidationError("Input validation error: give either `text_input` or `input_ids`, not both")
    has_prompt = text is not None or token_ids is not None
    parsed = _sampling(get, request_parameters, flags["stream"], limits) if has_prompt else None
    params = None if parsed is None else parsed.sampling
    job = Job(
        prompt_text=text,
        prompt_token_ids=token_ids,
        stream=flags["stream"],
        exclude_input_in_output=flags["exclude_input_in_output"],
        decode_window=flags["return_decode_window"],
        kv_stats=flags["return_kv_stats"],
    )
    if params is not None:
        job.params = params
        if params.return_full_text is not None:  # TGI's name wins over exclude_input_in_output
            job.exclude_input_in_output = not params.return_full_text
        job.stream_interval = int(parsed.options.get("stream_interval", 1))
    elif not job.kv_stats:
        raise ValidationError("Input validation error: give `text_input` or `input_ids`")
    return job, flags


def _sampling(get: GetInput, request_parameters: str | Mapping[str, Any] | None, stream: bool, limits: Any) -> Any:
    from tgi_backend.sampling.params import parse_request_parameters

    merged = _request_parameters(request_parameters)
    raw = _string(get, "sampling_parameters")
    if raw is not None and raw.strip():
        try:
            given = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ValidationError(f"Input validation error: `sampling_parameters` is not valid JSON: {exc}") from exc
        if not isinstance(given, dict):
            raise ValidationError("Input validation error: `sampling_parameters` must be a JSON object")
        merged.update(given)
    plain: dict[str, Any] = {}
    max_tokens = get("max_tokens")
    if max_tokens is not None:
        if max_tokens.dtype.kind not in "iu" or max_tokens.size != 1:
            raise ValidationError("Input validation error: `max_tokens` must be one integer")
        plain["max_tokens"] = int(max_tokens.reshape(-1)[0])
    stop = get("stop")
    if stop is not None:  # a list input, so that HTTP generate's "stop": [...] becomes a tensor
        plain["stop"] = [_utf8("stop", v) for v in stop.reshape(-1)]
    return parse_request_parameters(merged, stream=stream, limits=limits, **plain)


def _utf8(name: str, value: Any) -> str:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(f"Input validation error: `{name}` is not valid UTF-8") from exc
    if isinstance(value, str):
        return value
    raise ValidationError(f"Input validation error: `{name}` must be strings, got {type(value).__name__}")


def _request_parameters(raw: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """Triton request parameters (HTTP generate's non-input keys); Triton's own `triton_*` keys dropped."""
    if not raw:
        return {}
    values = json.loads(raw) if isinstance(raw, str) else dict(raw)
    return {k: v for k, v in values.items() if not k.startswith("triton_")}


def _string(get: GetInput, name: str) -> str | None:
    array = get(name)
    if array is None:
        return None
    if array.size != 1:
        raise ValidationError(f"Input validation error: `{name}` must hold one string, got {array.size}")
    value = array.reshape(-1)[0]
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValidationError(f"Input validation error: `{name}` is not valid UTF-8") from exc
    if isinstance(value, str):
        return value
    raise ValidationError(f"Input validation error: `{name}` must be a string, got {array.dtype}")


def _bool(get: GetInput, name: str) -> bool:
    array = get(name)
    if array is None or array.size == 0:
        return False
    if array.dtype != np.bool_:
        raise ValidationError(f"Input validation error: `{name}` must be a boolean, got {array.dtype}")
    return bool(array.reshape(-1)[0])


def skip_unread_text(job: Job, wanted: frozenset[str] | None) -> None:
    """A client that names its outputs without `text_output` (the ensemble, perf_analyzer-style loads reading
    `output_ids`) reads no text: the engine need not detokenize (stop strings and details still do)."""
    if wanted is not None and "text_output" not in wanted:
        job.params.detokenize = False


# The outputs every response can carry, built only when the client asked for them.
_OUTPUTS: dict[str, Callable[[Chunk], np.ndarray]] = {
    "text_output": lambda c: np.array([c.text.encode("utf-8")], dtype=np.object_),
    "output_ids": lambda c: np.array(c.token_ids, dtype=np.int32),
    "finish_reason": lambda c: np.array([c.finish_reason.encode("utf-8")], dtype=np.object_),
    "details": lambda c: np.array([dumps_details(c.details).encode("utf-8")], dtype=np.object_),
}


def output_arrays(
    chunk: Chunk, flags: Mapping[str, bool], wanted: frozenset[str] | None = None
) -> dict[str, np.ndarray]:
    """The output tensors of one response; the ensemble mode (decode window) adds all the optional ones.

    `wanted`: the outputs the client asked for (None: all). The others are not built: a streamed token costs
    one tensor instead of four when a client asks only for `output_ids` or `text_output`.
    """
    if chunk.kv_blocks is not None and not chunk.token_ids and not chunk.finish_reason:
        return _kv_arrays(chunk)  # a stats query
    everything = flags.get("return_decode_window", False)
    out = {name: build(chunk) for name, build in _OUTPUTS.items() if wanted is None or name in wanted}
    if everything or flags.get("return_num_input_tokens"):
        out["num_input_tokens"] = np.array([chunk.num_input_tokens], dtype=np.int32)
    if everything or flags.get("return_num_output_tokens"):
        out["num_output_tokens"] = np.array([chunk.num_output_tokens], dtype=np.int32)
    if everything:
        out["context_ids"] = np.array(chunk.context_ids or [], dtype=np.int32)
        out["unread_ids"] = np.array(chunk.unread_ids or [], dtype=np.int32)
    if chunk.kv_blocks is not None:
        out.update(_kv_arrays(chunk))
    return out


def _kv_arrays(chunk: Chunk) -> dict[str, np.ndarray]:
    assert chunk.kv_blocks is not None
    free, total = chunk.kv_blocks
    return {
        "kv_blocks_free": np.array([free], dtype=np.int32),
        "kv_blocks_total": np.array([total], dtype=np.int32),
    }
