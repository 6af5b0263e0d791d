"""HTTP errors of the front: TGI's `{"error", "error_type"}` and OpenAI's `{"error": {...}}` shapes."""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from tgi_backend.errors import GenerationError, TGIError, ValidationError


class UnavailableError(TGIError):
    """Triton cannot be reached or the model is not ready (TGI: 503 healthcheck)."""

    error_type = "healthcheck"
    http_status = 503


class IncompleteGenerationError(TGIError):
    """The stream ended without a final response (TGI: 500 incomplete_generation)."""

    error_type = "incomplete_generation"
    http_status = 500

    def __init__(self, message: str = "Incomplete generation") -> None:
        super().__init__(message)


class TemplateError(TGIError):
    """The chat template failed to render (TGI: 422 template_error)."""

    error_type = "template_error"
    http_status = 422


class BatchSizeError(TGIError):
    """More prompts than --max-client-batch-size (TGI: 422 "batch size exceeded")."""

    error_type = "batch size exceeded"
    http_status = 422


class AuthError(TGIError):
    error_type = "authorization"
    http_status = 401

    def __init__(self, message: str = "Unauthorized") -> None:
        super().__init__(message)


class PayloadTooLargeError(TGIError):
    error_type = "payload_too_large"
    http_status = 413


def validation(detail: str) -> ValidationError:
    return ValidationError(f"Input validation error: {detail}")


def as_tgi_error(exc: BaseException) -> TGIError:
    """Any exception -> a TGIError (an unexpected one is a generation failure, never a bare 500)."""
    if isinstance(exc, TGIError):
        return exc
    return GenerationError(f"Request failed during generation: {exc}")


def tgi_body(error: TGIError) -> dict[str, Any]:
    return {"error": str(error), "error_type": error.error_type}


def openai_body(error: TGIError) -> dict[str, Any]:
    return {"error": {"message": str(error), "type": error.error_type, "param": None, "code": None}}


def openai_stream_body(error: TGIError) -> dict[str, Any]:
    """TGI's chat stream error event."""
    return {"error": {"message": str(error), "http_status_code": error.http_status}}


def tgi_response(error: TGIError) -> web.Response:
    return json_response(tgi_body(error), status=error.http_status)


def openai_response(error: TGIError) -> web.Response:
    return json_response(openai_body(error), status=error.http_status)


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    text = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)
