"""preprocessing -> tgi_llm -> postprocessing: the streamed text is exactly the full decode."""
from __future__ import annotations

import pytest
from tritonclient.utils import InferenceServerException

from client.grpc_client import TGITritonClient

pytestmark = pytest.mark.e2e
PROMPT = "Grüße aus 東京 🙂, 你好"
# Sampling on a random-weight byte-level model emits stray UTF-8 fragments: the hard case for streaming.
SAMPLING = {"ignore_eos": True, "temperature": 1.0, "do_sample": True, "seed": 7}


def _completion(tokenizer, prompt_ids: list[int], ids: list[int]) -> str:
    """What the generated ids add to the prompt's text (keeps a leading space a lone decode would drop)."""
    before = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return tokenizer.decode(prompt_ids + ids, skip_special_tokens=True)[len(before):]


def test_ensemble_stream_is_the_full_decode(server, tokenizer):
    client = TGITritonClient(server.grpc_url, model="ensemble")
    deltas = list(client.generate_stream(PROMPT, max_tokens=60, sampling_parameters=SAMPLING))
    ids = [i for d in deltas for i in d.token_ids]
    assert len(ids) == 60 and len(deltas) == 60 and deltas[-1].finish_reason == "length"
    assert deltas[-1].num_output_tokens == 60
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    assert deltas[-1].num_input_tokens == len(prompt_ids)
    assert "".join(d.text for d in deltas) == _completion(tokenizer, prompt_ids, ids)
    # The case that matters happened: some token alone is an incomplete character, held back by a window.
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)


def test_ensemble_whole_response_and_errors(server, tokenizer):
    client = TGITritonClient(server.grpc_url, model="ensemble")
    whole = client.generate(PROMPT, stream=False, max_tokens=20, sampling_parameters={"ignore_eos": True})
    prompt_ids = tokenizer.encode(PROMPT, add_special_tokens=True)
    assert len(whole.token_ids) == 20 and whole.finish_reason == "length"
    assert whole.text == tokenizer.decode(prompt_ids + whole.token_ids, skip_special_tokens=True)
    bare = client.generate(PROMPT, stream=False, max_tokens=20, exclude_input_in_output=True,
                           sampling_parameters={"ignore_eos": True})
    assert bare.text == _completion(tokenizer, prompt_ids, bare.token_ids)
    with pytest.raises(InferenceServerException, match="cannot be empty"):
        client.generate("", max_tokens=2)
    with pytest.raises(InferenceServerException, match="unknown parameter"):
        client.generate("hi", sampling_parameters={"nope": 1})
    assert len(client.generate("still serving", max_tokens=2).token_ids) <= 2
