"""Renders the Triton model repository from the templates in `model_repository/` and an EngineConfig."""
from __future__ import annotations

import dataclasses
import os
import shutil
import sys
from pathlib import Path
from typing import Mapping

from tgi_backend.config import EngineConfig

MODELS = ("tgi_llm", "preprocessing", "postprocessing", "ensemble")
PARAMETERS_MARK = "# {{PARAMETERS}}"


def templates_dir() -> Path:
    """The templates: next to the package in a checkout or editable install, else package data."""
    package_root = Path(__file__).resolve().parents[1]
    beside = package_root.parent / "model_repository"
    if (beside / "tgi_llm" / "config.pbtxt").is_file():
        return beside
    installed = Path(sys.prefix) / "share" / "tgi-triton" / "model_repository"  # wheels: pyproject data-files
    if (installed / "tgi_llm" / "config.pbtxt").is_file():
        return installed
    raise FileNotFoundError(f"model repository templates not found in {beside} or {installed}")


def pbtxt_parameters(values: Mapping[str, str]) -> str:
    """Triton's `parameters` blocks for string values (quotes and backslashes escaped)."""
    blocks = []
    for key in sorted(values):
        text = str(values[key]).replace("\\", "\\\\").replace('"', '\\"')
        blocks.append(f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{text}" }}\n}}')
    return "\n".join(blocks)


def model_parameters(config: EngineConfig) -> dict[str, dict[str, str]]:
    """What each model reads from its config: the engine all of EngineConfig, the tokenizer steps the model."""
    tokenizer = {"model_id": config.model_id}
    if config.revision:
        tokenizer["revision"] = config.revision
    return {
        "tgi_llm": config.to_strings(),
        "preprocessing": tokenizer,
        "postprocessing": tokenizer,
        "ensemble": {},
    }


def render_repository(repo_dir: str | os.PathLike[str], config: EngineConfig) -> Path:
    """Writes one folder per model; existing model folders of ours are replaced, anything else is kept."""
    source = templates_dir()
    target = Path(repo_dir)
    target.mkdir(parents=True, exist_ok=True)
    params = model_parameters(config)
    for name in MODELS:
        dest = target / name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(source / name, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (dest / "1").mkdir(exist_ok=True)  # ensembles need an (empty) version folder too
        pbtxt = dest / "config.pbtxt"
        text = pbtxt.read_text(encoding="utf-8")
        pbtxt.write_text(text.replace(PARAMETERS_MARK, pbtxt_parameters(params[name])), encoding="utf-8")
    return target


def resolve_model_for_render(config: EngineConfig, *, download: bool) -> EngineConfig:
    """Turns the model id into a local folder: always when `download`, else only if it is already there."""
    model_id = config.model_id
    if os.path.isdir(model_id):
        return dataclasses.replace(config, model_id=os.path.abspath(model_id))
    if download:
        from tgi_backend.weights.hub import resolve_model_path

        return dataclasses.replace(config, model_id=resolve_model_path(model_id, config.revision))
    local = _local_copy(model_id, config.revision)
    return dataclasses.replace(config, model_id=local) if local else config


def _local_copy(model_id: str, revision: str | None) -> str | None:
    """A folder already holding the model (built demo or hub cache), without any download."""
    if model_id == "demo":
        from tgi_backend.weights import demo

        path = os.path.join(demo.demo_cache_root(), demo.DEMO_FOLDER)
        return path if demo.is_complete_checkpoint(path) else None
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(model_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not a hub id): the model resolves it at load time
        return None
