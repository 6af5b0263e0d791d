"""Server-sent events as TGI writes them: `data:{json}` then a blank line; OpenAI streams end `data: [DONE]`."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

DONE = b"data: [DONE]\n\n"
HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def frame(payload: Any) -> bytes:
    """One event: no space after `data:` (TGI's framing), compact JSON, UTF-8."""
    return b"data:" + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


class ClientGone(Exception):
    """The HTTP client closed the connection; the generation behind it is cancelled."""


class EventStream:
    """An SSE response; `send` raises ClientGone once the client is away."""

    def __init__(self, request: web.Request, headers: dict[str, str] | None = None) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**HEADERS, **(headers or {})})

    async def start(self) -> "EventStream":
        await self.response.prepare(self.request)
        return self

    async def send(self, payload: Any) -> None:
        await self.write(frame(payload))

    async def write(self, data: bytes) -> None:
        try:
            await self.response.write(data)
        except (ConnectionError, RuntimeError) as exc:  # reset by peer / transport closed
            raise ClientGone() from exc

    async def finish(self) -> web.StreamResponse:
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self.response
