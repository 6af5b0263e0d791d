"""Clients nobody here wrote, against the front: text-generation, huggingface_hub's InferenceClient, openai."""
from __future__ import annotations

import asyncio
import json

import pytest

pytestmark = pytest.mark.e2e
text_generation = pytest.importorskip("text_generation")
openai = pytest.importorskip("openai")
from huggingface_hub import InferenceClient  # noqa: E402
from client.grpc_client import kv_stats

MESSAGES = [{"role": "user", "content": "Say something"}]


def test_text_generation_client(server):
    client = text_generation.Client(server.front_url, timeout=120)
    reply = client.generate("Hello", max_new_tokens=5)  # POST / with details
    assert reply.details.generated_tokens == len(reply.details.tokens) <= 5
    assert reply.details.finish_reason.value in ("length", "eos_token")
    events = list(client.generate_stream("Hello", max_new_tokens=5))
    assert events[-1].generated_text == reply.generated_text  # greedy both ways
    assert [e.token.id for e in events] == [t.id for t in reply.details.tokens]
    assert all(e.generated_text is None for e in events[:-1])
    with pytest.raises(text_generation.errors.ValidationError, match="must be <= 512"):
        client.generate("Hello", max_new_tokens=600)
    with pytest.raises(text_generation.errors.ValidationError, match="must be <= 512"):
        next(client.generate_stream("Hello", max_new_tokens=600))  # an error event
    chat = client.chat(messages=MESSAGES, max_tokens=4, temperature=0.0)
    assert chat.choices[0].message.role == "assistant" and chat.usage["completion_tokens"] <= 4


def test_text_generation_chat_stream_reads_chunks_until_done(server):
    """text-generation 0.7's chat stream parses every `data:` line as JSON, so it raises on TGI's `data: [DONE]`
    (it does the same against TGI itself); every chunk before it parses."""
    client = text_generation.Client(server.front_url, timeout=120)
    chunks = []
    with pytest.raises(json.JSONDecodeError):
        for chunk in client.chat(messages=MESSAGES, max_tokens=4, stream=True, temperature=0.0):
            chunks.append(chunk)
    assert 1 <= len(chunks) <= 4 and chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_text_generation_async_client(server):
    async def main() -> tuple[str, str]:
        client = text_generation.AsyncClient(server.front_url, timeout=120)
        reply = await client.generate("Async hello", max_new_tokens=4)
        last = None
        async for event in client.generate_stream("Async hello", max_new_tokens=4):
            last = event
        return reply.generated_text, last.generated_text

    whole, streamed = asyncio.run(main())
    assert whole == streamed


def test_huggingface_hub_inference_client(server):
    client = InferenceClient(base_url=server.front_url, timeout=120)
    out = client.text_generation("Hello", max_new_tokens=5, details=True)
    assert out.details.generated_tokens == len(out.details.tokens)
    assert all(t.logprob is not None for t in out.details.tokens)
    stream = list(client.text_generation("Hello", max_new_tokens=5, details=True, stream=True))
    assert stream[-1].generated_text == out.generated_text
    assert stream[-1].details.generated_tokens == len(stream) and stream[0].index == 1
    assert "".join(client.text_generation("Hello", max_new_tokens=5, stream=True)) == out.generated_text
    chunks = list(client.chat_completion(MESSAGES, max_tokens=4, stream=True, temperature=0.0))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat_completion(MESSAGES, max_tokens=4, temperature=0.0)
    assert whole.choices[0].message.content == text
    assert whole.usage.completion_tokens == len([c for c in chunks if c.choices])


def test_openai_client(server):
    client = openai.OpenAI(base_url=server.front_url + "/v1", api_key="unused", timeout=120)
    reply = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, temperature=0, n=2,
                                           logprobs=True, top_logprobs=2)
    assert len(reply.choices) == 2 and reply.choices[0].message.content == reply.choices[1].message.content  # greedy
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)
    stream = client.chat.completions.create(model="tgi", messages=MESSAGES, max_tokens=4, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens // 2
    done = client.completions.create(model="tgi", prompt=["Once", "Twice"], max_tokens=3, temperature=0)
    assert [c.index for c in done.choices] == [0, 1] and done.usage.completion_tokens <= 6
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tgi", prompt="Once", max_tokens=3, temperature=0, stream=True))
    assert streamed == done.choices[0].text
    assert client.models.list().data[0].object == "model"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model="tgi", messages=MESSAGES, top_p=7.0)


# ---- our own client (client/): async streaming, cancellation by leaving the loop, the CLI -----------------------
def test_async_client_streams_and_leaving_the_loop_cancels(server):
    import time

    from client import AsyncTGITritonClient, TGITritonClient

    params = {"ignore_eos": True, "temperature": 0}
    whole = TGITritonClient(server.grpc_url).generate("Async", max_tokens=6, sampling_parameters=params,
                                                      exclude_input_in_output=True)

    async def main() -> tuple[str, int]:
        async with AsyncTGITritonClient(server.grpc_url) as client:
            parts = [d.text async for d in client.generate_stream("Async", max_tokens=6, sampling_parameters=params)]
            seen = 0
            async for delta in client.generate_stream("Async", max_tokens=400, sampling_parameters=params):
                seen += len(delta.token_ids)
                break  # leaving the loop cancels the request
            return "".join(parts), seen

    streamed, seen = asyncio.run(main())
    assert streamed == whole.text and whole.finish_reason == "length" and seen >= 1
    _, total = kv_stats(server.grpc_url)
    deadline = time.monotonic() + 120
    while kv_stats(server.grpc_url)[0] != total:
        assert time.monotonic() < deadline, "the cancelled request's KV blocks never came back"
        time.sleep(0.1)


def test_cli_generate_streams_tokens(server):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "tgi_backend.launcher.cli", "generate", "Hello", "--url", server.grpc_url,
           "--stream", "--max-new-tokens", "5", "--temperature", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    from client import TGITritonClient

    expected = TGITritonClient(server.grpc_url).generate(
        "Hello", sampling_parameters={"max_new_tokens": 5, "temperature": 0}, exclude_input_in_output=True)
    assert done.stdout == expected.text + "\n" and "finish_reason" in done.stderr
    bad = subprocess.run(cmd[:-4] + ["--max-new-tokens", "600"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "Input validation error" in bad.stderr
