"""The front's settings and the state its handlers share (one per app, created at startup)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from tgi_backend.frontend.bridge import TritonBridge
from tgi_backend.frontend.generation import Generator
from tgi_backend.frontend.metrics import FrontMetrics
from tgi_backend.frontend.model import ServedModel


@dataclass(frozen=True, slots=True)
class FrontendSettings:
    triton_url: str = "127.0.0.1:8001"  # Triton's gRPC endpoint
    host: str = "0.0.0.0"
    port: int = 3000
    metrics_url: str | None = None  # Triton's metrics endpoint; None: the gRPC host on port 8002
    api_key: str | None = None
    payload_limit: int = 2_000_000
    max_client_batch_size: int = 4
    model: str = "tgi_llm"
    tokenizer: str | None = None  # a local tokenizer folder overriding the model's
    ready_timeout: float = 600.0

    def triton_metrics_url(self) -> str:
        if self.metrics_url:
            return self.metrics_url
        host = self.triton_url.rsplit(":", 1)[0]
        return f"http://{host}:8002/metrics"


@dataclass(slots=True)
class Front:
    settings: FrontendSettings
    bridge: TritonBridge
    model: ServedModel
    generator: Generator
    metrics: FrontMetrics
    session: aiohttp.ClientSession | None = None

    async def triton_metrics(self) -> str:
        """Triton's metrics text, or "" when its metrics port does not answer."""
        if self.session is None:
            return ""
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with self.session.get(self.settings.triton_metrics_url(), timeout=timeout) as response:
                return await response.text() if response.status == 200 else ""
        except (aiohttp.ClientError, TimeoutError, OSError):
            return ""

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        await self.bridge.close()


FRONT: web.AppKey[Any] = web.AppKey("front", object)
