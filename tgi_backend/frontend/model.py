"""What the front knows of the served model: read from tgi_llm's config over gRPC, plus its tokenizer.

The launcher writes EngineConfig.to_strings() as tgi_llm's parameters, so `tgi-triton frontend --triton-url`
learns the model folder and the limits from Triton alone. The tokenizer renders chat templates and serves
/tokenize; generation itself tokenizes in tgi_llm.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Mapping

from tgi_backend.config import EngineConfig
from tgi_backend.frontend.errors import TemplateError

VERSION = "0.1.0"
ROUTER = "text-generation-router"


@dataclass(frozen=True, slots=True)
class ServedModel:
    model_id: str  # what /info and /v1/models report
    path: str | None  # local folder with the tokenizer, if any
    max_input_tokens: int
    max_total_tokens: int
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_top_n_tokens: int
    tokenizer: Any = None
    lora: bool = False  # adapters configured: a chat `model` naming one selects it

    def info(self, max_client_batch_size: int) -> dict[str, Any]:
        """TGI's /info body."""
        return {
            "model_id": self.model_id,
            "model_sha": None,
            "model_pipeline_tag": "text-generation",
            "max_concurrent_requests": self.max_concurrent_requests,
            "max_best_of": self.max_best_of,
            "max_stop_sequences": self.max_stop_sequences,
            "max_input_tokens": self.max_input_tokens,
            "max_total_tokens": self.max_total_tokens,
            "validation_workers": 1,
            "max_client_batch_size": max_client_batch_size,
            "router": ROUTER,
            "version": VERSION,
            "sha": None,
            "docker_label": None,
        }

    def names(self) -> frozenset[str]:
        """Model names a client may send that mean the base model, not an adapter."""
        # "dummy": what huggingface_hub's InferenceClient sends for a base_url
        names = {"", "tgi", "dummy", self.model_id, os.path.basename(self.model_id.rstrip("/"))}
        return frozenset(names)

    def render_chat(self, messages: list[dict[str, Any]], **extra: Any) -> str:
        """The tokenizer's chat template with a generation prompt; TemplateError when it cannot render."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise TemplateError("Template error: the model has no chat template")
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **extra)
        except Exception as exc:  # jinja errors, raise_exception() in templates
            raise TemplateError(f"Template error: {exc}") from exc

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[dict[str, Any]]:
        """TGI's /tokenize body: [{id, text, start, stop}] with character offsets."""
        if self.tokenizer is None:
            raise TemplateError("No fast tokenizer available")
        enc = self.tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        return [
            {"id": int(i), "text": text[start:stop], "start": int(start), "stop": int(stop)}
            for i, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"])
        ]


def served_model(parameters: Mapping[str, str], tokenizer_path: str | None = None) -> ServedModel:
    """From tgi_llm's config parameters; limits resolved as the engine resolves them."""
    config = EngineConfig.from_strings(parameters)
    path = tokenizer_path or (config.model_id if os.path.isdir(config.model_id) else None)
    if path is None:
        path = _hub_folder(config.model_id, config.revision)
    max_pos = _max_position_embeddings(path)
    if max_pos is not None or config.max_total_tokens:
        config = config.resolve(max_pos or config.max_total_tokens)
    tokenizer = _load_tokenizer(path)
    extra = config.extra
    return ServedModel(
        model_id=config.model_id,
        path=path,
        max_input_tokens=config.max_input_tokens,
        max_total_tokens=config.max_total_tokens,
        max_concurrent_requests=config.max_concurrent_requests,
        max_best_of=int(extra.get("max_best_of", 2)),
        max_stop_sequences=int(extra.get("max_stop_sequences", 4)),
        max_top_n_tokens=int(extra.get("max_top_n_tokens", 5)),
        tokenizer=tokenizer,
        lora=bool(getattr(config, "lora_adapters", None) or getattr(config, "lora_root", None)),
    )


def _hub_folder(model_id: str, revision: str | None) -> str | None:
    """A hub id's tokenizer and config only (no weights), from the cache or the hub."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["config.json", "tokenizer*", "special_tokens_map.json", "chat_template*", "*.model", "vocab*"]
        return snapshot_download(model_id, revision=revision, allow_patterns=patterns)
    except Exception:  # not a hub id, or offline: the front runs without a tokenizer
        return None


def _max_position_embeddings(path: str | None) -> int | None:
    if path is None:
        return None
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
            value = json.load(f).get("max_position_embeddings")
    except (OSError, ValueError):
        return None
    return int(value) if value else 4096


def _load_tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    from tgi_backend.tokenizer.loader import load_tokenizer

    try:
        return load_tokenizer(path)
    except (FileNotFoundError, ValueError):
        return None
