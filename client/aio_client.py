"""Async helper over tritonclient.grpc.aio: `generate_stream` yields deltas; leaving the loop cancels.

    async with AsyncTGITritonClient("127.0.0.1:8001") as client:
        async for delta in client.generate_stream("Hello", max_tokens=20):
            print(delta.text, end="", flush=True)
"""
from __future__ import annotations

from typing import Any, AsyncIterator

import tritonclient.grpc.aio as grpcaio

from client.grpc_client import DEFAULT_URL, GenerateResult, StreamDelta, _delta, build_inputs


class AsyncTGITritonClient:
    """One channel for the client's life; one stream call per request (so each can be cancelled alone)."""

    def __init__(self, url: str = DEFAULT_URL, model: str = "tgi_llm") -> None:
        self.url = url
        self.model = model
        self._client = grpcaio.InferenceServerClient(url)

    async def __aenter__(self) -> "AsyncTGITritonClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self._client.close()

    async def generate_stream(self, prompt: str, *, stream: bool = True, **kwargs: Any) -> AsyncIterator[StreamDelta]:
        """Deltas as they come (one in all when stream=False). Raises InferenceServerException on an error."""
        inputs = build_inputs(prompt, stream=stream, **kwargs)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": self.model, "inputs": inputs}

        responses = self._client.stream_infer(requests())
        finished = False
        try:
            async for result, error in responses:
                if error is not None:
                    finished = True
                    raise error
                delta = _delta(result)
                if delta is None:
                    continue
                finished = delta.finish_reason is not None  # tgi_llm's last response names the reason
                yield delta
                if finished:
                    return
            finished = True
        finally:
            if not finished:
                responses.cancel()  # the consumer left early: Triton cancels the request

    async def generate(self, prompt: str, **kwargs: Any) -> GenerateResult:
        result = GenerateResult(text="")
        parts: list[str] = []
        async for delta in self.generate_stream(prompt, **kwargs):
            parts.append(delta.text)
            result.token_ids.extend(delta.token_ids)
            result.finish_reason = delta.finish_reason or result.finish_reason
            result.num_input_tokens = delta.num_input_tokens or result.num_input_tokens
            result.num_output_tokens = delta.num_output_tokens or result.num_output_tokens
        result.text = "".join(parts)
        return result
