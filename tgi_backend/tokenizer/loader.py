"""Loads a model folder's tokenizer: a transformers fast tokenizer, from local files only."""
from __future__ import annotations

import os
from typing import Any

# Any one of these makes a folder a tokenizer folder for AutoTokenizer.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")


def load_tokenizer(path: str, *, trust_remote_code: bool = False) -> Any:
    """Returns AutoTokenizer's fast tokenizer for the folder `path`; never touches the network.

    Raises FileNotFoundError naming the folder when it holds no tokenizer files, and ValueError when
    transformers cannot build a fast tokenizer from what is there.
    """
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer folder not found: {path}")
    if not any(os.path.isfile(os.path.join(path, name)) for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {path}: expected one of {', '.join(_TOKENIZER_FILES)}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, local_files_only=True, use_fast=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"cannot load the tokenizer in {path}: {exc}") from exc
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"the tokenizer in {path} has no fast (tokenizers) version; convert it to tokenizer.json")
    return tokenizer
