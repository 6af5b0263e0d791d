"""The batched sampler: greedy rows, temperature / top-k / top-p, per-request seeds."""
from __future__ import annotations

import torch

from tgi_backend.engine.request import SamplingParams
import pytest

from tgi_backend.sampling import sampler as sampler_module
from tgi_backend.sampling.sampler import GREEDY_BLOCK_ROWS, Sampler, SamplingRow, greedy_tokens

V = 50


def _rows(*params: SamplingParams, prefix: str = "r") -> list[SamplingRow]:
    return [SamplingRow(f"{prefix}{i}", p) for i, p in enumerate(params)]


def test_greedy_is_argmax():
    logits = torch.randn(5, V, generator=torch.Generator().manual_seed(1))
    assert Sampler(seed=0)(logits, _rows(*[SamplingParams()] * 5)) == logits.argmax(-1).tolist()


def test_greedy_ties_take_the_first_maximum_like_argmax():
    logits = torch.zeros(3, 40_000)  # wide rows: the reduction runs in parallel chunks
    logits[0, [7, 30_000]] = 1.0
    logits[1, [39_999, 20_001, 5]] = 2.0
    assert Sampler(seed=0)(logits, _rows(*[SamplingParams()] * 3)) == [7, 5, 0] == logits.argmax(-1).tolist()


@pytest.mark.parametrize("vocab", [32_000, 32_064, 32_001])  # blocks of 256, of 64, and no block size (max)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocked_greedy_is_argmax_with_its_first_maximum_rule(vocab: int, dtype: torch.dtype):
    rows = GREEDY_BLOCK_ROWS * 2
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(3)).to(dtype)
    top = logits.amax().item() + 1
    logits[0, [vocab - 1, 5]] = top  # ties: two blocks hold the maximum, the first wins
    logits[1, [300, 257]] = top  # a tie inside one block
    logits[2] = float("-inf")  # nothing finite: index 0, as argmax
    logits[3, :] = 0.0
    assert torch.equal(greedy_tokens(logits), logits.argmax(-1))
    assert torch.equal(greedy_tokens(logits[:, : vocab - 1]), logits[:, : vocab - 1].argmax(-1))  # a strided view


def test_greedy_rows_unchanged_next_to_sampled_rows():
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    rows = _rows(SamplingParams(), SamplingParams(do_sample=True, temperature=5.0), SamplingParams())
    before = logits.clone()
    out = Sampler(seed=0)(logits, rows)
    assert out[0] == logits[0].argmax() and out[2] == logits[2].argmax()
    assert torch.equal(logits, before)  # the caller's logits are left alone


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(3))
    sampler = Sampler(seed=0)
    greedy = logits.argmax(-1).tolist()
    for _ in range(5):
        assert sampler(logits, _rows(*[SamplingParams(do_sample=True, top_k=1, temperature=3.0)] * 6)) == greedy
        assert sampler(logits, _rows(*[SamplingParams(do_sample=True, top_p=1e-6)] * 6)) == greedy


