"""Greedy tokens of our engine (Scheduler + ModelRunner, all prompts together, chunked prefill, shared steps)
equal transformers' greedy `generate` run on each prompt alone, for each supported architecture."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.config import EngineConfig
from tgi_backend.engine.block_pool import BlockPool
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import Request, SamplingParams
from tgi_backend.engine.scheduler import Scheduler
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.layers import linear as linear_module

TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=256, max_position_embeddings=128, initializer_range=0.1,
)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    # head_dim != hidden / heads, biases, llama3 rope scaling
    "llama-variants": ("LlamaConfig", "LlamaForCausalLM", dict(
        head_dim=32, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    # layer 0 full attention, layer 1 a window of 8
    "qwen2-window": ("Qwen2Config", "Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=8,
                                                              max_window_layers=1)),
}
PROMPT_LENGTHS = [1, 2, 5, 8, 13, 21, 33, 40]
NEW_TOKENS = 12


def build_checkpoint(arch: str, folder: str, seed: int = 0, **overrides):
    import transformers

    config_cls, model_cls, extra = ARCHS[arch]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    config.architectures = [model_cls]
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    model.generation_config.eos_token_id = None  # never stop early
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp(request.param))
    return request.param, folder, build_checkpoint(request.param, folder)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(42)
    return [torch.randint(0, 256, (n,), generator=gen).tolist() for n in PROMPT_LENGTHS]


def reference_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
        )
    return out[0, len(prompt):].tolist()


def run_engine(runner: ModelRunner, config: EngineConfig, prompts, new_tokens: int = NEW_TOKENS):
    """Engine.step without the tokenizer: schedule, execute, update. Returns outputs and the scheduler."""
    scheduler = Scheduler(config, BlockPool(config.num_blocks))
    for i, p in enumerate(prompts):
        scheduler.add_request(Request(f"r{i}", list(p), SamplingParams(), max_new_tokens=new_tokens))
    results = {f"r{i}": [] for i in range(len(prompts))}
    kinds = set()
    for _ in range(1000):
        if not scheduler.has_unfinished_requests():
            break
        out = scheduler.schedule()
        kinds.update(_kind(c) for c in out.chunks)
        result = runner.execute(out)
        for rid, tok in zip(result.request_ids, result.sampled_token_ids):
            results[rid].append(tok)
        scheduler.forget(scheduler.update_from_output(out, result))
    return [results[f"r{i}"] for i in range(len(prompts))], scheduler, kinds


def _kind(c: ScheduledChunk) -> str:
    if len(c.token_ids) == 1 and c.start_pos > 0:
        return "decode"
    return "continuation" if c.start_pos > 0 else "prompt"


def _config(folder: str, pool_tokens: int) -> EngineConfig:
    return EngineConfig(
        model_id=folder, dtype="float32", block_size=4, max_total_tokens=64,
        max_batch_prefill_tokens=24, max_batch_total_tokens=pool_tokens,
    ).resolve(128)


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("llama-single"))
    return folder, build_checkpoint("llama", folder)


def test_greedy_parity_with_transformers(checkpoint, prompts):
    arch, folder, model = checkpoint
    config = _config(folder, 4096)
    ours, _, kinds = run_engine(ModelRunner(config, folder), config, prompts)
    # the step budget (24) forces chunked prefill, mixed with decode rows
    assert {"prompt", "continuation", "decode"} <= kinds
    for prompt, got in zip(prompts, ours):
        assert got == reference_greedy(model, prompt), f"{arch}: prompt of {len(prompt)} tokens"


def test_greedy_parity_under_preemption(llama_checkpoint, prompts):
    folder, model = llama_checkpoint
    config = _config(folder, 96)  # 24 blocks of 4 for 8 requests of up to 52 tokens
    ours, scheduler, _ = run_engine(ModelRunner(config, folder), config, prompts)
    assert scheduler.num_preemptions > 0
    for prompt, got in zip(prompts, ours):
        assert got == reference_greedy(model, prompt), f"prompt of {len(prompt)} tokens"


def test_mistral_window_matters(tmp_path, prompts):
    """Without the window the same weights give other tokens: the parity above really checks the window."""
    folder = str(tmp_path / "m")
    build_checkpoint("mistral", folder)
    config = _config(folder, 4096)
    ours, _, _ = run_engine(ModelRunner(config, folder), config, [prompts[-1]])
    no_window = ModelRunner(config, folder)
    for attn in no_window.model.attention_layers():
        attn.sliding_window = None
    theirs, _, _ = run_engine(no_window, config, [prompts[-1]])
    assert ours != theirs


@pytest.mark.parametrize("plan", ["auto", "native", "native-gemv", "emulated", "emulated-gemv", "no-copy", "plain"])
def test_bfloat16_logits_close_to_transformers(llama_checkpoint, prompts, plan, monkeypatch):
    """Prefill rows, then one-row decode steps, under each CPU plan for the linears (layers/linear.py)."""
    plans = {"native": linear_module.NATIVE_BF16, "native-gemv": linear_module.NATIVE_BF16_KERNEL,
             "emulated": linear_module.EMULATED_BF16,
             "emulated-gemv": linear_module.EMULATED_BF16_NATIVE, "no-copy": linear_module.EMULATED_BF16_NO_COPY,
             "plain": None}
    if plan in plans:
        if plans[plan] is not None and linear_module.bf16_support() == "none" and not (
                plan in ("emulated-gemv", "no-copy") and linear_module.gemv.avx2_tiles()):
            pytest.skip("oneDNN has no bf16 on this CPU")
        if plan in ("native-gemv", "emulated-gemv", "no-copy") and not linear_module.gemv.available():
            pytest.skip("no C compiler: the native linear did not build")
        monkeypatch.setattr(linear_module, "matmul_plan", lambda extra_bytes: plans[plan])
    folder, model = llama_checkpoint
    config = EngineConfig(model_id=folder, dtype="bfloat16", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=1024).resolve(128)
    runner = ModelRunner(config, folder)
    if plan in ("native", "native-gemv", "emulated", "emulated-gemv", "no-copy"):
        assert any(getattr(m, "packed", None) is not None for m in runner.model.modules())
    assert runner.kv_cache.dtype == torch.bfloat16
    assert next(runner.model.parameters()).dtype == torch.bfloat16
    chunks = []
    for i, p in enumerate(prompts[2:6]):
        chunks.append(ScheduledChunk(f"b{i}", p, 0, list(range(i * 16, i * 16 + 16)), True, SamplingParams()))
    logits = runner.compute_logits(SchedulerOutput(chunks)).float()
    with torch.no_grad():
        ref = torch.stack([model(torch.tensor([p])).logits[0, -1] for p in prompts[2:6]])
    scale = ref.abs().max().item()
    assert (logits - ref).abs().max().item() < 0.05 * scale
    assert (logits.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.5
    # one-row steps: each prompt's last token decoded alone over the blocks its prefix left
    for i, p in enumerate(prompts[2:6]):
        blocks = list(range(64 + i * 16, 64 + i * 16 + 16))
        runner.compute_logits(SchedulerOutput([ScheduledChunk(f"d{i}", p[:-1], 0, blocks, True, SamplingParams())]))
        step = runner.compute_logits(
            SchedulerOutput([ScheduledChunk(f"d{i}", p[-1:], len(p) - 1, blocks, True, SamplingParams())]))
        assert (step[0].float() - ref[i]).abs().max().item() < 0.05 * scale


def test_greedy_parity_with_prefix_cache_hits(llama_checkpoint):
    """Prompts sharing a long prefix, in two waves: the second wave starts from cached blocks (start_pos > 0)."""
    folder, model = llama_checkpoint
    gen = torch.Generator().manual_seed(7)
    prefix = torch.randint(0, 256, (21,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 256, (n,), generator=gen).tolist() for n in (1, 3, 9)]
    config = _config(folder, 4096)
    runner = ModelRunner(config, folder)
    scheduler = Scheduler(config, BlockPool(config.num_blocks))
    got: dict[str, list[int]] = {}

    def drain() -> None:
        while scheduler.has_unfinished_requests():
            out = scheduler.schedule()
            result = runner.execute(out)
            for rid, tok in zip(result.request_ids, result.sampled_token_ids):
                got.setdefault(rid, []).append(tok)
            scheduler.forget(scheduler.update_from_output(out, result))

    for wave in ([0], [1, 2]):
        for i in wave:
            scheduler.add_request(Request(f"p{i}", list(prompts[i]), SamplingParams(), max_new_tokens=NEW_TOKENS))
        drain()
    assert scheduler.num_cached_tokens >= 2 * 20  # both later prompts reused the prefix's full blocks
    for i, prompt in enumerate(prompts):
        assert got[f"p{i}"] == reference_greedy(model, prompt), f"prompt {i}"
