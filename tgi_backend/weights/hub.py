"""Model id -> local folder: a folder as is, "demo" -> the built-in demo, anything else from the HF hub cache.

huggingface_hub reads HF_HUB_OFFLINE and HF_HUB_CACHE once, when it is imported; so `HubSettings.from_env`
reads them at call time and passes them explicitly (local_files_only, cache_dir), and tests can set them.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

# What the engine reads from a repository: configs, tokenizer files, chat templates and safetensors weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]
_TRUE = ("1", "true", "yes", "on")


class ModelNotFoundError(FileNotFoundError):
    """The model id names no local folder and is not available from the hub or its cache."""


@dataclass(frozen=True, slots=True)
class HubSettings:
    cache_dir: str | None  # None: huggingface_hub's default (~/.cache/huggingface/hub)
    offline: bool
    token: str | None  # None: huggingface_hub's stored login, if any
    endpoint: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "HubSettings":
        """The one place that reads the hub's environment variables."""
        env = os.environ if environ is None else environ
        cache = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
        if not cache and env.get("HF_HOME"):
            cache = os.path.join(os.path.expanduser(env["HF_HOME"]), "hub")
        return cls(
            cache_dir=os.path.expanduser(cache) if cache else None,
            offline=env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
            token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
            endpoint=env.get("HF_ENDPOINT") or None,
        )


def resolve_model_path(model_id: str, revision: str | None = None, settings: HubSettings | None = None) -> str:
    """Returns a local folder holding the model `model_id` (at `revision`: a branch, tag or commit hash).

    An existing folder is returned as an absolute path; "demo" builds the demo model once; any other id is
    fetched with huggingface_hub.snapshot_download (from the cache only when HF_HUB_OFFLINE is set).
    """
    from tgi_backend.weights.demo import DEMO_MODEL_ID

    local = os.path.expanduser(model_id)
    if os.path.isdir(local):
        return os.path.abspath(local)
    if model_id == DEMO_MODEL_ID:
        from tgi_backend.weights.demo import ensure_demo_model

        return ensure_demo_model()
    if _looks_like_a_path(model_id):
        raise ModelNotFoundError(f"model folder {model_id!r} does not exist")
    return _snapshot(model_id, revision, settings or HubSettings.from_env())


def _looks_like_a_path(model_id: str) -> bool:
    # Hub ids are "name" or "org/name"; anything else is meant as a folder.
    return model_id.startswith((".", "/", "~")) or model_id.count("/") > 1 or os.sep != "/" and os.sep in model_id


def _snapshot(model_id: str, revision: str | None, settings: HubSettings) -> str:
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(
            model_id,
            revision=revision,
            cache_dir=settings.cache_dir,
            token=settings.token,
            local_files_only=settings.offline,
            allow_patterns=ALLOW_PATTERNS,
            endpoint=settings.endpoint,
            library_name="tgi-triton",
        )
    except Exception as exc:  # huggingface_hub raises many kinds (HTTP, validation, cache misses): one message
        raise ModelNotFoundError(_explain(model_id, revision, settings, exc)) from exc


def _explain(model_id: str, revision: str | None, settings: HubSettings, exc: Exception) -> str:
    at = f" at revision {revision!r}" if revision else ""
    cache = settings.cache_dir or "the default Hugging Face cache (~/.cache/huggingface/hub)"
    if settings.offline:
        hint = (
            f"HF_HUB_OFFLINE is set, so only {cache} was searched; download the model there first "
            "(or unset HF_HUB_OFFLINE), or pass a local folder"
        )
    else:
        hint = (
            f"check the id and revision, set HF_TOKEN for gated or private models, or work offline from {cache} "
            "with HF_HUB_OFFLINE=1, or pass a local folder"
        )
    detail = str(exc).strip().rstrip(".")
    return f"cannot find model {model_id!r}{at}: {type(exc).__name__}: {detail}. Hint: {hint}"
