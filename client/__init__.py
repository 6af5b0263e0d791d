"""A small sync and async client for tgi-triton over Triton's gRPC streaming API (tritonclient).

Names are imported on first use, so `tgi-triton` can build its CLI without tritonclient installed.
"""
from __future__ import annotations

from typing import Any

_EXPORTS = {
    "GenerateResult": "client.grpc_client",
    "StreamDelta": "client.grpc_client",
    "TGITritonClient": "client.grpc_client",
    "generate": "client.grpc_client",
    "generate_stream": "client.grpc_client",
    "AsyncTGITritonClient": "client.aio_client",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
