from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tgi_backend.tokenizer.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, decode_window
from tgi_backend.tokenizer.loader import load_tokenizer

PROMPTS = ["Hello world", "The café is", "東京 and 日本語", "A 😀 emoji:", "x"]
PIECES = list("abc xyz.,\n") + [" the", " world", "é", "ü", "ñ", "日", "本", "語", "😀", "🚀", "👍🏽", "€", "Ω", "🦀"]
REAL_TEXT = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)
HYPOTHESIS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def byte_tok(byte_level_tokenizer_dir: str):
    return load_tokenizer(byte_level_tokenizer_dir)


@pytest.fixture(scope="module")
def meta_tok(metaspace_tokenizer_dir: str):
    return load_tokenizer(metaspace_tokenizer_dir)


def stream(tokenizer, prompt_ids: list[int], generated: list[int], chunk: int = 1) -> tuple[list[str], list[str]]:
    """Runs the stateful detokenizer and, beside it, the stateless ensemble path; returns both delta lists."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    stateful, stateless = [], []
    for start in range(0, len(generated), chunk):
        piece = generated[start : start + chunk]
        last = start + chunk >= len(generated)
        text, context, unread = detok.push_with_window(piece)
        if last:
            text += detok.flush()
        stateful.append(text)
        stateless.append(decode_window(tokenizer, context, unread, final=last))
    return stateful, stateless


def continuation(tokenizer, prompt_text: str, text: str) -> tuple[list[int], list[int]] | None:
    """(prompt ids, ids of `text` as the tokenizer encodes it after the prompt), or None if they merge."""
    prompt = tokenizer.encode(prompt_text)
    whole = tokenizer.encode(prompt_text + text)
    return (prompt, whole[len(prompt) :]) if whole[: len(prompt)] == prompt else None


def expected_text(tokenizer, prompt_ids: list[int], generated: list[int]) -> str:
    # What TGI's generated_text holds: the generated tokens decoded in the context of the prompt.
    full = tokenizer.decode(prompt_ids + generated, skip_special_tokens=True)
    return full[len(tokenizer.decode(prompt_ids, skip_special_tokens=True)) :]


def test_initial_offsets(byte_tok) -> None:
    detok = IncrementalDetokenizer(byte_tok, list(range(10, 22)))
    assert (detok.prefix_offset, detok.read_offset) == (7, 12)
    short = IncrementalDetokenizer(byte_tok, [1, 2, 3])
    assert (short.prefix_offset, short.read_offset) == (0, 3)
    assert short.window() == ([1, 2, 3], [])


def test_offsets_move_only_when_text_is_emitted(byte_tok) -> None:
    prompt = byte_tok.encode("Hi")
    emoji = byte_tok.encode("🦀", add_special_tokens=False)  # not in the training corpus: several byte tokens
    assert len(emoji) > 1
    detok = IncrementalDetokenizer(byte_tok, prompt)
    deltas = [detok.push([t]) for t in emoji]
    assert deltas[:-1] == [""] * (len(emoji) - 1) and deltas[-1] == "🦀"
    assert detok.read_offset == len(detok.token_ids)
    assert detok.prefix_offset == len(prompt)
    assert detok.token_ids == prompt + emoji


def test_flush_releases_an_incomplete_character(byte_tok) -> None:
    emoji = byte_tok.encode("🦀", add_special_tokens=False)
    detok = IncrementalDetokenizer(byte_tok, byte_tok.encode("Hi"))
    assert detok.push(emoji[:1]) == ""
    assert detok.flush().endswith(REPLACEMENT_CHAR)
    assert detok.flush() == ""


def test_special_tokens_are_skipped_by_default(byte_tok) -> None:
    eos = byte_tok.eos_token_id
    detok = IncrementalDetokenizer(byte_tok, byte_tok.encode("Hi"))
    assert detok.push(byte_tok.encode(" there", add_special_tokens=False)) == " there"
    assert detok.push([eos]) == ""
    assert detok.flush() == ""
    shown = IncrementalDetokenizer(byte_tok, byte_tok.encode("Hi"), skip_special_tokens=False)
    assert shown.push([eos]) == "</s>"


def test_metaspace_keeps_the_leading_space_that_a_lone_decode_loses(meta_tok) -> None:
    prompt, generated = continuation(meta_tok, "Hello", " world again")
    assert meta_tok.convert_ids_to_tokens(generated[0]).startswith("▁")
    assert not meta_tok.decode([generated[0]]).startswith(" ")  # the known per-token ensemble bug
    stateful, stateless = stream(meta_tok, prompt, generated)
    assert stateful[0].startswith(" ")
    assert "".join(stateful) == "".join(stateless) == " world again"


def test_byte_fallback_characters_arrive_whole(meta_tok) -> None:
    prompt, generated = continuation(meta_tok, "Say", " 🦀!")
    stateful, stateless = stream(meta_tok, prompt, generated)
    assert "".join(stateful) == "".join(stateless) == " 🦀!"
    assert not any(REPLACEMENT_CHAR in delta for delta in stateful)


def test_tokenizers_that_clean_up_spaces_take_the_transformers_path(byte_level_tokenizer_dir) -> None:
    tok = load_tokenizer(byte_level_tokenizer_dir)
    tok.clean_up_tokenization_spaces = True  # decode must then go through transformers, whatever it does
    calls = []
    original = tok.decode
    tok.decode = lambda ids, **kw: calls.append(ids) or original(ids, **kw)
    prompt, generated = continuation(tok, "Hello", " world , again .")
    stateful, stateless = stream(tok, prompt, generated)
    assert calls and "".join(stateful) == "".join(stateless) == expected_text(tok, prompt, generated)


def test_multi_token_pushes(byte_tok) -> None:
    prompt = byte_tok.encode("Start")
    generated = byte_tok.encode(" naïve 東京 😀 done.", add_special_tokens=False)
    for chunk in (2, 3, 7):
        stateful, stateless = stream(byte_tok, prompt, generated, chunk)
        assert "".join(stateful) == "".join(stateless) == " naïve 東京 😀 done."


def random_ids(data, tokenizer, byte_level: bool) -> list[int]:
    """Random token ids. For byte fallback only whole characters' byte runs: ByteFallback turns an invalid
    run into one U+FFFD per byte as a group, so a stray byte changes how its neighbours decode."""
    any_id = st.integers(0, len(tokenizer) - 1)
    if byte_level:
        return data.draw(st.lists(any_id, min_size=1, max_size=30))
    byte_ids = {i for t, i in tokenizer.get_vocab().items() if t.startswith("<0x")}
    piece = st.integers(0, len(tokenizer) - 1).filter(lambda i: i not in byte_ids).map(lambda i: [i])
    to_bytes = lambda c: [tokenizer.convert_tokens_to_ids(f"<0x{b:02X}>") for b in c.encode()]  # noqa: E731
    char = st.sampled_from("🦀Ω€ü日").map(to_bytes)
    units = data.draw(st.lists(st.one_of(piece, char), min_size=1, max_size=20))
    return [i for unit in units for i in unit]


@pytest.mark.parametrize("style", ["byte", "meta"])
@HYPOTHESIS
@given(data=st.data())
def test_random_ids_concatenate_to_the_full_decode(style, byte_tok, meta_tok, data) -> None:
    tokenizer = byte_tok if style == "byte" else meta_tok
    prompt = tokenizer.encode(data.draw(st.sampled_from(PROMPTS)))
    generated = random_ids(data, tokenizer, style == "byte")
    chunk = data.draw(st.integers(1, 4))
    stateful, stateless = stream(tokenizer, prompt, generated, chunk)
    assert "".join(stateful) == "".join(stateless) == expected_text(tokenizer, prompt, generated)
    if style == "byte":  # byte-level decoding is concatenative: the context changes nothing
        assert "".join(stateful) == tokenizer.decode(generated, skip_special_tokens=True)


@pytest.mark.parametrize("style", ["byte", "meta"])
@HYPOTHESIS
@given(prompt_text=st.sampled_from(PROMPTS), text=REAL_TEXT)
def test_real_text_streams_back_exactly(style, byte_tok, meta_tok, prompt_text, text) -> None:
    tokenizer = byte_tok if style == "byte" else meta_tok
    pair = continuation(tokenizer, prompt_text, text)
    if pair is None or not pair[1]:
        return  # the new text merged with the prompt's last token, or adds no token
    prompt, generated = pair
    stateful, stateless = stream(tokenizer, prompt, generated)
    assert "".join(stateful) == "".join(stateless) == expected_text(tokenizer, prompt, generated)
    assert not any(d.endswith(REPLACEMENT_CHAR) for d in stateful[:-1])
    if style == "byte":
        assert "".join(stateful) == text


def test_loader_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError, match=f"no tokenizer in {tmp_path}"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=f"cannot load the tokenizer in {tmp_path}"):
        load_tokenizer(str(tmp_path))


def test_loader_returns_a_fast_tokenizer(byte_tok) -> None:
    assert byte_tok.is_fast and byte_tok.backend_tokenizer is not None
