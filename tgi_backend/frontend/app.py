"""The aiohttp application: TGI and OpenAI routes over one gRPC channel to Triton.

    tgi-triton frontend --triton-url 127.0.0.1:8001 --port 3000
"""
from __future__ import annotations

import asyncio
import logging
import signal
import time
from typing import Any, Awaitable, Callable

import aiohttp
from aiohttp import web

from tgi_backend.errors import TGIError
from tgi_backend.frontend import openai_routes, tgi_routes
from tgi_backend.frontend.bridge import TritonBridge
from tgi_backend.frontend.errors import (
    AuthError, PayloadTooLargeError, UnavailableError, as_tgi_error, openai_response, tgi_response,
)
from tgi_backend.frontend.generation import Generator
from tgi_backend.frontend.metrics import FrontMetrics
from tgi_backend.frontend.model import ServedModel, served_model
from tgi_backend.frontend.state import FRONT, Front, FrontendSettings

log = logging.getLogger(__name__)
OPEN_PATHS = frozenset({"/health", "/info", "/metrics", "/v1/models"})  # no API key needed
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error_response(request: web.Request, error: TGIError) -> web.Response:
    return openai_response(error) if request.path.startswith("/v1/") else tgi_response(error)


def make_middlewares(settings: FrontendSettings) -> list[Any]:
    expected = f"Bearer {settings.api_key}" if settings.api_key else None

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected and request.path not in OPEN_PATHS and request.headers.get("Authorization") != expected:
            return _error_response(request, AuthError())
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            error = PayloadTooLargeError(f"Payload too large: the limit is {settings.payload_limit} bytes")
            return _error_response(request, error)
        except web.HTTPException:
            raise
        except TGIError as exc:
            return _error_response(request, exc)
        except Exception as exc:  # a bug: answer TGI's shape, log it
            log.exception("unhandled error on %s", request.path)
            return _error_response(request, as_tgi_error(exc))

    return [guard]


def create_app(settings: FrontendSettings, front: Front | None = None) -> web.Application:
    """The app; without `front`, startup connects to Triton and reads the model (see `connect`)."""
    app = web.Application(client_max_size=settings.payload_limit, middlewares=make_middlewares(settings))
    app.add_routes(tgi_routes.routes)
    app.add_routes(openai_routes.routes)
    if front is not None:
        app[FRONT] = front
    else:
        app.on_startup.append(lambda a: _startup(a, settings))
    app.on_cleanup.append(_cleanup)
    return app


def build_front(settings: FrontendSettings, bridge: TritonBridge, model: ServedModel) -> Front:
    metrics = FrontMetrics()
    return Front(settings, bridge, model, Generator(bridge, model, metrics), metrics)


async def connect(settings: FrontendSettings) -> Front:
    """Waits for tgi_llm to be ready, reads its config and loads the tokenizer."""
    bridge = TritonBridge(settings.triton_url, settings.model)
    deadline = time.monotonic() + settings.ready_timeout
    while not await bridge.model_ready():
        if time.monotonic() > deadline:
            await bridge.close()
            raise UnavailableError(f"{settings.model} not ready at {settings.triton_url}")
        await asyncio.sleep(0.5)
    parameters = await bridge.model_parameters()
    model = await asyncio.to_thread(served_model, parameters, settings.tokenizer)
    return build_front(settings, bridge, model)


async def _startup(app: web.Application, settings: FrontendSettings) -> None:
    app[FRONT] = await connect(settings)


async def _cleanup(app: web.Application) -> None:
    front = app.get(FRONT)
    if front is not None:
        await front.close()


async def serve(settings: FrontendSettings, stop: asyncio.Event | None = None) -> None:
    """Runs until `stop` is set (or SIGINT/SIGTERM)."""
    app = create_app(settings)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()  # runs startup: connects to Triton
    app[FRONT].session = aiohttp.ClientSession()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    m = app[FRONT].model
    print(f"tgi-triton front ready on http://{settings.host}:{settings.port} (model {m.model_id}, "
          f"Triton {settings.triton_url})", flush=True)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def run(settings: FrontendSettings) -> int:
    try:
        asyncio.run(serve(settings))
    except TGIError as exc:
        print(f"tgi-triton frontend: {exc}", flush=True)
        return 1
    return 0
