"""Architecture name (config.json's `architectures[0]`) -> model class, imported lazily."""
from __future__ import annotations

import importlib
from typing import Any

# name: (module, class); a new architecture is one line here plus its module.
MODELS: dict[str, tuple[str, str]] = {
    "LlamaForCausalLM": ("tgi_backend.models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": ("tgi_backend.models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": ("tgi_backend.models.llama", "Qwen2ForCausalLM"),
    "MixtralForCausalLM": ("tgi_backend.models.mixtral", "MixtralForCausalLM"),
    "Qwen2MoeForCausalLM": ("tgi_backend.models.qwen2_moe", "Qwen2MoeForCausalLM"),
    "GemmaForCausalLM": ("tgi_backend.models.gemma", "GemmaForCausalLM"),
    "Gemma2ForCausalLM": ("tgi_backend.models.gemma", "Gemma2ForCausalLM"),
    "Phi3ForCausalLM": ("tgi_backend.models.phi3", "Phi3ForCausalLM"),
}


def supported_architectures() -> list[str]:
    return sorted(MODELS)


def architecture_of(hf_config: dict[str, Any]) -> str:
    archs = hf_config.get("architectures") or []
    if not archs:
        raise ValueError(
            "config.json names no `architectures`; supported: " + ", ".join(supported_architectures())
        )
    if archs[0] not in MODELS:
        raise ValueError(
            f"Unsupported model architecture {archs[0]!r} (model_type {hf_config.get('model_type')!r}); "
            f"supported: {', '.join(supported_architectures())}"
        )
    return archs[0]


def get_model_class(architecture: str) -> type:
    if architecture not in MODELS:
        raise ValueError(
            f"Unsupported model architecture {architecture!r}; supported: {', '.join(supported_architectures())}"
        )
    module, name = MODELS[architecture]
    return getattr(importlib.import_module(module), name)