def test_top_k_keeps_only_k_best():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(4))
    allowed = set(logits[0].topk(3).indices.tolist())
    sampler = Sampler(seed=0)
    seen = {sampler(logits, _rows(SamplingParams(do_sample=True, top_k=3, temperature=10.0)))[0] for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_same_seed_same_tokens_whatever_the_batch():
    gen = torch.Generator().manual_seed(5)
    steps = [torch.randn(4, V, generator=gen) for _ in range(6)]
    seeded = SamplingParams(do_sample=True, seed=1234)
    others = [SamplingParams(do_sample=True), SamplingParams(), SamplingParams(do_sample=True, seed=9)]

    def run(row_index: int, sampler: Sampler, companions: list[SamplingParams], rid: str) -> list[int]:
        tokens = []
        for n, logits in enumerate(steps):
            rows = [SamplingRow(f"c{i}", p, n) for i, p in enumerate(companions)]
            rows.insert(row_index, SamplingRow(rid, seeded, n))
            batch = torch.cat([logits[:row_index], logits[3:4], logits[row_index:3]])[: len(rows)]
            tokens.append(sampler(batch, rows)[row_index])
        return tokens

    alone = run(0, Sampler(seed=1), [], "a")
    crowded = run(2, Sampler(seed=2), others, "b")
    assert alone == crowded
    # and the stream is not constant: the seed moves on with each generated token
    assert len(set(alone)) > 1


def test_release_then_reuse_gives_same_stream():
    logits = torch.randn(1, V, generator=torch.Generator().manual_seed(6))
    sampler = Sampler(seed=0)
    row = SamplingRow("x", SamplingParams(do_sample=True, seed=7), 3)
    first = sampler(logits, [row])
    sampler.release(["x"])
    assert sampler(logits, [row]) == first


def test_temperature_shapes_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    sampler = Sampler(seed=123)
    n = 4000

    def freq(temperature: float) -> torch.Tensor:
        rows = _rows(*[SamplingParams(do_sample=True, temperature=temperature)] * n)
        tokens = torch.tensor(sampler(logits.expand(n, -1).clone(), rows))
        return torch.bincount(tokens, minlength=4).float() / n

    for t in (0.5, 1.0, 2.0):
        expected = (logits[0] / t).softmax(-1)
        assert (freq(t) - expected).abs().max() < 0.03, t
    assert freq(0.2)[0] > freq(1.0)[0] > freq(5.0)[0]


def test_top_p_distribution():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.7 keeps the first two, renormalised to 5/8, 3/8
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    n = 4000
    rows = _rows(*[SamplingParams(do_sample=True, top_p=0.7)] * n)
    tokens = torch.tensor(Sampler(seed=3)(logits.expand(n, -1).clone(), rows))
    freq = torch.bincount(tokens, minlength=4).float() / n
    assert freq[2] == 0 and freq[3] == 0
    assert abs(freq[0].item() - 0.625) < 0.03


def test_greedy_only_rows_take_the_heads_argmax_without_logits():
    sampler = Sampler(seed=0)
    plain = _rows(SamplingParams(), SamplingParams(max_new_tokens=4, stop=("x",)))
    assert sampler.greedy_only(plain)
    for other in (SamplingParams(do_sample=True), SamplingParams(details=True), SamplingParams(repetition_penalty=1.2),
                  SamplingParams(min_new_tokens=2), SamplingParams(watermark=True)):
        assert not sampler.greedy_only(plain + _rows(other, prefix="o"))
        with pytest.raises(ValueError, match="needs the logits"):
            sampler.sample(None, plain + _rows(other, prefix="o"), torch.tensor([1, 2, 3]))
    assert sampler.sample(None, plain, torch.tensor([7, 9])).token_ids == [7, 9]
    with pytest.raises(ValueError, match="needs the logits"):
        sampler.sample(None, plain)


def test_greedy_only_judges_each_params_object_once(monkeypatch):
    asked = []

    class Probe:  # a processor that counts its checks; active for params asking 5 new tokens
        def active(self, params: SamplingParams) -> bool:
            asked.append(params)
            return params.max_new_tokens == 5

    sampler = Sampler([Probe()], seed=0)
    plain, probed = SamplingParams(), SamplingParams(max_new_tokens=5)
    for _ in range(3):
        assert sampler.greedy_only(_rows(plain, plain))
        assert not sampler.greedy_only(_rows(plain, probed, prefix="p"))
    assert asked == [plain, probed]
    assert sampler.greedy_only(_rows(SamplingParams()))  # an equal but new object: judged on its own
    assert len(asked) == 3
    monkeypatch.setattr(sampler_module, "VERDICTS_KEPT", 1)  # past the bound the verdicts start over
    newer = SamplingParams(max_new_tokens=5)
    assert not sampler.greedy_only(_rows(newer)) and sampler.greedy_only(_rows(plain))
    assert asked[3:] == [newer, plain]
