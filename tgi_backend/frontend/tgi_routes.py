"""TGI's own routes: /generate, /generate_stream, POST /, /tokenize, /info, /health, /metrics."""
from __future__ import annotations

from contextlib import aclosing
from typing import Any, Mapping

from aiohttp import web

from tgi_backend.errors import TGIError
from tgi_backend.frontend.errors import (
    UnavailableError, as_tgi_error, json_response, tgi_body, tgi_response, validation,
)
from tgi_backend.frontend.generation import Outcome, Timing, forwarded_parameters
from tgi_backend.frontend.sse import ClientGone, EventStream
from tgi_backend.frontend.state import FRONT, Front

routes = web.RouteTableDef()


async def read_json(request: web.Request) -> dict[str, Any]:
    """The JSON body as an object, or TGI's 422."""
    try:
        body = await request.json()
    except ValueError as exc:
        raise validation(f"Failed to parse the request body as JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise validation("the request body must be a JSON object")
    return body


def generate_request(body: Mapping[str, Any]) -> tuple[str, Mapping[str, Any]]:
    inputs = body.get("inputs")
    if not isinstance(inputs, str):
        raise validation("`inputs` must be a string")
    parameters = body.get("parameters") or {}
    if not isinstance(parameters, Mapping):
        raise validation("`parameters` must be an object")
    return inputs, parameters


def generate_body(inputs: str, parameters: Mapping[str, Any], outcome: Outcome) -> dict[str, Any]:
    """TGI's GenerateResponse: details only when asked (details or decoder_input_details)."""
    text = inputs + outcome.text if parameters.get("return_full_text") else outcome.text
    body: dict[str, Any] = {"generated_text": text}
    if parameters.get("details") or parameters.get("decoder_input_details"):
        body["details"] = outcome.details()
    return body


async def _generate(front: Front, body: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    inputs, parameters = generate_request(body)
    outcome = await front.generator.generate(inputs, forwarded_parameters(parameters))
    headers = outcome.timing.headers(len(inputs), outcome.input_length, outcome.generated_tokens)
    return generate_body(inputs, parameters, outcome), headers


@routes.post("/generate")
async def generate(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    try:
        body, headers = await _generate(front, await read_json(request))
    except TGIError as exc:
        return tgi_response(exc)
    return json_response(body, headers=headers)


@routes.post("/generate_stream")
async def generate_stream(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json(request)
    except TGIError as exc:
        return tgi_response(exc)
    return await stream_events(request, body)


@routes.post("/")
async def compat_generate(request: web.Request) -> web.StreamResponse:
    """TGI's POST /: a list with one response, or the event stream when "stream" is true."""
    try:
        body = await read_json(request)
    except TGIError as exc:
        return tgi_response(exc)
    if body.get("stream"):
        return await stream_events(request, body)
    try:
        result, headers = await _generate(request.app[FRONT], body)
    except TGIError as exc:
        return tgi_response(exc)
    return json_response([result], headers=headers)


async def stream_events(request: web.Request, body: Mapping[str, Any]) -> web.StreamResponse:
    """TGI's stream: HTTP 200 once started; one event per token; errors as `{"error", "error_type"}` events."""
    front = request.app[FRONT]
    events = await EventStream(request, {"x-compute-type": "tgi-triton"}).start()
    try:
        inputs, parameters = generate_request(body)
        await _stream_tokens(front, events, inputs, parameters)
    except ClientGone:
        pass
    except Exception as exc:  # noqa: BLE001 - every failure becomes an event
        try:
            await events.send(tgi_body(as_tgi_error(exc)))
        except ClientGone:
            pass
    return await events.finish()


async def _stream_tokens(front: Front, events: EventStream, inputs: str, parameters: Mapping[str, Any]) -> None:
    params = forwarded_parameters(parameters)
    timing = Timing()
    index, text, last = 0, [], None
    async with aclosing(front.generator.pieces(inputs, params, stream=True, timing=timing)) as pieces:
        async for piece in pieces:
            text.append(piece.text)
            tokens = piece.tokens or ([] if not piece.finish_reason else [_empty_token(last)])
            for n, (token, top) in enumerate(zip(tokens, piece.top_tokens or [[]] * len(tokens))):
                index += 1
                last = token
                event: dict[str, Any] = {"index": index, "token": token}
                if top:
                    event["top_tokens"] = top
                final = piece.finish_reason and n == len(tokens) - 1
                event["generated_text"] = _full_text(inputs, parameters, text) if final else None
                event["details"] = _stream_details(piece, index) if final and parameters.get("details") else None
                await events.send(event)


def _full_text(inputs: str, parameters: Mapping[str, Any], parts: list[str]) -> str:
    text = "".join(parts)
    return inputs + text if parameters.get("return_full_text") else text


def _stream_details(piece: Any, generated: int) -> dict[str, Any]:
    return {
        "finish_reason": piece.final.get("finish_reason") or piece.finish_reason,
        "generated_tokens": int(piece.final.get("generated_tokens") or piece.num_output_tokens or generated),
        "seed": piece.final.get("seed"),
        "input_length": piece.num_input_tokens,
    }


def _empty_token(last: dict[str, Any] | None) -> dict[str, Any]:
    """The final event needs a token; a response that ended without one gets an empty special token."""
    return {"id": (last or {}).get("id", 0), "text": "", "logprob": None, "special": True}


@routes.post("/tokenize")
async def tokenize(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    try:
        inputs, _ = generate_request(await read_json(request))
        tokens = front.model.tokenize(inputs)
    except TGIError as exc:
        status = 404 if front.model.tokenizer is None else exc.http_status
        return json_response(tgi_body(exc), status=status)
    return json_response(tokens)


@routes.get("/info")
async def info(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    return json_response(front.model.info(front.settings.max_client_batch_size))


@routes.get("/health")
async def health(request: web.Request) -> web.StreamResponse:
    if await request.app[FRONT].bridge.model_ready():
        return web.Response(status=200)
    return tgi_response(UnavailableError("unhealthy"))


@routes.get("/metrics")
async def metrics(request: web.Request) -> web.StreamResponse:
    front = request.app[FRONT]
    text = await front.triton_metrics()
    return web.Response(text=front.metrics.render(text), content_type="text/plain", charset="utf-8")
