"""The front's HTTP layer over a scripted bridge (no Triton): SSE framing, errors, auth, payload limit, n > 1.

End-to-end behaviour against the real server is in tests/e2e/test_frontend.py and test_clients.py.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, Callable

import pytest
from aiohttp.test_utils import TestClient, TestServer

from tgi_backend.errors import OverloadedError, ValidationError
from tgi_backend.frontend.app import build_front, create_app
from tgi_backend.frontend.model import ServedModel
from tgi_backend.frontend.state import FrontendSettings


def token_response(i: int, text: str, final: str = "", n_in: int = 3) -> dict[str, Any]:
    details = {"tokens": [{"id": 100 + i, "text": text, "logprob": -0.25 * i, "special": False}]}
    if final:
        details.update(finish_reason=final, generated_tokens=i, seed=None)
    return {"text_output": text, "output_ids": [100 + i], "finish_reason": final, "num_input_tokens": n_in,
            "num_output_tokens": i, "details": json.dumps(details)}


def three_tokens(_req: Any) -> list[Any]:
    return [token_response(1, "Hel"), token_response(2, "lo"), token_response(3, "!", "length")]


class FakeBridge:
    """Stands in for TritonBridge: `script(request)` gives the responses (dicts) or an exception to raise."""

    def __init__(self, script: Callable[[Any], list[Any]] = three_tokens, delay: float = 0.0) -> None:
        self.script = script
        self.delay = delay
        self.requests: list[Any] = []
        self.closed_early = 0

    async def model_ready(self) -> bool:
        return True

    async def close(self) -> None:
        pass

    async def stream(self, req: Any):
        self.requests.append(req)
        finished = False
        try:
            for item in self.script(req):
                await asyncio.sleep(self.delay)
                if isinstance(item, Exception):
                    finished = True
                    raise item
                yield item  # what TritonBridge.stream yields: decode_outputs' dict
            finished = True
        finally:
            self.closed_early += not finished


@pytest.fixture(scope="module")
def chat_tokenizer(byte_level_tokenizer_dir: str) -> Any:
    from tgi_backend.tokenizer.loader import load_tokenizer

    return load_tokenizer(byte_level_tokenizer_dir)


def run(bridge: FakeBridge, scenario: Callable[[TestClient], Any], tokenizer: Any = None, **settings: Any) -> None:
    async def main() -> None:
        config = FrontendSettings(**settings)
        model = ServedModel("org/model", None, 48, 512, 16, 2, 4, 5, tokenizer=tokenizer)
        app = create_app(config, build_front(config, bridge, model))  # type: ignore[arg-type]
        async with TestClient(TestServer(app)) as client:
            await scenario(client)

    asyncio.run(main())


def test_generate_stream_frames_exactly_as_tgi():
    async def scenario(client: TestClient) -> None:
        body = {"inputs": "Hi", "parameters": {"details": True, "return_full_text": True, "foo": None}}
        resp = await client.post("/generate_stream", json=body)
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        assert resp.headers["X-Accel-Buffering"] == "no"
        raw = await resp.read()
        frames = raw.split(b"\n\n")
        assert frames[-1] == b"" and all(f.startswith(b"data:{") for f in frames[:-1])
        events = [json.loads(f[5:]) for f in frames[:-1]]
        assert [e["index"] for e in events] == [1, 2, 3]
        assert events[0] == {"index": 1, "token": {"id": 101, "text": "Hel", "logprob": -0.25, "special": False},
                             "generated_text": None, "details": None}
        assert events[-1]["generated_text"] == "HiHello!"  # return_full_text
        assert events[-1]["details"] == {"finish_reason": "length", "generated_tokens": 3, "seed": None,
                                         "input_length": 3}

    bridge = FakeBridge()
    run(bridge, scenario)
    sent = json.loads(bridge.requests[0].sampling_parameters)
    assert sent == {"details": True} and bridge.requests[0].stream
    assert bridge.requests[0].bools["exclude_input_in_output"]


def test_generate_stream_splits_grouped_responses_into_an_event_per_token():
    """Under the response budget one tgi_llm response carries several tokens: TGI clients still see one event
    each, numbered on, the final one with the whole text."""
    def grouped(_req: Any) -> list[Any]:
        first = token_response(1, "Hel")
        tokens = [{"id": 102, "text": "lo", "logprob": -0.5, "special": False},
                  {"id": 103, "text": "!", "logprob": -0.75, "special": False}]
        rest = {"text_output": "lo!", "output_ids": [102, 103], "finish_reason": "length", "num_input_tokens": 3,
                "num_output_tokens": 3, "details": json.dumps({"tokens": tokens, "finish_reason": "length",
                                                               "generated_tokens": 3, "seed": None})}
        return [first, rest]

    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate_stream", json={"inputs": "Hi", "parameters": {"details": True}})
        frames = (await resp.read()).split(b"\n\n")[:-1]
        events = [json.loads(f[5:]) for f in frames]
        assert [e["index"] for e in events] == [1, 2, 3]
        assert [e["token"]["id"] for e in events] == [101, 102, 103]
        assert [e["generated_text"] for e in events] == [None, None, "Hello!"]
        assert events[1]["details"] is None and events[2]["details"]["generated_tokens"] == 3

    run(FakeBridge(grouped), scenario)


def test_generate_and_compat_route():
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
        assert resp.status == 200 and await resp.json() == {"generated_text": "Hello!"}
        assert resp.headers["x-generated-tokens"] == "3" and resp.headers["x-prompt-tokens"] == "3"
        for key in ("x-compute-time", "x-time-per-token", "x-total-time", "x-inference-time", "x-queue-time"):
            assert key in resp.headers
        resp = await client.post("/", json={"inputs": "Hi", "parameters": {"details": True}})
        body = await resp.json()
        assert isinstance(body, list) and len(body) == 1
        assert body[0]["details"]["tokens"][2]["text"] == "!" and body[0]["details"]["finish_reason"] == "length"
        resp = await client.post("/", json={"inputs": "Hi", "stream": True})
        assert (await resp.read()).count(b"data:") == 3

    run(FakeBridge(), scenario)


def test_errors_json_before_streaming_and_events_after():
    def failing(req: Any) -> list[Any]:
        return [ValidationError("Input validation error: `top_p` must be > 0.0 and < 1.0")]

    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate", json={"inputs": "Hi"})
        assert resp.status == 422
        assert await resp.json() == {"error": "Input validation error: `top_p` must be > 0.0 and < 1.0",
                                     "error_type": "validation"}
        resp = await client.post("/generate_stream", json={"inputs": "Hi"})
        assert resp.status == 200
        assert await resp.read() == (b'data:{"error":"Input validation error: `top_p` must be > 0.0 and < 1.0",'
                                     b'"error_type":"validation"}\n\n')
        resp = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
        assert resp.status == 422 and (await resp.json())["error"]["type"] == "template_error"  # no tokenizer
        resp = await client.post("/generate", data=b"{not json")
        assert resp.status == 422 and (await resp.json())["error_type"] == "validation"
        resp = await client.post("/generate", json={"parameters": {}})
        assert resp.status == 422

    run(FakeBridge(failing), scenario)


def test_overloaded_is_429_and_stream_errors_use_openai_event_shape(chat_tokenizer):
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate", json={"inputs": "Hi"})
        assert resp.status == 429
        assert await resp.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
        body = {"messages": [{"role": "user", "content": "x"}], "stream": True}
        resp = await client.post("/v1/chat/completions", json=body)
        assert await resp.read() == b'data:{"error":{"message":"Model is overloaded","http_status_code":429}}\n\n'

    run(FakeBridge(lambda req: [OverloadedError()]), scenario, chat_tokenizer)


def test_api_key_guards_generation_routes_only():
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate", json={"inputs": "Hi"})
        assert resp.status == 401 and (await resp.json())["error_type"] == "authorization"
        resp = await client.post("/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer nope"})
        assert resp.status == 401 and "message" in (await resp.json())["error"]
        resp = await client.post("/generate", json={"inputs": "Hi"}, headers={"Authorization": "Bearer sesame"})
        assert resp.status == 200
        for path in ("/health", "/info", "/metrics"):
            assert (await client.get(path)).status == 200

    run(FakeBridge(), scenario, api_key="sesame")


def test_payload_limit_is_413():
    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate", json={"inputs": "x" * 1000})
        assert resp.status == 413 and (await resp.json())["error_type"] == "payload_too_large"
        assert (await client.post("/generate", json={"inputs": "x"})).status == 200

    run(FakeBridge(), scenario, payload_limit=200)


def test_chat_stream_n2_usage_and_done(chat_tokenizer):
    async def scenario(client: TestClient) -> None:
        body = {"model": "tgi", "messages": [{"role": "user", "content": "hi"}], "stream": True, "n": 2, "seed": 5,
                "stream_options": {"include_usage": True}, "logprobs": True}
        raw = await (await client.post("/v1/chat/completions", json=body)).read()
        assert raw.endswith(b"data: [DONE]\n\n")
        chunks = [json.loads(f[5:]) for f in raw.split(b"\n\n")[:-2]]
        choices = [c for chunk in chunks for c in chunk["choices"]]
        assert sorted(c["index"] for c in choices) == [0, 0, 0, 1, 1, 1]
        text = "".join(c["delta"]["content"] for c in choices if c["index"] == 1)
        assert text == "Hello!" and all(c["delta"]["role"] == "assistant" for c in choices)
        assert [c["finish_reason"] for c in choices if c["index"] == 0] == [None, None, "length"]
        assert choices[0]["logprobs"]["content"][0]["token"] in ("Hel", "lo", "!")
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
            "prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
        assert chunks[0]["object"] == "chat.completion.chunk" and chunks[0]["usage"] is None

    bridge = FakeBridge()
    run(bridge, scenario, chat_tokenizer)
    seeds = sorted(json.loads(r.sampling_parameters)["seed"] for r in bridge.requests)
    assert seeds == [5, 6]  # a given seed is varied per choice
    assert not bridge.requests[0].text.startswith(chat_tokenizer.bos_token * 2)


def test_chat_and_completions_not_streaming(chat_tokenizer):
    async def scenario(client: TestClient) -> None:
        body = {"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "max_tokens": 3}
        resp = await client.post("/v1/chat/completions", json=body)
        chat = await resp.json()
        assert chat["choices"][0]["message"]["content"] == "Hello!"
        assert chat["usage"]["completion_tokens"] == 3 and chat["choices"][0]["logprobs"] is None
        resp = await client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 3})
        done = await resp.json()
        assert [c["index"] for c in done["choices"]] == [0, 1] and done["usage"]["prompt_tokens"] == 6
        resp = await client.post("/v1/completions", json={"prompt": ["a"] * 5})
        assert resp.status == 422 and (await resp.json())["error"]["type"] == "batch size exceeded"
        resp = await client.post("/chat_tokenize", json=body)
        tokenized = await resp.json()
        assert tokenized["templated_text"].endswith("<|assistant|>\n")
        assert [t["id"] for t in tokenized["tokenize_response"]] == chat_tokenizer(
            tokenized["templated_text"])["input_ids"]
        sagemaker = await (await client.post("/invocations", json=body)).json()
        assert sagemaker["object"] == "chat.completion"
        sagemaker = await (await client.post("/invocations", json={"inputs": "Hi"})).json()
        assert sagemaker == [{"generated_text": "Hello!"}]
        models = await (await client.get("/v1/models")).json()
        assert models["object"] == "list" and models["data"][0]["id"] == "org/model"

    bridge = FakeBridge()
    run(bridge, scenario, chat_tokenizer)
    greedy = json.loads(bridge.requests[0].sampling_parameters)
    assert greedy["do_sample"] is False and "temperature" not in greedy and greedy["max_new_tokens"] == 3


def test_client_leaving_a_stream_closes_the_generation():
    def endless(req: Any) -> Any:
        i = 0
        while True:
            i += 1
            yield token_response(i, "x")

    bridge = FakeBridge(endless, delay=0.01)

    async def scenario(client: TestClient) -> None:
        resp = await client.post("/generate_stream", json={"inputs": "Hi"})
        assert (await resp.content.readline()).startswith(b"data:")
        resp.close()
        for _ in range(500):  # a bound for a hang, not a timing assertion
            if bridge.closed_early:
                break
            await asyncio.sleep(0.01)
        assert bridge.closed_early == 1
        metrics = await (await client.get("/metrics")).text()
        assert 'tgi_request_failure{source="http",err="cancelled"} 1' in metrics

    run(bridge, scenario)


def test_client_leaving_a_non_streaming_request_cancels_it():
    def endless(req: Any) -> Any:
        i = 0
        while True:
            i += 1
            yield token_response(i, "x")

    bridge = FakeBridge(endless, delay=0.01)

    async def scenario(client: TestClient) -> None:
        pending = asyncio.ensure_future(client.post("/generate", json={"inputs": "Hi"}))
        for _ in range(500):  # bounds for a hang, not timing assertions
            if bridge.requests:
                break
            await asyncio.sleep(0.01)
        pending.cancel()  # the client closes its connection
        for _ in range(500):
            if bridge.closed_early:
                break
            await asyncio.sleep(0.01)
        assert bridge.closed_early == 1

    run(bridge, scenario)
