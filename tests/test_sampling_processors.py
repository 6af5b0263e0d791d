"""Each batched logits processor against a straightforward per-row reference, on random logits and mixed
parameters (property tests): transformers' own warpers where TGI uses them, plain loops elsewhere."""
from __future__ import annotations

import collections

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from tgi_backend.engine.request import SamplingParams
from tgi_backend.sampling import processors as P
from tgi_backend.sampling.sampler import Sampler
from tgi_backend.sampling.watermark import Watermark

EOS = 2
SETTINGS = settings(max_examples=40, deadline=None)


@st.composite
def batches(draw, make_params):
    """(logits [rows, vocab], rows): each row's parameters drawn independently, some rows left at defaults."""
    vocab = draw(st.integers(8, 64))
    n = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, vocab, generator=gen) * draw(st.sampled_from([0.5, 2.0, 8.0]))
    rows = []
    for i in range(n):
        params = make_params(draw) if draw(st.booleans()) or i == 0 else SamplingParams()
        prompt = draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=12))
        generated = draw(st.lists(st.integers(0, vocab - 1), max_size=12))
        rows.append(P.SamplingRow(f"r{i}", params, len(generated), prompt + generated, len(prompt)))
    return logits, rows


def run(proc, logits, rows):
    return Sampler(processors=[proc]).process(logits, rows)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.equal(torch.isinf(got), torch.isinf(want)), (got, want)
    finite = ~torch.isinf(want)
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def check(proc, logits, rows, reference):
    got = run(proc, logits, rows)
    for i, row in enumerate(rows):
        want = reference(logits[i : i + 1].clone(), row) if proc.active(row.params) else logits[i : i + 1]
        assert_same(got[i : i + 1], want)


def sampled(**kw):
    return lambda draw: SamplingParams(do_sample=True, **{k: draw(v) for k, v in kw.items()})


@SETTINGS
@given(batches(sampled(temperature=st.floats(0.05, 5.0))))
def test_temperature(batch):
    check(P.Temperature(), *batch, lambda x, r: TemperatureLogitsWarper(r.params.temperature)(None, x))


@SETTINGS
@given(batches(sampled(top_k=st.integers(1, 80))))
def test_top_k(batch):
    check(P.TopK(), *batch, lambda x, r: TopKLogitsWarper(min(r.params.top_k, x.shape[-1]))(None, x))


@SETTINGS
@given(batches(sampled(top_p=st.floats(0.01, 0.99))))
def test_top_p(batch):
    check(P.TopP(), *batch, lambda x, r: TopPLogitsWarper(r.params.top_p)(None, x))


@SETTINGS
@given(batches(sampled(top_p=st.floats(0.01, 0.99), top_k=st.integers(1, 80))))
def test_top_p_after_top_k_sorts_only_the_survivors(batch):
    logits, rows = batch
    after_k = Sampler(processors=[P.TopK()]).process(logits, rows)

    def reference(x, row):
        return TopPLogitsWarper(row.params.top_p)(None, x)

    check(P.TopP(), after_k, rows, reference)


@SETTINGS
@given(batches(sampled(typical_p=st.floats(0.01, 0.99))))
def test_typical_p(batch):
    check(P.TypicalP(), *batch, lambda x, r: TypicalLogitsWarper(r.params.typical_p)(None, x))


@SETTINGS
@given(batches(sampled(min_p=st.floats(0.01, 1.0))))
def test_min_p(batch):
    check(P.MinP(), *batch, lambda x, r: MinPLogitsWarper(r.params.min_p)(None, x))


def _penalties_reference(x: torch.Tensor, row: P.SamplingRow) -> torch.Tensor:
    sp, history = row.params, row.token_ids
    x = RepetitionPenaltyLogitsProcessor(sp.repetition_penalty)(torch.tensor([history]), x)
    counts = collections.Counter(history)
    for token, count in counts.items():  # TGI: frequency = count / tokens so far
        x[0, token] -= sp.frequency_penalty * count / len(history)
    for token in set(history[row.num_prompt_tokens :]):  # vLLM: generated tokens only
        x[0, token] -= sp.presence_penalty
    return x


@SETTINGS
@given(batches(lambda draw: SamplingParams(
    repetition_penalty=draw(st.sampled_from([1.0, 0.7, 1.3, 2.0])),
    frequency_penalty=draw(st.floats(-2.0, 2.0)),
    presence_penalty=draw(st.floats(-2.0, 2.0)),
)))
def test_penalties(batch):
    check(P.Penalties(), *batch, _penalties_reference)


@SETTINGS
@given(batches(lambda draw: SamplingParams(min_new_tokens=draw(st.integers(1, 20)),
                                           stop_token_ids=tuple(draw(st.lists(st.integers(0, 7), max_size=2))))))
def test_min_new_tokens_masks_eos_and_stop_ids(batch):
    proc = P.MinNewTokens()
    proc.eos_token_ids = frozenset({EOS})
    logits, rows = batch
    got = run(proc, logits, rows)
    for i, row in enumerate(rows):
        want = logits[i].clone()
        if row.num_output_tokens < row.params.min_new_tokens:
            for t in {EOS, *row.params.stop_token_ids}:
                want[t] = float("-inf")
        assert_same(got[i : i + 1], want.unsqueeze(0))


def _green_scalar(prev: int, token: int, gamma: float) -> bool:
    """The green list of sampling/watermark.py, one pair at a time with Python ints."""
    m = 0xFFFFFFFF

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & m
        x ^= x >> 15
        x = (x * 0x846CA68B) & m
        return x ^ (x >> 16)

    seed = mix((prev * 15485863 + 15485863) & m)
    return mix((seed ^ (token * 0x9E3779B1)) & m) < int(gamma * 2**32)


@SETTINGS
@given(batches(lambda draw: SamplingParams(watermark=True)), st.sampled_from([0.25, 0.5]))
def test_watermark_bias_is_the_green_list(batch, gamma):
    logits, rows = batch
    proc = Watermark(gamma=gamma, delta=2.0)

    def reference(x, row):
        for v in range(x.shape[-1]):
            if _green_scalar(row.token_ids[-1], v, gamma):
                x[0, v] += 2.0
        return x

    check(proc, logits, rows, reference)


def test_watermark_green_share_is_gamma():
    from tgi_backend.sampling.watermark import green_mask

    mask = green_mask(torch.arange(200), torch.arange(5000), 0.25)
    assert abs(mask.float().mean().item() - 0.25) < 0.01
    assert not torch.equal(mask[0], mask[1])  # each previous token has its own list


def test_pipeline_order_is_tgis():
    names = [type(p).__name__ for p in P.default_processors()]
    assert names == ["Watermark", "Penalties", "MinNewTokens", "Temperature", "TopK", "TopP", "TypicalP", "MinP"]
