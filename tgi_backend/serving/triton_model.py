"""tgi_llm's Python-backend adapter: tensors <-> Job, responses through the request's response sender.

execute() parses each request, hands it to the EngineLoop and returns None at once (decoupled mode).
"""
from __future__ import annotations

import json
import logging
from typing import Any, Mapping

import triton_python_backend_utils as pb_utils

from tgi_backend.config import EngineConfig
from tgi_backend.errors import OverloadedError, ValidationError
from tgi_backend.serving.engine_loop import Chunk, EngineLoop, stream_budget
from tgi_backend.sampling.params import ValidationLimits
from tgi_backend.serving.inputs import output_arrays, parse_job, skip_unread_text
from tgi_backend.serving.metrics import EngineMetrics

log = logging.getLogger(__name__)
FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def model_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def triton_error(error: Exception) -> Any:
    """ValidationError -> INVALID_ARG, OverloadedError -> UNAVAILABLE, anything else -> INTERNAL."""
    if isinstance(error, ValidationError):
        code = pb_utils.TritonError.INVALID_ARG
    elif isinstance(error, OverloadedError):
        code = pb_utils.TritonError.UNAVAILABLE
    else:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(str(error), code)


class TritonSink:
    """A job's response sender. send/send_error run on the response thread; is_cancelled on the loop's
    cancellation thread."""

    __slots__ = ("sender", "flags", "wanted")

    def __init__(self, sender: Any, flags: dict[str, bool], wanted: frozenset[str] | None = None) -> None:
        self.sender = sender
        self.flags = flags
        self.wanted = wanted  # the outputs the client asked for; None: all

    def send(self, chunk: Chunk | None, final: bool) -> None:
        if chunk is None:
            self.sender.send(flags=FINAL)
            return
        tensors = [pb_utils.Tensor(name, array) for name, array in output_arrays(chunk, self.flags, self.wanted).items()]
        self.sender.send(pb_utils.InferenceResponse(output_tensors=tensors), flags=FINAL if final else 0)

    def send_error(self, error: Exception) -> None:
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=triton_error(error)), flags=FINAL)

    def is_cancelled(self) -> bool:
        return self.sender.is_cancelled()


class TritonPythonModel:
    """tgi_llm: one instance owns the engine (KIND_CPU, count 1)."""

    def initialize(self, args: dict[str, str]) -> None:
        from tgi_backend.engine.engine import LLMEngine

        model_config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(model_config):
            raise pb_utils.TritonModelException("tgi_llm must be decoupled (model_transaction_policy)")
        config = EngineConfig.from_strings(model_parameters(model_config))
        # Built on the engine thread: torch must run on one thread only (see engine_loop's docstring).
        self.loop = EngineLoop.build(lambda: LLMEngine(config), coalesce=config.stream_coalescing,
                                     stream_interval=config.stream_interval,
                                     stream_budget=stream_budget(config.stream_budget))
        self.loop.start()
        self.engine = self.loop.engine
        labels = {"model": args.get("model_name", "tgi_llm"), "version": args.get("model_version", "1")}
        c = self.engine.config
        # An attribute: the metric families must outlive initialize() (see PLATFORM-NOTES).
        self.metrics = EngineMetrics(pb_utils, labels, c.max_total_tokens, c.inter_token_metrics)
        self.limits = ValidationLimits.from_config(c)
        self.loop.observer = self.metrics  # before initialize() returns: no request has arrived yet
        log.warning(
            "tgi_llm ready: model %s, max_input_tokens %d, max_total_tokens %d, KV blocks %d x %d",
            c.model_id, c.max_input_tokens, c.max_total_tokens, c.num_blocks, c.block_size,
        )

    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            sender = request.get_response_sender()
            try:
                job, flags = parse_job(_input_getter(request), request.parameters(), self.limits)
            except Exception as exc:  # a bad request gets its error; the model keeps serving
                error = exc if isinstance(exc, ValidationError) else ValidationError(f"Input validation error: {exc}")
                TritonSink(sender, {}).send_error(error)
                continue
            wanted = _requested_outputs(request)
            skip_unread_text(job, wanted)
            self.loop.submit(job, TritonSink(sender, flags, wanted))
        return None

    def finalize(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.stop()


def _requested_outputs(request: Any) -> frozenset[str] | None:
    names = frozenset(request.requested_output_names())
    return names or None  # Triton lists every output when the client named none


def _input_getter(request: Any) -> Any:
    """name -> numpy array or None. The inputs are listed once: each request.inputs() is a pybind call that
    wraps every tensor again, and parse_job asks for about a dozen names (pb_utils' lookup lists them each time)."""
    tensors = {tensor.name(): tensor for tensor in request.inputs()}

    def get(name: str) -> Any:
        tensor = tensors.get(name)
        return None if tensor is None else tensor.as_numpy()

    return get
