"""The TGI/OpenAI HTTP front against the real server: wire format (checked against TGI's OpenAPI schema, a copy
of ../shared/reference/tgi-openapi.json beside this file), errors, limits, and a disconnect that frees KV blocks."""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from client.grpc_client import kv_stats

pytestmark = pytest.mark.e2e
WAIT = 120.0  # bound for a hung server, not a timing assertion


# ---- TGI's OpenAPI schema as JSON Schema (OpenAPI 3.0 `nullable` -> a null alternative) ----------------------
def _convert(node: Any) -> Any:
    if isinstance(node, list):
        return [_convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _convert(v) for k, v in node.items() if k not in ("nullable", "example", "discriminator")}
    if "$ref" in out:
        out["$ref"] = out["$ref"].replace("#/components/schemas/", "#/definitions/")
    if node.get("nullable"):
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            out = {"anyOf": [{"type": "null"}, out]}
    return out


@lru_cache(maxsize=1)
def _definitions() -> dict:
    spec = json.loads(Path(__file__).with_name("tgi-openapi.json").read_text())
    return _convert(spec["components"]["schemas"])


def check(name: str, instance: Any) -> None:
    """Fails unless `instance` matches TGI's schema `name` (array of it if name ends with [])."""
    ref: dict = {"$ref": f"#/definitions/{name.rstrip('[]')}"}
    schema = {"type": "array", "items": ref} if name.endswith("[]") else ref
    jsonschema.validate(instance, {**schema, "definitions": _definitions()})


# ---- HTTP helpers ---------------------------------------------------------------------------------------------
def post(server, path: str, body: Any, raw: bytes | None = None) -> tuple[int, dict, bytes]:
    data = raw if raw is not None else json.dumps(body).encode()
    request = urllib.request.Request(server.front_url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def get(server, path: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(server.front_url + path, timeout=WAIT) as response:
        return response.status, response.read()


def sse(raw: bytes) -> list[Any]:
    """TGI framing: `data:<json>` blocks separated by a blank line; `[DONE]` stays a string."""
    frames = raw.split(b"\n\n")
    assert frames[-1] == b"", raw[-80:]
    out = []
    for frame in frames[:-1]:
        assert frame.startswith(b"data:"), frame
        payload = frame[5:].strip()
        out.append(payload.decode() if payload == b"[DONE]" else json.loads(payload))
    return out


# ---- tests ----------------------------------------------------------------------------------------------------
def test_generate_and_stream_agree_and_match_the_schema(server):
    body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "details": True, "top_n_tokens": 2}}
    status, headers, raw = post(server, "/generate", body)
    assert status == 200, raw
    reply = json.loads(raw)
    check("GenerateResponse", reply)
    details = reply["details"]
    assert details["generated_tokens"] == len(details["tokens"]) == int(headers["x-generated-tokens"])
    assert all(len(top) == 2 for top in details["top_tokens"])
    for name in ("x-compute-time", "x-time-per-token", "x-prompt-tokens", "x-compute-type", "x-total-time",
                 "x-validation-time", "x-queue-time", "x-inference-time", "x-compute-characters"):
        assert name in headers, name
    stream_body = {"inputs": "Hello there", "parameters": {"max_new_tokens": 6, "details": True,
                                                           "return_full_text": True}}
    status, headers, raw = post(server, "/generate_stream", stream_body)
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    assert b"data: " not in raw  # no space after `data:`
    events = sse(raw)
    for event in events:
        check("StreamResponse", event)
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == "Hello there" + reply["generated_text"]
    assert [e["token"]["id"] for e in events] == [t["id"] for t in details["tokens"]]  # greedy both times
    assert events[-1]["details"]["generated_tokens"] == len(events)


