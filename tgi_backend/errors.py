"""Errors a user can cause, with TGI's message texts. The serving layer maps them to Triton / HTTP codes."""
from __future__ import annotations


class TGIError(Exception):
    """Base of the user-facing errors; `error_type` is TGI's `error_type` field."""

    error_type = "generation"
    http_status = 424


class ValidationError(TGIError, ValueError):
    """Bad request parameters or input (TGI: 422, Triton: INVALID_ARG)."""

    error_type = "validation"
    http_status = 422


class OverloadedError(TGIError):
    """Too many requests in flight (TGI: 429, Triton: UNAVAILABLE)."""

    error_type = "overloaded"
    http_status = 429

    def __init__(self, message: str = "Model is overloaded") -> None:
        super().__init__(message)


class GenerationError(TGIError):
    """The engine failed while generating (TGI: 424, Triton: INTERNAL)."""
