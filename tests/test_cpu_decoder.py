"""The fused decode step (kernels/cpu/decoder.c): bit for bit the model's own modules, op by op, for every
Llama-family variant it takes; steps it does not take run the modules; bad slots are refused."""
from __future__ import annotations

import pytest
import torch

from test_parity import ARCHS, build_checkpoint
from test_parity_architectures import build_checkpoint as build_other
from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.kernels.cpu import decoder, gemv, library, panel
from tgi_backend.layers import linear as linear_module
from tgi_backend.sampling.sampler import greedy_tokens

pytestmark = pytest.mark.skipif(
    library("decoder") is None or not getattr(linear_module.matmul_plan(0), "native_rows", 0),
    reason="no C compiler, or neither oneDNN bf16 nor AVX2: no few-row kernel plan, no fused decoder")
BLOCK = 4


def _runner(folder: str) -> ModelRunner:
    config = EngineConfig(model_id=folder, dtype="bfloat16", block_size=BLOCK, max_total_tokens=64,
                          max_batch_total_tokens=4096).resolve(128)
    return ModelRunner(config, folder)


def _chunk(rid: str, tokens: list[int], start: int, blocks: list[int]) -> ScheduledChunk:
    return ScheduledChunk(rid, tokens, start, blocks, True, SamplingParams())


@pytest.fixture(scope="module", params=list(ARCHS) + ["phi3", "phi3-window"])  # Phi-3 runs Llama's modules
def runner(request, tmp_path_factory) -> ModelRunner:
    folder = str(tmp_path_factory.mktemp(request.param))
    (build_checkpoint if request.param in ARCHS else build_other)(request.param, folder)
    return _runner(folder)


