"""Sync helper over tritonclient's gRPC stream: `generate_stream` yields deltas; leaving the loop cancels.

    for delta in generate_stream("Hello", url="127.0.0.1:8001", max_tokens=20):
        print(delta.text, end="", flush=True)
"""
from __future__ import annotations

import json
import queue
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

DEFAULT_URL = "127.0.0.1:8001"


@dataclass(slots=True)
class StreamDelta:
    text: str
    token_ids: list[int]
    finish_reason: str | None  # set on the last delta
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


@dataclass(slots=True)
class GenerateResult:
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    num_input_tokens: int | None = None
    num_output_tokens: int | None = None


def build_inputs(
    prompt: str,
    *,
    stream: bool,
    max_tokens: int | None = None,
    sampling_parameters: dict[str, Any] | None = None,
    exclude_input_in_output: bool | None = None,
    extra_bools: dict[str, bool] | None = None,
) -> list[grpcclient.InferInput]:
    """The request tensors of tgi_llm / ensemble (vLLM backend names)."""
    inputs = [_tensor("text_input", np.array([prompt.encode("utf-8")], dtype=np.object_), "BYTES")]
    bools = {"stream": stream, **(extra_bools or {})}
    if exclude_input_in_output is not None:
        bools["exclude_input_in_output"] = exclude_input_in_output
    for name, value in bools.items():
        inputs.append(_tensor(name, np.array([value], dtype=np.bool_), "BOOL"))
    if max_tokens is not None:
        inputs.append(_tensor("max_tokens", np.array([max_tokens], dtype=np.int32), "INT32"))
    if sampling_parameters:
        raw = json.dumps(sampling_parameters).encode("utf-8")
        inputs.append(_tensor("sampling_parameters", np.array([raw], dtype=np.object_), "BYTES"))
    return inputs


def _tensor(name: str, array: np.ndarray, datatype: str) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


class TGITritonClient:
    """One gRPC connection; each generate_stream call opens (and closes) its own stream."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "tgi_llm", timeout: float | None = 600.0) -> None:
        self.url = url
        self.model = model
        self.timeout = timeout

    def generate_stream(self, prompt: str, *, stream: bool = True, **kwargs: Any) -> Iterator[StreamDelta]:
        """Yields one delta per response (one in all when stream=False); leaving the loop cancels."""
        for result in self.responses(build_inputs(prompt, stream=stream, **kwargs)):
            delta = _delta(result)
            if delta is not None:
                yield delta

    def responses(self, inputs: list[grpcclient.InferInput]) -> Iterator[Any]:
        """Raw InferResult objects of one request over a gRPC stream (decoupled models refuse unary calls)."""
        results: queue.SimpleQueue[tuple[Any, Any]] = queue.SimpleQueue()
        client = grpcclient.InferenceServerClient(self.url)
        finished = False
        try:
            client.start_stream(callback=lambda result, error: results.put((result, error)))
            client.async_stream_infer(self.model, inputs, enable_empty_final_response=True)
            while not finished:
                result, error = results.get(timeout=self.timeout)
                if error is not None:
                    finished = True  # the server ended the request with this error
                    raise error
                finished = _is_final(result)
                yield result
        finally:
            client.stop_stream(cancel_requests=not finished)
            client.close()

    def generate(self, prompt: str, **kwargs: Any) -> GenerateResult:
        """Streams and joins the deltas (the request is cancelled if this is interrupted)."""
        result = GenerateResult(text="")
        parts: list[str] = []
        for delta in self.generate_stream(prompt, **kwargs):
            parts.append(delta.text)
            result.token_ids.extend(delta.token_ids)
            result.finish_reason = delta.finish_reason or result.finish_reason
            result.num_input_tokens = delta.num_input_tokens or result.num_input_tokens
            result.num_output_tokens = delta.num_output_tokens or result.num_output_tokens
        result.text = "".join(parts)
        return result


def _is_final(result: Any) -> bool:
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def _delta(result: Any) -> StreamDelta | None:
    text = result.as_numpy("text_output")
    if text is None:
        return None  # the empty final response
    ids = result.as_numpy("output_ids")
    reason = result.as_numpy("finish_reason")
    n_in, n_out = result.as_numpy("num_input_tokens"), result.as_numpy("num_output_tokens")
    reason_text = reason.reshape(-1)[0].decode("utf-8") if reason is not None and reason.size else ""
    return StreamDelta(
        text="".join(t.decode("utf-8") for t in text.reshape(-1)),
        token_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        finish_reason=reason_text or None,
        num_input_tokens=None if n_in is None else int(n_in.reshape(-1)[0]),
        num_output_tokens=None if n_out is None else int(n_out.reshape(-1)[0]),
    )


def kv_stats(url: str = DEFAULT_URL, *, model: str = "tgi_llm", timeout: float = 120.0) -> tuple[int, int]:
    """The engine's KV pool as (free blocks, total blocks): tgi_llm's `return_kv_stats` query."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    flag = _tensor("return_kv_stats", np.array([True]), "BOOL")
    try:
        client.async_stream_infer(model, [flag], enable_empty_final_response=True)
        result, error = responses.get(timeout=timeout)
    finally:
        client.stop_stream()
        client.close()
    if error is not None:
        raise error
    return int(result.as_numpy("kv_blocks_free")[0]), int(result.as_numpy("kv_blocks_total")[0])


def generate_stream(prompt: str, *, url: str = DEFAULT_URL, model: str = "tgi_llm", **kwargs: Any) -> Iterator[StreamDelta]:
    return TGITritonClient(url, model).generate_stream(prompt, **kwargs)


def generate(prompt: str, *, url: str = DEFAULT_URL, model: str = "tgi_llm", **kwargs: Any) -> GenerateResult:
    return TGITritonClient(url, model).generate(prompt, **kwargs)


__all__ = ["GenerateResult", "StreamDelta", "TGITritonClient", "build_inputs", "generate", "generate_stream",
           "InferenceServerException"]
