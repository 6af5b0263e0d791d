"""Triton's HTTP generate extension: generate, generate_stream (SSE), errors, and request parameters."""
from __future__ import annotations

import json
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def _ids(value) -> list[int]:
    return value if isinstance(value, list) else [value]  # Triton's JSON writes one-element tensors as scalars


def _sse_events(server, body: dict) -> list[dict]:
    request = urllib.request.Request(server.http_url + "/v2/models/tgi_llm/generate_stream",
                                     data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.status == 200
        lines = response.read().decode().splitlines()
    return [json.loads(line[len("data:"):]) for line in lines if line.startswith("data:")]


def test_generate_returns_prompt_and_completion(server):
    body = {"text_input": "Hello", "parameters": {"max_tokens": 8, "ignore_eos": True},
            "return_num_output_tokens": True}
    status, text = server.post("/v2/models/tgi_llm/generate", body)
    assert status == 200, text
    reply = json.loads(text)
    assert reply["text_output"].startswith("Hello") and len(reply["output_ids"]) == 8
    assert reply["finish_reason"] == "length" and reply["num_output_tokens"] == 8


def test_generate_stream_deltas_join_to_the_whole_text(server):
    common = {"text_input": "The weather", "max_tokens": 10,
              "sampling_parameters": json.dumps({"ignore_eos": True, "temperature": 0})}
    events = _sse_events(server, {**common, "stream": True})
    assert len(events) == 10 and all("error" not in e for e in events)
    assert [e["finish_reason"] for e in events][-1] == "length"
    status, text = server.post("/v2/models/tgi_llm/generate", {**common, "exclude_input_in_output": True})
    assert status == 200, text
    whole = json.loads(text)
    assert "".join(e["text_output"] for e in events) == whole["text_output"]
    assert [i for e in events for i in _ids(e["output_ids"])] == _ids(whole["output_ids"])


def test_http_errors_are_clear_and_the_server_keeps_serving(server):
    status, text = server.post("/v2/models/tgi_llm/generate", {"text_input": "hi", "max_tokens": 0})
    assert status == 400 and "`max_new_tokens` must be strictly positive" in json.loads(text)["error"]
    status, text = server.post("/v2/models/tgi_llm/generate", {"text_input": "hi", "parameters": {"bogus": 1}})
    assert status == 400 and "unknown parameter `bogus`" in text
    # An error before the first event is a plain HTTP error, also on generate_stream.
    status, text = server.post("/v2/models/tgi_llm/generate_stream", {"text_input": "", "stream": True})
    assert status == 400 and "`inputs` cannot be empty" in text
    status, text = server.post("/v2/models/tgi_llm/generate", {"text_input": "hi", "max_tokens": 2})
    assert status == 200 and len(_ids(json.loads(text)["output_ids"])) <= 2
