"""The front's one gRPC connection to Triton: a grpc.aio channel, one ModelStreamInfer call per request.

All requests share the channel (one HTTP/2 connection). Each request gets its own stream call on it,
because Triton cancels per call: leaving `stream()` early (client gone, task cancelled) cancels that call,
Triton marks the request cancelled and tgi_llm frees its KV blocks.
"""
from __future__ import annotations

import itertools
import struct
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from tgi_backend.errors import GenerationError, OverloadedError, TGIError, ValidationError
from tgi_backend.frontend.errors import IncompleteGenerationError, UnavailableError

MAX_MESSAGE = 2**31 - 1
OVERLOADED = "Model is overloaded"
VALIDATION_PREFIX = "Input validation error"
# What the front reads (token ids, the finish reason and counts are in `details`): every output is one more
# shared-memory tensor per streamed token in tgi_llm and one more field to decode here.
FRONT_OUTPUTS = ("text_output", "details")


@dataclass(slots=True)
class TritonRequest:
    """tgi_llm's inputs for one generation (vLLM backend names)."""

    text: str
    sampling_parameters: str  # JSON
    stream: bool
    bools: dict[str, bool] = field(default_factory=dict)
    outputs: tuple[str, ...] = ()  # requested outputs; empty: all


def error_from_message(message: str) -> TGIError:
    """tgi_llm's error texts -> our errors (Triton's stream responses carry the text, not the code)."""
    if VALIDATION_PREFIX in message:
        return ValidationError(message[message.index(VALIDATION_PREFIX):])
    if OVERLOADED in message:
        return OverloadedError()
    if message.startswith("Request failed during generation"):
        return GenerationError(message)
    return GenerationError(f"Request failed during generation: {message}")


def _bytes_content(value: bytes) -> bytes:
    return struct.pack("<I", len(value)) + value


def _utf8(text: str, name: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates from JSON escapes
        raise ValidationError(f"Input validation error: `{name}` is not valid UTF-8") from exc


def build_request(model: str, request_id: str, req: TritonRequest) -> Any:
    """A ModelInferRequest with raw contents; asks Triton for the empty final response (end marker)."""
    msg = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    tensors: list[tuple[str, str, bytes]] = [
        ("text_input", "BYTES", _bytes_content(_utf8(req.text, "inputs"))),
        ("sampling_parameters", "BYTES", _bytes_content(_utf8(req.sampling_parameters, "parameters"))),
        ("stream", "BOOL", b"\x01" if req.stream else b"\x00"),
    ]
    tensors += [(name, "BOOL", b"\x01" if value else b"\x00") for name, value in req.bools.items()]
    for name, datatype, raw in tensors:
        msg.inputs.add(name=name, datatype=datatype, shape=[1])
        msg.raw_input_contents.append(raw)
    for name in req.outputs:
        msg.outputs.add(name=name)
    msg.parameters["triton_enable_empty_final_response"].bool_param = True
    return msg


def decode_outputs(response: Any) -> dict[str, Any]:
    """A ModelInferResponse's raw outputs: one-element BYTES -> str, INT32 -> list of ints (no numpy per field)."""
    out: dict[str, Any] = {}
    for tensor, raw in zip(response.outputs, response.raw_output_contents):
        if tensor.datatype == "BYTES":
            items, pos = [], 0
            while pos + 4 <= len(raw):
                (size,) = struct.unpack_from("<I", raw, pos)
                items.append(raw[pos + 4:pos + 4 + size].decode("utf-8", errors="replace"))
                pos += 4 + size
            out[tensor.name] = "".join(items)
        elif tensor.datatype == "INT32":
            out[tensor.name] = list(struct.unpack(f"<{len(raw) // 4}i", raw))
    return out


class TritonBridge:
    """Owns the channel. Create and use it inside one running event loop."""

    def __init__(self, url: str, model: str = "tgi_llm") -> None:
        self.url = url
        self.model = model
        self._ids = itertools.count()
        options = [("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE)]
        self.channel = grpc.aio.insecure_channel(url, options=options)
        self.stub = service_pb2_grpc.GRPCInferenceServiceStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def model_ready(self, timeout: float = 5.0) -> bool:
        try:
            reply = await self.stub.ModelReady(service_pb2.ModelReadyRequest(name=self.model), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return bool(reply.ready)

    async def model_parameters(self, timeout: float = 10.0) -> dict[str, str]:
        """tgi_llm's config parameters (EngineConfig.to_strings(), written by the launcher)."""
        try:
            reply = await self.stub.ModelConfig(service_pb2.ModelConfigRequest(name=self.model), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            raise UnavailableError(f"cannot read {self.model}'s config from Triton at {self.url}: {exc.details()}") from exc
        return {key: value.string_value for key, value in reply.config.parameters.items()}

    async def stream(self, req: TritonRequest) -> AsyncIterator[dict[str, Any]]:
        """Yields tgi_llm's responses (`decode_outputs`); raises TGIError on an error response. Leaving early cancels."""
        message = build_request(self.model, f"front-{next(self._ids)}", req)
        call = self.stub.ModelStreamInfer(iter([message]))
        finished = False
        try:
            async for response in call:
                if response.error_message:
                    finished = True
                    raise error_from_message(response.error_message)
                finished = response.infer_response.parameters["triton_final_response"].bool_param
                if response.infer_response.outputs:
                    yield decode_outputs(response.infer_response)
                if finished:
                    return
            finished = True
            raise IncompleteGenerationError()
        except grpc.aio.AioRpcError as exc:
            finished = True
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise UnavailableError(f"Triton is unavailable at {self.url}: {exc.details()}") from exc
            raise GenerationError(f"Request failed during generation: {exc.details()}") from exc
        finally:
            if not finished:
                call.cancel()
