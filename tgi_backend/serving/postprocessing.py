"""The ensemble's postprocessing: each tgi_llm response's (context_ids, unread_ids) window -> text.

Stateless: tgi_llm chooses the windows (an incremental detokenizer's offsets), so the texts of a stream
concatenate to the full decode, leading spaces kept and multi-byte characters never split.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from tgi_backend.serving.preprocessing import load_model_tokenizer
from tgi_backend.serving.triton_model import triton_error

PASSED_ON = ("output_ids", "finish_reason", "num_input_tokens", "num_output_tokens")


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        self.tokenizer = load_model_tokenizer(args)

    def execute(self, requests: list[Any]) -> list[Any]:
        return [self._one(request) for request in requests]

    def _one(self, request: Any) -> Any:
        from tgi_backend.tokenizer.detokenizer import decode_window

        try:
            context = _ids(request, "context_ids")
            unread = _ids(request, "unread_ids")
            reason = pb_utils.get_input_tensor_by_name(request, "finish_reason").as_numpy().reshape(-1)
            final = reason.size > 0 and bool(reason[0])
            text = decode_window(self.tokenizer, context, unread, skip_special_tokens=True, final=final)
            tensors = [pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]
            for name in PASSED_ON:
                tensors.append(pb_utils.Tensor(name, pb_utils.get_input_tensor_by_name(request, name).as_numpy()))
        except Exception as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=triton_error(exc))
        return pb_utils.InferenceResponse(output_tensors=tensors)

    def finalize(self) -> None:
        pass


def _ids(request: Any, name: str) -> list[int]:
    return [int(i) for i in pb_utils.get_input_tensor_by_name(request, name).as_numpy().reshape(-1)]