def _decode_steps(runner: ModelRunner, sizes: list[int]) -> list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Decode steps of the given row counts, each run fused and then, from the same cache, by the modules:
    [(rows, fused logits, module logits, fused cache, module cache)]."""
    fused = runner.fused
    gen = torch.Generator().manual_seed(3)
    n = max(sizes)
    prompts = [torch.randint(0, 256, (2 + i % 13,), generator=gen).tolist() for i in range(n)]
    blocks = {i: list(range(1 + i * 6, 1 + i * 6 + 6)) for i in range(n)}  # 24 tokens: the prompt and the steps
    runner.compute_logits(SchedulerOutput([_chunk(f"r{i}", p, 0, blocks[i]) for i, p in enumerate(prompts)]))
    lengths = [len(p) for p in prompts]
    out = []
    for step, rows in enumerate(sizes):  # across block boundaries and past the 8-token sliding windows
        chunks = [_chunk(f"r{i}", [(7 * step + i) % 256], lengths[i], blocks[i]) for i in range(rows)]
        kv_before = runner.kv_cache.clone()
        got = runner.compute_logits(SchedulerOutput(chunks))
        kv_fused = runner.kv_cache.clone()
        runner.kv_cache.copy_(kv_before)
        runner.fused = None
        try:
            want = runner.compute_logits(SchedulerOutput(chunks))
        finally:
            runner.fused = fused
        out.append((rows, got, want, kv_fused, runner.kv_cache.clone()))
        for i in range(rows):
            lengths[i] += 1
    return out


def test_few_row_steps_equal_the_modules(runner):
    packed = runner.model.model.layers[0].mlp.down_proj.packed
    few, on_panels = packed.native_rows, packed.panel is not None
    # the same kernels' code on both sides: the few-row kernel, or (AVX2 without AVX-512) the panels at every row
    assert runner.fused is not None and (runner.fused.panels[0][0] is not None) == on_panels
    assert runner.fused._model.few_rows == (0 if on_panels else few)
    if on_panels:  # one copy of the panels, the modules' and the step's
        assert runner.fused.panels[0][3] is packed.panel
    for rows, got, want, kv_fused, kv_modules in _decode_steps(runner, [1 + s % few for s in range(12)]):
        assert torch.equal(got, want), f"{rows} rows"  # the same kernels' code: bit for bit
        assert torch.equal(kv_fused, kv_modules)  # the same K/V written to the same slots


@pytest.mark.skipif(not decoder.amx_available(), reason="no AMX on this CPU: steps past the few-row kernel run the modules")
def test_amx_steps_match_the_modules(runner):
    assert runner.fused.max_rows == decoder.AMX_MAX_ROWS
    for rows, got, want, kv_fused, kv_modules in _decode_steps(runner, [5, 8, 16, 17, 33, 7, decoder.AMX_MAX_ROWS]):
        # AMX sums 32 inputs a tile as oneDNN's AMX kernel does; the last bf16 bit may still differ
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.02 * scale, f"{rows} rows"
        assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.9
        torch.testing.assert_close(kv_fused.float(), kv_modules.float(), rtol=0.02, atol=0.02)


@pytest.fixture
def panel_runner(runner, monkeypatch) -> ModelRunner:
    """The runner with its fused step's many-row linears on the panels (an AVX2 CPU without AVX-512: build picks
    them there without native bf16)."""
    if not panel.available():
        pytest.skip("no panel kernel in this build (AVX2 without AVX-512)")
    monkeypatch.setattr(runner, "fused", decoder.FusedDecoder(runner.model.decoder_weights(), library("decoder"),
                                                              panels=True))
    return runner


def test_panel_steps_match_the_modules(panel_runner):
    assert panel_runner.fused.max_rows == decoder.PANEL_MAX_ROWS
    assert panel_runner.fused._model.few_rows == 0  # every row on the panels, the LM head too
    same_code = panel_runner.model.model.layers[0].mlp.down_proj.packed.panel is not None  # the modules' plan too
    for rows, got, want, kv_fused, kv_modules in _decode_steps(panel_runner, [1, 2, 5, 8, 9, 13, 16, 17, 33, 7, 128]):
        if same_code:  # the same panels and kernels on both sides: bit for bit at every row count
            assert torch.equal(got, want) and torch.equal(kv_fused, kv_modules), f"{rows} rows"
        # float32 sums as the modules' float32 copies (or bf16 ones), in another order: a last bf16 bit may differ
        scale = want.abs().max().item()
        assert (got - want).abs().max().item() <= 0.02 * scale, f"{rows} rows"
        top = want.argmax(-1, keepdim=True)  # the same token, or one within the tolerance of it (a near tie)
        near = got.max(-1).values - got.gather(-1, top).squeeze(-1) <= 0.02 * scale
        assert ((got.argmax(-1) == top.squeeze(-1)) | near).all(), f"{rows} rows"
        torch.testing.assert_close(kv_fused.float(), kv_modules.float(), rtol=0.02, atol=0.02)


def test_panel_steps_steal_and_give_the_same_bits(panel_runner, monkeypatch):
    test_stolen_tasks_give_the_same_bits(panel_runner, monkeypatch)


def test_no_panels_past_the_memory_share(runner, monkeypatch):
    """4 bytes a parameter, as the linear plan counts its copies (the plain weights and the panels)."""
    weights = runner.model.decoder_weights()
    panel_bytes = sum(t.numel() * 4 for lw in weights.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down))
    monkeypatch.setattr(decoder, "bf16_support", lambda: "none")
    monkeypatch.setattr(decoder, "physical_memory", lambda: int(panel_bytes / decoder.COPY_MEMORY_FRACTION) + 1)
    assert decoder._panels_wanted(weights) == panel.available()
    monkeypatch.setattr(decoder, "physical_memory", lambda: int(panel_bytes / decoder.COPY_MEMORY_FRACTION) - 1)
    assert not decoder._panels_wanted(weights)
    monkeypatch.setattr(decoder, "physical_memory", lambda: 1 << 50)
    monkeypatch.setattr(decoder, "bf16_support", lambda: "native")  # bf16 matmuls of their own past the few rows
    assert not decoder._panels_wanted(weights)


def test_stolen_tasks_give_the_same_bits(runner, monkeypatch):
    """A thread that waits on a phase redoes the tasks still out and the first copy done is committed: with every
    wait stealing at once and one task's thread held until the step is a layer on (a preemption), logits and
    cache are those of a step without stealing, bit for bit, and tasks were stolen."""
    fused, threads = runner.fused, torch.get_num_threads()
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 256, (3 + i % 7,), generator=gen).tolist() for i in range(40)]
    blocks = {i: list(range(1 + i * 8, 1 + i * 8 + 8)) for i in range(40)}
    runner.compute_logits(SchedulerOutput([_chunk(f"r{i}", p, 0, blocks[i]) for i, p in enumerate(prompts)]))
    torch.set_num_threads(2)  # a second thread to steal, even on one core
    try:
        sizes = [r for r in (1, 3, 5, 17, 40) if r <= fused.max_rows]  # 17, 40 (AMX): tasks of 3 and 5 rows
        for step, rows in enumerate(sizes):
            chunks = [_chunk(f"r{i}", [(5 * step + i) % 256], len(prompts[i]) + step, blocks[i]) for i in range(rows)]
            before = runner.kv_cache.clone()
            monkeypatch.setattr(decoder, "STEAL_SPINS", -1)
            want = runner.compute_logits(SchedulerOutput(chunks))
            kv_want = runner.kv_cache.clone()
            runner.kv_cache.copy_(before)
            monkeypatch.setattr(decoder, "STEAL_SPINS", 0)
            per_task = -(-rows // decoder.ROW_TASKS)  # rows of a norm task
            fused.stall_task, stolen = -(-rows // per_task), fused.stolen  # layer 0's first qkv task
            got = runner.compute_logits(SchedulerOutput(chunks))
            assert torch.equal(got, want) and torch.equal(runner.kv_cache, kv_want), f"{rows} rows"
            assert fused.stolen > stolen, f"{rows} rows: nothing stolen"
    finally:
        torch.set_num_threads(threads)
        fused.stall_task = -1


def test_steps_it_does_not_take_run_the_modules(runner, monkeypatch):
    calls = []
    monkeypatch.setattr(runner.fused, "forward", lambda *a: calls.append(a))
    prompt = list(range(10, 20))
    runner.compute_logits(SchedulerOutput([_chunk("p", prompt, 0, [1, 2, 3])]))  # prefill
    rows = runner.fused.max_rows + 1  # too many rows
    runner.compute_logits(SchedulerOutput([_chunk(f"d{i}", [5], 3, [40 + i]) for i in range(rows)]))
    assert calls == []


def test_a_slot_outside_the_cache_is_refused(runner):
    fused = runner.fused
    ids, pos = torch.tensor([5]), torch.tensor([0])
    dec = runner._decode_batch([_chunk("x", [5], 0, [1])])
    before = runner.kv_cache.clone()
    with pytest.raises(ValueError, match="slot mapping out of bounds"):
        fused.forward(ids, pos, torch.tensor([runner.kv_cache[0, 0].numel()]), dec)
    rows = fused.max_rows + 1
    with pytest.raises(ValueError, match=f"1..{fused.max_rows}"):
        fused.forward(torch.tensor([5] * rows), torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long), dec)
    assert torch.equal(before, runner.kv_cache)


def test_token_ids_positions_and_block_ids_out_of_bounds_are_refused(runner):
    """The step gathers its embeddings and rotary rows itself and reads the cache through the block table: a token
    id past the vocabulary, a position past the rotary table or the row's blocks, or a block id past the cache is
    an error before anything is written."""
    fused = runner.fused
    assert fused.gather_x and fused.gather_rope  # Llama's plain lookups: the tables go to C
    vocab, positions = fused.weights.embed_table.shape[0], fused.weights.rope_tables[0].shape[0]
    before = runner.kv_cache.clone()
    slot = torch.tensor([BLOCK])  # block 1, offset 0
    with pytest.raises(IndexError, match="token id outside"):
        fused.forward(torch.tensor([vocab]), torch.tensor([0]), slot, runner._decode_batch([_chunk("x", [5], 0, [1])]))
    with pytest.raises(IndexError, match="token id outside"):
        fused.forward(torch.tensor([-1]), torch.tensor([0]), slot, runner._decode_batch([_chunk("x", [5], 0, [1])]))
    far = positions  # a block table long enough, the rotary table not
    table = [1] * (far // BLOCK + 1)
    with pytest.raises(ValueError, match="out of bounds"):
        fused.forward(torch.tensor([5]), torch.tensor([far]), slot,
                      runner._decode_batch([_chunk("x", [5], far, table)]))
    num_blocks = fused.num_blocks
    with pytest.raises(ValueError, match="out of bounds"):  # a block id past the cache among the row's blocks
        fused.forward(torch.tensor([5]), torch.tensor([BLOCK]), slot,
                      runner._decode_batch([_chunk("x", [5], BLOCK, [1, num_blocks])]))
    assert torch.equal(before, runner.kv_cache)


@pytest.mark.parametrize("arch", ["gemma", "gemma2", "mixtral", "qwen2-moe"])
def test_other_families_keep_their_modules(arch, tmp_path):
    build_other(arch, str(tmp_path))
    runner = _runner(str(tmp_path))
    assert runner.fused is None


def test_unsupported_shapes_are_not_fused():
    t = torch.zeros(4, dtype=torch.bfloat16)
    layer = decoder.LayerWeights(t, t, t, None, t, None, t, None, t, None, t, t, None)
    ok = decoder.DecoderWeights([layer], t, 1e-6, 4, 2, 16, 0.25, torch.nn.functional.silu, None, None, 4)
    assert decoder.supported(ok)
    import dataclasses
    assert not decoder.supported(dataclasses.replace(ok, head_dim=24))  # not a multiple of 16
    assert not decoder.supported(dataclasses.replace(ok, heads=64, kv_heads=2))  # group over 16
    assert not decoder.supported(dataclasses.replace(ok, final_norm=t.float()))  # bf16 only
    assert not decoder.supported(dataclasses.replace(ok, act=torch.nn.functional.gelu))  # no table is PyTorch's gelu


@pytest.mark.skipif(not decoder.amx_available(), reason="no AMX on this CPU")
@pytest.mark.parametrize("rows,out,inn,bias", [(1, 32, 32, False), (5, 48, 64, True), (16, 64, 128, False),
                                               (17, 96, 512, True), (33, 768, 512, False)])
def test_amx_linear_matches_float64_rounded_once(rows, out, inn, bias):
    # 48 / 96 outputs: a last chunk of one 16-output block; 17 / 33 rows: a second tile of padding rows
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, inn, generator=g).to(torch.bfloat16)
    w = (torch.randn(out, inn, generator=g) * 0.1).to(torch.bfloat16)
    b = torch.randn(out, generator=g).to(torch.bfloat16) if bias else None
    y = decoder.amx_linear(x, decoder.vnni_pack(w), out, b)
    exact = x.double() @ w.double().T + (b.double() if bias else 0)
    ulp = exact.abs().clamp_min(1e-3) * 2.0**-7  # float32 sums rounded to bf16 once: within one bf16 ulp
    assert ((y.double() - exact).abs() <= ulp + 1e-5 * inn**0.5).all()
    logits = decoder.amx_linear(x, decoder.vnni_pack(w), out, b, out_dtype=torch.float32)  # the LM head's form
    assert logits.dtype is torch.float32 and torch.equal(logits, y.float())


@pytest.mark.skipif(not decoder.amx_available(), reason="no AMX on this CPU")
@pytest.mark.parametrize("out", [4096, 4112])  # whole 32-output chunks, and a last chunk of 16
def test_amx_linear_argmax_is_the_samplers_greedy_token(out):
    """The LM head's argmax, taken chunk by chunk: the first maximum (ties across and inside chunks), and the
    first NaN where a row has one, as greedy_tokens gives."""
    g = torch.Generator().manual_seed(out)
    rows, inn = 40, 64
    x = torch.randn(rows, inn, generator=g).to(torch.bfloat16)
    w = (torch.randn(out, inn, generator=g) * 0.1).to(torch.bfloat16)
    w[[7, 9, 300, out - 1]] = w[3] * 4  # the same largest logit four times: in one chunk and in others
    b = torch.zeros(out, dtype=torch.bfloat16)
    for bias in (None, b):
        greedy = torch.empty(rows, dtype=torch.int64)
        logits = decoder.amx_linear(x, decoder.vnni_pack(w), out, bias, out_dtype=torch.float32, argmax=greedy)
        assert torch.equal(greedy, greedy_tokens(logits)) and torch.equal(greedy, logits.argmax(-1))
        alone = torch.empty(rows, dtype=torch.int64)  # no logits written: the argmax from the registers
        assert decoder.amx_linear(x, decoder.vnni_pack(w), out, bias, out_dtype=None, argmax=alone) is None
        assert torch.equal(alone, greedy)
        b[[2000, 50]] = float("nan")  # the second round: NaN logits at 50 and 2000 in every row
    assert (greedy == 50).all()


def test_fused_steps_hand_the_sampler_their_greedy_tokens(runner):
    if runner.fused.lm_head_amx is None and runner.fused.lm_head_panel is None:
        pytest.skip("no packed LM head: the sampler takes its own pass")
    gen = torch.Generator().manual_seed(9)
    rows = runner.fused.weights.max_rows + 3
    prompts = [torch.randint(0, 256, (4,), generator=gen).tolist() for _ in range(rows)]
    blocks = [[60 + 2 * i, 61 + 2 * i] for i in range(rows)]
    runner.compute_logits(SchedulerOutput([_chunk(f"g{i}", p, 0, blocks[i]) for i, p in enumerate(prompts)]))
    chunks = [_chunk(f"g{i}", [i + 1], 4, blocks[i]) for i in range(rows)]
    logits, _, greedy = runner._logits(runner._prepare(chunks), greedy_only=False)
    assert greedy is None  # a row may draw or be processed: the logits, the sampler takes its argmax
    none, _, greedy = runner._logits(runner._prepare(chunks), greedy_only=True)
    assert none is None and greedy is not None and torch.equal(greedy, greedy_tokens(logits))


def test_vnni_pack_layout():
    w = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).to(torch.bfloat16)
    packed = decoder.vnni_pack(w)  # [out / 16][in / 32][16 pairs][16 outputs][2]
    assert packed.shape == (2, 2, 16, 16, 2)
    for nb, kb, kk, n, e in ((0, 0, 0, 0, 1), (1, 1, 15, 15, 0), (1, 0, 3, 7, 1)):
        assert packed[nb, kb, kk, n, e] == w[nb * 16 + n, kb * 32 + 2 * kk + e]


def test_no_amx_copies_past_the_memory_share(runner, monkeypatch):
    weights = runner.model.decoder_weights()
    assert weights.lm_head is not None and weights.lm_head.shape[0] % 16 == 0  # vocab 256: packed too
    linear_bytes = sum(t.numel() * 2 for lw in weights.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down))
    linear_bytes += weights.lm_head.numel() * 2
    monkeypatch.setattr(decoder, "physical_memory", lambda: int(2 * linear_bytes / decoder.COPY_MEMORY_FRACTION) - 1)
    assert not decoder._amx_packable(weights)  # the packed and the plain copies would pass the share
    monkeypatch.setattr(decoder, "physical_memory", lambda: int(2 * linear_bytes / decoder.COPY_MEMORY_FRACTION) + 1)
    assert decoder._amx_packable(weights)


def test_few_row_steps_end_with_the_greedy_tokens(runner):
    """Up to the few-row kernel's rows a plain-greedy step takes the LM head itself: each row's first maximum of
    the logits the model's head computes (a tie, and the first NaN; the test models' 256 entries are one head
    task), no logits written."""
    _check_step_greedy_tokens(runner, ties=[7, 70, 200], nans=[250, 130])


@pytest.fixture(scope="module")
def wide_vocab_runner(tmp_path_factory) -> ModelRunner:
    """Llama with a 1,024-entry vocab: the step's LM head is four tasks of decoder.c's HEAD_CHUNK (256)."""
    folder = str(tmp_path_factory.mktemp("wide-vocab"))
    build_checkpoint("llama", folder, vocab_size=1024)
    return _runner(folder)


def test_the_greedy_tokens_merge_the_head_tasks_in_vocab_order(wide_vocab_runner):
    """Each head task's first maximum, merged after the step: a tie across tasks 0, 1 and 3 goes to the first
    index, and the first NaN across tasks 2 and 3 wins."""
    _check_step_greedy_tokens(wide_vocab_runner, ties=[7, 300, 800], nans=[900, 530])


def _check_step_greedy_tokens(runner: ModelRunner, ties: list[int], nans: list[int]) -> None:
    head = runner.fused.weights.lm_head
    if not runner.fused.greedy_rows(1):
        pytest.skip("no plain bf16 LM head: the model's head and the sampler")
    gen = torch.Generator().manual_seed(11)
    rows = runner.fused.weights.max_rows
    # past the step's own head, a packed copy of it gives the argmax (FusedDecoder.logits), no logits written
    wide = rows + 3 if runner.fused.lm_head_panel is not None or runner.fused.lm_head_amx is not None else rows
    prompts = [torch.randint(0, 256, (3,), generator=gen).tolist() for _ in range(wide)]
    blocks = [[90 + 2 * i, 91 + 2 * i] for i in range(wide)]
    runner.compute_logits(SchedulerOutput([_chunk(f"h{i}", p, 0, blocks[i]) for i, p in enumerate(prompts)]))
    saved = head.clone()
    try:
        for round_ in range(3):
            if round_ == 1:  # the same largest logit at every index of `ties`
                head[ties] = head[3] * 8
            if round_ == 2:  # NaN logits at every index of `nans` in every row: the first one
                head[nans] = float("nan")
            if runner.fused.lm_head_panel is not None:  # the step's copies of the head (none screened with NaN)
                runner.fused.lm_head_panel.copy_(panel.pack(head))
                runner.fused.lm_head_screen = decoder._screened(head, runner.fused.lm_head_panel)
            screened = runner.fused.lm_head_screen
            for screen_ in [screened, None] if screened is not None else [None]:  # few rows: screen.c, the step's head
                runner.fused.lm_head_screen = screen_
                for n in sorted({1, rows, wide}):
                    chunks = [_chunk(f"h{i}", [i + 1], 3, blocks[i]) for i in range(n)]
                    logits, _, none = runner._logits(runner._prepare(chunks), greedy_only=False)
                    missing, _, greedy = runner._logits(runner._prepare(chunks), greedy_only=True)
                    assert none is None and missing is None
                    assert torch.equal(greedy, greedy_tokens(logits)) and torch.equal(greedy, logits.argmax(-1))
                    if n <= rows:
                        assert runner.fused.head_in_step_for(n) == (screen_ is None)
            runner.fused.lm_head_screen = screened
            if round_ == 1:
                assert (greedy == min(ties)).any()  # the tie's first index won where it was the maximum
            if round_ == 2:
                assert (greedy == min(nans)).all()
    finally:
        head.copy_(saved)
        if runner.fused.lm_head_panel is not None:
            runner.fused.lm_head_panel.copy_(panel.pack(head))
            runner.fused.lm_head_screen = decoder._screened(head, runner.fused.lm_head_panel)
