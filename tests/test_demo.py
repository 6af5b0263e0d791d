from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

from tgi_backend.tokenizer.loader import load_tokenizer
from tgi_backend.weights.demo import (
    DEMO_FOLDER,
    DEMO_VOCAB_SIZE,
    build_random_checkpoint,
    ensure_demo_model,
)
from tgi_backend.weights.tokenizer_training import build_tokenizer, demo_corpus, train_tokenizer

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, max_position_embeddings=64)


def read_json(folder: str, name: str) -> dict:
    with open(os.path.join(folder, name), encoding="utf-8") as f:
        return json.load(f)


def test_corpus_is_deterministic_and_multi_byte() -> None:
    corpus = demo_corpus()
    assert corpus == demo_corpus()
    text = "".join(corpus)
    assert any(c in text for c in "日😀é")


@pytest.mark.parametrize("style", ["byte_level", "metaspace"])
def test_tokenizer_training_is_deterministic(
    style, tmp_path, byte_level_tokenizer_dir, metaspace_tokenizer_dir
) -> None:
    saved = byte_level_tokenizer_dir if style == "byte_level" else metaspace_tokenizer_dir
    train_tokenizer(str(tmp_path), vocab_size=512, style=style)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert read_json(str(tmp_path), name) == read_json(saved, name)


def test_unknown_tokenizer_style() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer style"):
        build_tokenizer(style="wordpiece")


def test_tokenizer_files_and_behaviour(byte_level_tokenizer_dir) -> None:
    cfg = read_json(byte_level_tokenizer_dir, "tokenizer_config.json")
    assert cfg["bos_token"] == "<s>" and cfg["eos_token"] == "</s>" and "chat_template" in cfg
    tok = load_tokenizer(byte_level_tokenizer_dir)
    assert len(tok) == 512
    ids = tok.encode("Hello 東京 😀 crème brûlée")
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "Hello 東京 😀 crème brûlée"
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_metaspace_tokenizer_is_llama_like(metaspace_tokenizer_dir) -> None:
    tok = load_tokenizer(metaspace_tokenizer_dir)
    assert tok.convert_ids_to_tokens(3) == "<0x00>"
    pieces = tok.convert_ids_to_tokens(tok.encode("the 🦀", add_special_tokens=False))
    assert pieces[0].startswith("▁") and "<0xF0>" in pieces
    assert tok.decode(tok.encode("the 🦀 world"), skip_special_tokens=True) == "the 🦀 world"


def test_tiny_llama_checkpoint(tiny_llama_dir) -> None:
    files = set(os.listdir(tiny_llama_dir))
    expected = {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert expected <= files
    cfg = read_json(tiny_llama_dir, "config.json")
    assert cfg["model_type"] == "llama" and cfg["hidden_size"] == 64 and cfg["num_key_value_heads"] == 2
    assert cfg["vocab_size"] == len(load_tokenizer(tiny_llama_dir)) == 512
    assert cfg["torch_dtype"] == "float32" and "rope_theta" in cfg
    assert read_json(tiny_llama_dir, "generation_config.json")["eos_token_id"] == 2
    weights = load_file(os.path.join(tiny_llama_dir, "model.safetensors"))
    assert weights["model.embed_tokens.weight"].shape == (512, 64)
    assert "model.layers.1.self_attn.k_proj.weight" in weights


def test_weights_depend_only_on_the_seed(tmp_path) -> None:
    a = build_random_checkpoint(str(tmp_path / "a"), seed=3, tokenizer=False, vocab_size=100, **TINY)
    b = build_random_checkpoint(str(tmp_path / "b"), seed=3, tokenizer=False, vocab_size=100, **TINY)
    c = build_random_checkpoint(str(tmp_path / "c"), seed=4, tokenizer=False, vocab_size=100, **TINY)
    wa, wb, wc = (load_file(os.path.join(p, "model.safetensors")) for p in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not (wa["lm_head.weight"] == wc["lm_head.weight"]).all()
    assert not os.path.exists(os.path.join(a, "tokenizer.json"))


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_other_architectures_and_eos_lists(arch, tmp_path) -> None:
    out = build_random_checkpoint(str(tmp_path), arch=arch, dtype="bfloat16", tokenizer=False, vocab_size=100,
                                  eos_token_id=[2, 7], **TINY)
    cfg = read_json(out, "config.json")
    assert cfg["model_type"] == arch and cfg["torch_dtype"] == "bfloat16"
    assert read_json(out, "generation_config.json")["eos_token_id"] == [2, 7]
    assert str(next(iter(load_file(os.path.join(out, "model.safetensors")).values())).dtype) == "torch.bfloat16"


def test_llama2_style_checkpoint(tmp_path) -> None:
    out = build_random_checkpoint(str(tmp_path), tokenizer_style="metaspace", **TINY)
    assert load_tokenizer(out).convert_ids_to_tokens(3) == "<0x00>"
    assert read_json(out, "config.json")["vocab_size"] == 512


def test_unknown_architecture(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown architecture"):
        build_random_checkpoint(str(tmp_path), arch="gpt9", tokenizer=False)


def test_transformers_runs_the_checkpoint(tiny_llama_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ids = torch.tensor([load_tokenizer(tiny_llama_dir).encode("Hello")])
    out = model.generate(ids, max_new_tokens=3, do_sample=False, min_new_tokens=3)
    assert out.shape == (1, ids.shape[1] + 3)


def test_demo_model_is_built_once_into_the_cache(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TGI_TRITON_CACHE", str(tmp_path))
    folder = ensure_demo_model()
    assert folder == os.path.join(str(tmp_path), DEMO_FOLDER)
    assert os.listdir(str(tmp_path)) == [DEMO_FOLDER]  # no staging folder left behind
    cfg = read_json(folder, "config.json")
    assert cfg["demo"] is True and cfg["torch_dtype"] == "bfloat16" and cfg["vocab_size"] == DEMO_VOCAB_SIZE
    assert (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["max_position_embeddings"]) == (256, 4, 2048)
    assert "random weights" in open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    stamp = os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns
    assert ensure_demo_model(str(tmp_path)) == folder
    assert os.stat(os.path.join(folder, "model.safetensors")).st_mtime_ns == stamp


def test_demo_model_replaces_an_incomplete_leftover(tmp_path) -> None:
    leftover = tmp_path / DEMO_FOLDER
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    folder = ensure_demo_model(str(tmp_path))
    assert read_json(folder, "config.json")["demo"] is True
    assert sorted(os.listdir(str(tmp_path))) == [DEMO_FOLDER]


def test_concurrent_builds_agree(tmp_path) -> None:
    # Triton loads the preprocessing and LLM models at once: both may build the demo at the same time.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        folders = list(pool.map(lambda _: ensure_demo_model(str(tmp_path)), range(2)))
    assert folders[0] == folders[1] == os.path.join(str(tmp_path), DEMO_FOLDER)
    assert os.listdir(str(tmp_path)) == [DEMO_FOLDER]
    assert load_tokenizer(folders[0]).encode("hi")[0] == 1
