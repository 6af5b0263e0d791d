"""Quantized linear layers: one strategy per checkpoint format (see base.py)."""
from __future__ import annotations

from tgi_backend.layers.quantization.base import TGI_QUANTIZE, QuantizedLinear, QuantStrategy, strategy_for

__all__ = ["TGI_QUANTIZE", "QuantizedLinear", "QuantStrategy", "strategy_for"]
