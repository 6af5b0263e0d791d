"""Shared fixtures. Expensive things are built once per session into pytest's temporary folder."""
from __future__ import annotations

import pytest

TINY_LLAMA = dict(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    max_position_embeddings=512,
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny Llama checkpoint (float32, random weights, seed 0) with a ~512-token byte-level BPE tokenizer."""
    from tgi_backend.weights.demo import build_random_checkpoint

    out = tmp_path_factory.mktemp("tiny-llama")
    return build_random_checkpoint(str(out), arch="llama", seed=0, dtype="float32", **TINY_LLAMA)


@pytest.fixture(scope="session")
def byte_level_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved byte-level BPE tokenizer (GPT-2 / Llama-3 style), 512 tokens."""
    from tgi_backend.weights.tokenizer_training import train_tokenizer

    out = str(tmp_path_factory.mktemp("tok-byte-level"))
    train_tokenizer(out, vocab_size=512, style="byte_level")
    return out


@pytest.fixture(scope="session")
def metaspace_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A saved SentencePiece-like tokenizer ("▁" spaces, <0xNN> byte fallback; Llama-2 style), 512 tokens."""
    from tgi_backend.weights.tokenizer_training import train_tokenizer

    out = str(tmp_path_factory.mktemp("tok-metaspace"))
    train_tokenizer(out, vocab_size=512, style="metaspace")
    return out