def test_compat_route_lists_or_streams(server):
    status, _, raw = post(server, "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 3, "details": True}})
    assert status == 200
    check("GenerateResponse[]", json.loads(raw))
    status, _, raw = post(server, "/", {"inputs": "Hi", "parameters": {"max_new_tokens": 3}, "stream": True})
    events = sse(raw)
    assert status == 200 and events[-1]["generated_text"] is not None and len(events) <= 3


def test_errors_have_tgi_shapes(server):
    bad = {"inputs": "Hi", "parameters": {"top_p": 7.0}}
    status, _, raw = post(server, "/generate", bad)
    assert status == 422
    assert json.loads(raw) == {"error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                               "error_type": "validation"}
    status, _, raw = post(server, "/generate_stream", {"inputs": "Hi", "parameters": {"best_of": 2, "do_sample": True}})
    assert status == 200  # TGI: the stream started; the error is an event
    assert sse(raw) == [{"error": "Input validation error: `best_of` != 1 is not supported when streaming tokens",
                         "error_type": "validation"}]
    status, _, raw = post(server, "/generate", {"inputs": "x " * 200, "parameters": {"max_new_tokens": 2}})
    assert status == 422 and "must have less than 48 tokens" in json.loads(raw)["error"]
    status, _, raw = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                                           "top_p": 7.0})
    assert status == 422 and json.loads(raw)["error"]["message"].startswith("Input validation error")
    status, _, raw = post(server, "/v1/completions", {"prompt": "x", "suffix": "y"})
    assert status == 422
    status, _, raw = post(server, "/generate", None, raw=b"{" + b" " * 2_100_000 + b"}")
    assert status == 413 and json.loads(raw)["error_type"] == "payload_too_large"


