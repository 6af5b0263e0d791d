"""Small deterministic tokenizers trained in code, for the demo model and for tests.

Two styles, chosen by name from a registry:
- "byte_level": GPT-2 / Llama-3 style byte-level BPE (every byte is a token; text decodes by concatenation).
- "metaspace": Llama-2 / SentencePiece style BPE with "▁" for spaces and <0xNN> byte fallback; a token decoded
  alone loses its leading space, which is what breaks naive per-token detokenization.
"""
from __future__ import annotations

import itertools
import json
import os
import random
from typing import Any, Callable

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")
BOS, EOS, UNK = "<s>", "</s>", "<unk>"

# Llama-2-like chat format; the bos token comes from the template, as in Llama's own templates.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

_WORDS = (
    "the a of and to in is it you that he was for on are with as I his they be at one have this from or had by "
    "hot word but what some we can out other were all there when up use your how said an each she which do their "
    "time if will way about many then them write would like so these her long make thing see him two has look "
    "more day could go come did number sound no most people my over know water than call first who may down side "
    "been now find model token server request stream batch cache block prompt answer question hello world"
).split()
_MULTI_BYTE = (
    "café", "naïve", "über", "façade", "São", "Paulo", "ñandú", "crème", "brûlée", "Ελληνικά", "Привет",
    "日本語", "東京", "中文字符", "你好", "こんにちは", "한국어", "😀", "🚀", "👍🏽", "🎉", "❤️", "∑", "→", "€",
)
_PUNCT = (".", ".", ".", "!", "?", ",", ":", ";")


_SYLLABLES = (
    "ka to ri men st ar el on in ba lo vi te ra su ne de mo pa gi ul or an fe co tri bro ple sha qu ex"
).split()


def _pseudo_words(rng: random.Random, count: int) -> list[str]:
    """Made-up words from syllables, so that large vocabularies have something to merge."""
    return ["".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 4))) for _ in range(count)]


def demo_corpus(num_lines: int = 6000, seed: int = 0) -> list[str]:
    """English-like sentences from a small word list plus made-up words (Zipf-like frequencies) and ~10%
    multi-byte words (accents, CJK, emoji), from a fixed seed."""
    rng = random.Random(seed)
    vocabulary = list(_WORDS) + _pseudo_words(rng, 3000)
    cumulative = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(vocabulary))))
    lines = []
    for _ in range(num_lines):
        words = rng.choices(vocabulary, cum_weights=cumulative, k=rng.randint(3, 16))
        words = [rng.choice(_MULTI_BYTE) if rng.random() < 0.1 else w for w in words]
        text = " ".join(words)
        text = text[0].upper() + text[1:] + rng.choice(_PUNCT)
        if rng.random() < 0.15:
            text = "  " + text + "\n"  # runs of spaces and newlines also need tokens
        lines.append(text)
    return lines


def _train_byte_level(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _train_metaspace(corpus: list[str], vocab_size: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    pre = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    draft = Tokenizer(models.BPE())
    draft.pre_tokenizer = pre
    trainer = trainers.BpeTrainer(
        vocab_size=max(vocab_size - len(byte_tokens), 64), special_tokens=list(SPECIAL_TOKENS), show_progress=False
    )
    draft.train_from_iterator(corpus, trainer)
    # Rebuild with Llama's id layout: specials, then the 256 byte-fallback tokens, then the learned pieces.
    learned = json.loads(draft.to_str())["model"]
    vocab: dict[str, int] = {}
    for piece in [*SPECIAL_TOKENS, *byte_tokens, *sorted(learned["vocab"], key=learned["vocab"].get)]:
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK, byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


TOKENIZER_STYLES: dict[str, Callable[[list[str], int], Any]] = {
    "byte_level": _train_byte_level,
    "metaspace": _train_metaspace,
}


def build_tokenizer(
    vocab_size: int = 512,
    style: str = "byte_level",
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int = 2048,
) -> Any:
    """Trains and returns a transformers fast tokenizer (not saved). Deterministic; well under a second."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"unknown tokenizer style {style!r}; known: {', '.join(TOKENIZER_STYLES)}")
    tok = TOKENIZER_STYLES[style](demo_corpus(), vocab_size)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,  # keeps decode concatenative, as streaming needs
        model_max_length=model_max_length,
        chat_template=chat_template,
    )


def train_tokenizer(
    out_dir: str,
    vocab_size: int = 512,
    style: str = "byte_level",
    chat_template: str | None = DEFAULT_CHAT_TEMPLATE,
    model_max_length: int = 2048,
) -> Any:
    """Trains a tokenizer and saves tokenizer.json + tokenizer_config.json (chat template inside) to out_dir."""
    tokenizer = build_tokenizer(vocab_size, style, chat_template, model_max_length)
    os.makedirs(out_dir, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    _portable_tokenizer_config(out_dir, chat_template)
    return tokenizer


def _portable_tokenizer_config(out_dir: str, chat_template: str | None) -> None:
    """Names a class every transformers version knows and keeps the chat template in tokenizer_config.json."""
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["add_bos_token"] = True
    cfg["add_eos_token"] = False
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    jinja = os.path.join(out_dir, "chat_template.jinja")
    if os.path.exists(jinja):
        os.remove(jinja)  # one copy of the template, where older readers look for it
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")
