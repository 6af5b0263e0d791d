"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models, and TGI's /chat_tokenize."""
from __future__ import annotations

import asyncio
import time
from contextlib import aclosing
from typing import Any, AsyncIterator, Mapping

from aiohttp import web

from tgi_backend.errors import TGIError
from tgi_backend.frontend import openai_mapping as oa
from tgi_backend.frontend.errors import (
    as_tgi_error, json_response, openai_response, openai_stream_body, tgi_response,
)
from tgi_backend.frontend.generation import Outcome, Piece
from tgi_backend.frontend.sse import DONE, ClientGone, EventStream
from tgi_backend.frontend.state import FRONT, Front
from tgi_backend.frontend.tgi_routes import compat_generate, read_json

routes = web.RouteTableDef()


def chat_prompt(front: Front, body: Mapping[str, Any]) -> str:
    """The rendered chat template; a BOS the tokenizer adds anyway is not written twice."""
    text = front.model.render_chat(oa.messages(body))
    bos = getattr(front.model.tokenizer, "bos_token", None)
    if bos and text.startswith(bos) and _adds_bos(front):
        text = text[len(bos):]
    return text


def _adds_bos(front: Front) -> bool:
    tokenizer = front.model.tokenizer
    ids = tokenizer("x", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _per_choice(params: Mapping[str, Any], n: int) -> list[dict[str, Any]]:
    """n requests; a given seed is varied per choice, or all n would be the same."""
    out = []
    for i in range(n):
        p = dict(params)
        if "seed" in p:
            p["seed"] = p["seed"] + i
        out.append(p)
    return out


@routes.post("/v1/chat/completions")
async def chat_completions(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    try:
        body = await read_json(request)
        prompt = chat_prompt(front, body)
        params = oa.chat_parameters(body, front.model)
        n = oa.choices_count(body)
    except TGIError as exc:
        return openai_response(exc)
    jobs = [(prompt, p) for p in _per_choice(params, n)]
    model = front.model.model_id
    if body.get("stream"):
        return await _stream(request, jobs, lambda i, piece, tokens: _chat_chunk(model, body, i, piece, tokens),
                             _include_usage(body), "chat.completion.chunk")
    try:
        outcomes = await _run_all(front, jobs)
    except TGIError as exc:
        return openai_response(exc)
    return json_response(oa.chat_completion(model, outcomes, bool(body.get("logprobs"))))


@routes.post("/v1/completions")
async def completions(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    try:
        body = await read_json(request)
        prompts = oa.prompts(body, front.settings.max_client_batch_size)
        params = oa.completion_parameters(body, front.model)
    except TGIError as exc:
        return openai_response(exc)
    jobs = [(prompt, dict(params)) for prompt in prompts]
    model = front.model.model_id
    if body.get("stream"):
        return await _stream(request, jobs, lambda i, piece, tokens: _completion_chunk(model, i, piece, tokens),
                             _include_usage(body), "text_completion")
    try:
        outcomes = await _run_all(front, jobs)
    except TGIError as exc:
        return openai_response(exc)
    return json_response(oa.completion(model, outcomes))


@routes.get("/v1/models")
async def models(request: web.Request) -> web.StreamResponse:
    model_id = request.app[FRONT].model.model_id
    card = {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": model_id}
    return json_response({"object": "list", "data": [card]})


@routes.post("/chat_tokenize")
async def chat_tokenize(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    try:
        text = chat_prompt(front, await read_json(request))
        tokens = front.model.tokenize(text)
    except TGIError as exc:
        return tgi_response(exc)
    return json_response({"tokenize_response": tokens, "templated_text": text})


def _include_usage(body: Mapping[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, Mapping) and bool(options.get("include_usage"))


async def _run_all(front: Front, jobs: list[tuple[str, dict[str, Any]]]) -> list[Outcome]:
    tasks = [asyncio.ensure_future(front.generator.generate(prompt, params)) for prompt, params in jobs]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for task in tasks:  # one failed (or we were cancelled): stop the others
            task.cancel()


def _chat_chunk(model: str, body: Mapping[str, Any], index: int, piece: Piece, tokens: list[int]) -> dict[str, Any]:
    chunk = oa.envelope("chat.completion.chunk", model)
    logprobs = oa.chat_logprobs(piece.tokens, piece.top_tokens) if body.get("logprobs") else None
    reason = oa.finish_reason(piece.finish_reason) if piece.finish_reason else None
    chunk["choices"] = [{"index": index, "delta": {"role": "assistant", "content": piece.text, "tool_calls": None},
                         "logprobs": logprobs, "finish_reason": reason}]
    chunk["usage"] = None
    return chunk


def _completion_chunk(model: str, index: int, piece: Piece, tokens: list[int]) -> dict[str, Any]:
    chunk = oa.envelope("text_completion", model)
    reason = oa.finish_reason(piece.finish_reason) if piece.finish_reason else ""
    chunk["choices"] = [{"index": index, "text": piece.text, "logprobs": None, "finish_reason": reason}]
    return chunk


async def _stream(request: web.Request, jobs: list[tuple[str, dict[str, Any]]], make_chunk: Any,
                  include_usage: bool, kind: str) -> web.StreamResponse:
    """One chunk per tgi_llm response of any choice; usage chunk if asked; `data: [DONE]`."""
    front = request.app[FRONT]
    events = await EventStream(request).start()
    counts = [[0, 0] for _ in jobs]  # per choice: prompt tokens, generated tokens
    try:
        async for index, piece in _merged(front, jobs):
            counts[index][0] = piece.num_input_tokens or counts[index][0]
            counts[index][1] += len(piece.tokens)
            await events.send(make_chunk(index, piece, counts[index]))
        if include_usage:
            chunk = oa.envelope(kind, front.model.model_id)
            prompt = counts[0][0] if kind == "chat.completion.chunk" else sum(c[0] for c in counts)
            chunk["choices"], chunk["usage"] = [], oa.usage(prompt, sum(c[1] for c in counts))
            await events.send(chunk)
        await events.write(DONE)
    except ClientGone:
        pass
    except Exception as exc:  # noqa: BLE001 - errors become an event under HTTP 200
        try:
            await events.send(openai_stream_body(as_tgi_error(exc)))
        except ClientGone:
            pass
    return await events.finish()


async def _merged(front: Front, jobs: list[tuple[str, dict[str, Any]]]) -> AsyncIterator[tuple[int, Piece]]:
    """The pieces of several generations as they come, tagged with their choice index."""
    if len(jobs) == 1:
        prompt, params = jobs[0]
        async with aclosing(front.generator.pieces(prompt, params, stream=True)) as pieces:
            async for piece in pieces:
                yield 0, piece
        return
    queue: asyncio.Queue[tuple[int, Piece | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, prompt: str, params: dict[str, Any]) -> None:
        try:
            async with aclosing(front.generator.pieces(prompt, params, stream=True)) as pieces:
                async for piece in pieces:
                    await queue.put((index, piece, None))
            await queue.put((index, None, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((index, None, exc))

    tasks = [asyncio.ensure_future(pump(i, prompt, params)) for i, (prompt, params) in enumerate(jobs)]
    try:
        running = len(tasks)
        while running:
            index, piece, error = await queue.get()
            if error is not None:
                raise error
            if piece is None:
                running -= 1
            else:
                yield index, piece
    finally:
        for task in tasks:
            task.cancel()


@routes.post("/invocations")
async def invocations(request: web.Request) -> web.StreamResponse:
    """SageMaker's route (TGI): a chat, completion or generate request, told apart by its fields."""
    try:
        body = await read_json(request)
    except TGIError as exc:
        return tgi_response(exc)
    if "messages" in body:
        return await chat_completions(request)
    if "prompt" in body:
        return await completions(request)
    return await compat_generate(request)