def test_openai_routes_match_the_schema(server):
    chat = {"model": "tgi", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "n": 2,
            "logprobs": True, "top_logprobs": 2, "seed": 1}
    status, _, raw = post(server, "/v1/chat/completions", chat)
    assert status == 200, raw
    reply = json.loads(raw)
    check("ChatCompletion", reply)
    assert [c["index"] for c in reply["choices"]] == [0, 1]
    assert all(len(c["logprobs"]["content"][0]["top_logprobs"]) == 2 for c in reply["choices"])
    stream = {**chat, "n": 1, "stream": True, "stream_options": {"include_usage": True}}
    status, _, raw = post(server, "/v1/chat/completions", stream)
    chunks = sse(raw)
    assert chunks[-1] == "[DONE]" and raw.endswith(b"data: [DONE]\n\n")
    for chunk in chunks[:-1]:
        check("ChatCompletionChunk", chunk)
    assert chunks[-2]["choices"] == [] and chunks[-2]["usage"]["completion_tokens"] == len(chunks) - 2
    assert chunks[-3]["choices"][0]["finish_reason"] in ("length", "stop")
    status, _, raw = post(server, "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 3})
    assert status == 200
    check("CompletionFinal", json.loads(raw))
    status, _, raw = post(server, "/v1/completions", {"prompt": "a", "max_tokens": 3, "stream": True})
    for chunk in sse(raw)[:-1]:
        check("Chunk", chunk)


def test_info_health_metrics_tokenize(server, tokenizer):
    status, raw = get(server, "/info")
    info = json.loads(raw)
    check("Info", info)
    assert info["max_input_tokens"] == 48 and info["max_total_tokens"] == 512
    assert info["max_concurrent_requests"] == 16 and info["max_client_batch_size"] == 4
    assert get(server, "/health")[0] == 200
    status, _, raw = post(server, "/tokenize", {"inputs": "Hello world"})
    tokens = json.loads(raw)
    check("TokenizeResponse", tokens)
    assert [t["id"] for t in tokens] == tokenizer("Hello world")["input_ids"]
    status, _, raw = post(server, "/chat_tokenize", {"messages": [{"role": "user", "content": "hi"}]})
    check("ChatTokenizeResponse", json.loads(raw))
    models = json.loads(get(server, "/v1/models")[1])
    assert models["data"][0]["id"] == info["model_id"]
    text = get(server, "/metrics")[1].decode()
    assert 'tgi_request_success{source="http"}' in text and "nv_inference_count" in text
    types = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE")]
    assert len(types) == len(set(types))  # the front's families merged into Triton's


def _long_greedy_prompt(server, n: int) -> str:
    """A prompt whose greedy continuation runs the full n tokens (no EOS), so a disconnect is mid-way."""
    for prompt in ("tell me a long story", "once upon a time", "a b c d", "the quick brown fox", "hello"):
        status, _, raw = post(server, "/generate", {"inputs": prompt, "parameters": {"max_new_tokens": n,
                                                                                      "details": True}})
        if status == 200 and json.loads(raw)["details"]["finish_reason"] == "length":
            return prompt
    pytest.skip("every candidate prompt hits EOS early on this model")


def _cancelled(server) -> float:
    for line in get(server, "/metrics")[1].decode().splitlines():
        if line.startswith('tgi_request_failure{source="http",err="cancelled"}'):
            return float(line.split()[-1])
    return 0.0


def test_client_leaving_a_stream_cancels_it_and_frees_its_blocks(server):
    free, total = kv_stats(server.grpc_url)
    prompt = _long_greedy_prompt(server, 400)
    before = _cancelled(server)
    url = urllib.parse.urlsplit(server.front_url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=WAIT)
    conn.request("POST", "/generate_stream", json.dumps({"inputs": prompt, "parameters": {"max_new_tokens": 400}}),
                 {"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.readline().startswith(b"data:{")
    conn.sock.close()  # the client goes away mid-stream
    conn.close()
    deadline = time.monotonic() + WAIT
    while _cancelled(server) == before or kv_stats(server.grpc_url)[0] != total:
        assert time.monotonic() < deadline, "the stream was not cancelled or its KV blocks never came back"
        time.sleep(0.1)


# ---- property-based: random TGI requests never get a 5xx, and every answer matches the schema ---------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_floats = lambda lo, hi: st.one_of(st.none(), st.floats(lo, hi, allow_nan=False))  # noqa: E731
# max_new_tokens always given: the default (max_total - input) would make each example long.
PARAMETERS = st.fixed_dictionaries({"max_new_tokens": st.one_of(st.integers(-1, 8), st.just(600))}, optional={
    "do_sample": st.booleans(),
    "temperature": _floats(-0.5, 3.0),
    "top_k": st.one_of(st.none(), st.integers(-2, 40)),
    "top_p": _floats(-0.2, 1.2),
    "typical_p": _floats(-0.2, 1.2),
    "repetition_penalty": _floats(-0.5, 3.0),
    "frequency_penalty": _floats(-3.0, 3.0),
    "seed": st.one_of(st.none(), st.integers(0, 2**40)),
    "stop": st.lists(st.text(min_size=1, max_size=3), max_size=5),
    "truncate": st.one_of(st.none(), st.integers(-1, 60)),
    "details": st.booleans(),
    "top_n_tokens": st.one_of(st.none(), st.integers(-1, 7)),
    "best_of": st.one_of(st.none(), st.integers(0, 3)),
    "return_full_text": st.booleans(),
    "watermark": st.booleans(),
    "not_a_tgi_parameter": st.integers(),
})


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(inputs=st.text(max_size=30), parameters=PARAMETERS, route=st.sampled_from(["/generate", "/generate_stream", "/"]))
def test_random_requests_get_no_5xx_and_match_the_schema(server, inputs, parameters, route):
    status, headers, raw = post(server, route, {"inputs": inputs, "parameters": parameters})
    assert status < 500, raw
    if status != 200:
        check("ErrorResponse", json.loads(raw))
    elif route == "/generate_stream":
        for event in sse(raw):
            check("ErrorResponse" if "error" in event else "StreamResponse", event)
    else:
        check("GenerateResponse[]" if route == "/" else "GenerateResponse", json.loads(raw))


def test_past_max_concurrent_requests_is_429(server):
    """The session server admits 16 requests; 24 long ones at once: the extra ones get TGI's 429."""
    from concurrent.futures import ThreadPoolExecutor

    # 400 tokens each: long enough that the 24 overlap even now that a step no longer polls cancellation
    prompt = _long_greedy_prompt(server, 400)
    body = {"inputs": prompt, "parameters": {"max_new_tokens": 400}}
    with ThreadPoolExecutor(24) as pool:
        replies = list(pool.map(lambda _: post(server, "/generate", body), range(24)))
    statuses = sorted(status for status, _, _ in replies)
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 1, statuses
    overloaded = [json.loads(raw) for status, _, raw in replies if status == 429]
    assert overloaded, "no request was refused"
    assert all(body == {"error": "Model is overloaded", "error_type": "overloaded"} for body in overloaded)
