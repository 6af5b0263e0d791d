"""Every validation error of the generation contract, end to end through tritonserver (INVALID_ARG with TGI's
message), then the details output of a best_of request."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.grpc_client import TGITritonClient, build_inputs

pytestmark = pytest.mark.e2e

# (prompt, stream, max_tokens, sampling_parameters, the message after "Input validation error: ")
CASES = [
    ("hi", False, None, {"temperature": -1}, "`temperature` must be strictly positive"),
    ("hi", False, None, {"top_k": 0}, "`top_k` must be strictly positive"),
    ("hi", False, None, {"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
    ("hi", False, None, {"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ("hi", False, None, {"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ("hi", False, None, {"frequency_penalty": 3}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ("hi", False, None, {"presence_penalty": -3}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ("hi", False, None, {"min_p": 2}, "`min_p` must be >= 0.0 and <= 1.0"),
    ("hi", False, None, {"seed": -1}, "`seed` must be >= 0 and < 2^64"),
    ("hi", False, 0, None, "`max_new_tokens` must be strictly positive"),
    ("hi", False, None, {"max_new_tokens": 511}, "`inputs` tokens + `max_new_tokens` must be <= 512. Given: "),
    ("word " * 200, False, 2, None, "`inputs` must have less than 48 tokens. Given: "),
    ("", False, 2, None, "`inputs` cannot be empty"),
    ("hi", False, None, {"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ("hi", False, None, {"truncate": 100}, "`truncate` must be strictly positive and less than 48. Given: 100"),
    ("hi", False, None, {"truncate": 0}, "`truncate` must be strictly positive and less than 48. Given: 0"),
    ("hi", False, None, {"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ("hi", False, None, {"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ("hi", False, None, {"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ("hi", True, None, {"best_of": 2, "do_sample": True}, "`best_of` != 1 is not supported when streaming tokens"),
    ("hi", True, None, {"decoder_input_details": True},
     "`decoder_input_details` == true is not supported when streaming tokens"),
    ("hi", False, None, {"decoder_input_details": True},
     "`decoder_input_details` == true is not supported: prefill logprobs are disabled"),
    ("hi", False, None, {"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ("hi", False, None, {"grammar": {"type": "json", "value": {}}}, "grammar is not supported"),
    ("hi", False, None, {"min_new_tokens": 5, "max_new_tokens": 2}, "`min_new_tokens` must be <= `max_new_tokens`"),
    ("hi", False, None, {"temperature": "hot"}, "`temperature` must be a number, got 'hot'"),
    ("hi", False, None, {"max_tokens": 3, "max_new_tokens": 4},
     "`max_tokens` and `max_new_tokens` are the same parameter and disagree"),
    ("hi", False, None, {"no_such_knob": 1}, "unknown parameter `no_such_knob`"),
]


def test_every_validation_error_is_invalid_arg_with_tgis_message(server):
    client = TGITritonClient(server.grpc_url)
    failures = []
    for prompt, stream, max_tokens, params, message in CASES:
        try:
            client.generate(prompt, stream=stream, max_tokens=max_tokens, sampling_parameters=params)
        except InferenceServerException as exc:
            text = str(exc)
            if "Input validation error: " + message not in text:
                failures.append((params, message, text))
            continue
        failures.append((params, message, "no error"))
    assert not failures, failures
    assert len(client.generate("still serving", max_tokens=2).token_ids) <= 2


def test_validation_errors_over_http_generate_are_400(server):
    # HTTP shows the status code: INVALID_ARG is 400 (the TGI front maps it to 422); `stop` comes as a tensor
    failures = []
    for prompt, stream, max_tokens, params, message in CASES:
        if stream or any(isinstance(v, dict) for v in (params or {}).values()) or "max_tokens" in (params or {}):
            continue  # HTTP generate turns "max_tokens" into the plain input, which wins over the JSON
        body = {"text_input": prompt, **(params or {})}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        status, text = server.post("/v2/models/tgi_llm/generate", body)
        if status != 400 or "Input validation error: " + message not in text:
            failures.append((body, status, text))
    assert not failures, failures


def _responses(client: TGITritonClient, inputs) -> list:
    return [r for r in client.responses(inputs) if r.as_numpy("text_output") is not None]


def test_details_output_of_a_best_of_request_with_stop_input(server):
    client = TGITritonClient(server.grpc_url)
    params = {"best_of": 2, "do_sample": True, "details": True, "top_n_tokens": 2, "max_new_tokens": 6,
              "ignore_eos": True, "return_full_text": False}
    inputs = build_inputs("hello there", stream=False, sampling_parameters=params)
    stop = grpcclient.InferInput("stop", [2], "BYTES")
    stop.set_data_from_numpy(np.array([b"never-1", b"never-2"], dtype=np.object_))
    (response,) = _responses(client, inputs + [stop])
    details = json.loads(response.as_numpy("details")[0])
    ids = [int(i) for i in response.as_numpy("output_ids")]
    assert [t["id"] for t in details["tokens"]] == ids and len(ids) == 6
    assert len(details["top_tokens"]) == 6 and all(len(t) == 2 for t in details["top_tokens"])
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 6
    assert isinstance(details["seed"], int) and len(details["best_of_sequences"]) == 1
    text = "".join(t["text"] for t in details["tokens"] if not t["special"])  # the text skips special tokens
    # A sequence that ends inside a character (unseeded sampling: best_of refuses a seed) flushes its pending bytes
    # as U+FFFD into the text at its last token; when that token is special, its details text is its own.
    output = response.as_numpy("text_output")[0].decode()
    assert output.startswith(text) and set(output[len(text):]) <= {"\ufffd"}, (output, text)
    plain = _responses(client, build_inputs("hello there", stream=True, max_tokens=2))
    assert all(r.as_numpy("details")[0] == b"" for r in plain)
