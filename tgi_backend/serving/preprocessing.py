"""The ensemble's preprocessing: text_input -> input_ids (the engine's own tokenization), stateless."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tgi_backend.errors import ValidationError
from tgi_backend.serving.triton_model import model_parameters, triton_error


def load_model_tokenizer(args: dict[str, str]) -> Any:
    """The tokenizer of the model named by this model's `model_id` / `revision` parameters."""
    from tgi_backend.tokenizer.loader import load_tokenizer
    from tgi_backend.weights.hub import resolve_model_path

    params = model_parameters(json.loads(args["model_config"]))
    return load_tokenizer(resolve_model_path(params["model_id"], params.get("revision") or None))


def encode(tokenizer: Any, text: str) -> list[int]:
    # Same call as LLMEngine.tokenize, so the ensemble and tgi_llm see the same prompt ids.
    return tokenizer.encode(text, add_special_tokens=True)


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = load_model_tokenizer(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        try:
            raw = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)
            if raw.size != 1:
                raise ValidationError("Input validation error: `text_input` must hold one string")
            value = raw[0]
            text = value.decode("utf-8") if isinstance(value, bytes) else str(value)
            if text == "":
                raise ValidationError("Input validation error: `inputs` cannot be empty")
            ids = np.array(encode(self.tokenizer, text), dtype=np.int32)
        except UnicodeDecodeError:
            return _error(ValidationError("Input validation error: `text_input` is not valid UTF-8"))
        except Exception as exc:
            return _error(exc)
        return pb_utils.InferenceResponse(
            output_tensors=[
                pb_utils.Tensor("input_ids", ids),
                pb_utils.Tensor("return_decode_window", np.array([True], dtype=np.bool_)),
            ]
        )

    def finalize(self) -> None:
        pass


def _error(exc: Exception) -> Any:
    return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(exc))
