"""ModelRunner: loading, dtype and cache set-up, batch building, ordering, sampling state; one LLMEngine run."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner, resolve_dtype
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=128, max_position_embeddings=128, initializer_range=0.1)
GREEDY = SamplingParams()


def _save_llama(folder: str, dtype: torch.dtype = torch.float32, **extra) -> "torch.nn.Module":
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TINY, **extra)
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval().to(dtype)
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("runner-llama"))
    return folder, _save_llama(folder)


def _config(folder: str, **kw) -> EngineConfig:
    base = dict(model_id=folder, dtype="float32", block_size=4, max_total_tokens=64, max_batch_total_tokens=512)
    base.update(kw)
    return EngineConfig(**base).resolve(128)


def _chunk(rid: str, tokens: list[int], start: int, blocks: list[int], sample: bool = True,
           params: SamplingParams = GREEDY, n_out: int = 0) -> ScheduledChunk:
    return ScheduledChunk(rid, tokens, start, blocks, sample, params, n_out)


def test_unknown_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPTNeoXForCausalLM"]}))
    with pytest.raises(ValueError, match="GPTNeoXForCausalLM.*LlamaForCausalLM"):
        ModelRunner(_config(str(tmp_path)), str(tmp_path))


@pytest.mark.parametrize(
    "requested, stored, expected",
    [("auto", "bfloat16", torch.bfloat16), ("auto", "float16", torch.bfloat16), ("auto", "float32", torch.float32),
     ("auto", None, torch.float32), ("float32", "bfloat16", torch.float32), ("bfloat16", "float32", torch.bfloat16)],
)
def test_resolve_dtype(requested, stored, expected):
    assert resolve_dtype(requested, {"torch_dtype": stored} if stored else {}) == expected


def test_auto_dtype_of_a_bfloat16_checkpoint(tmp_path):
    _save_llama(str(tmp_path), torch.bfloat16)
    runner = ModelRunner(_config(str(tmp_path), dtype="auto"), str(tmp_path))
    assert runner.dtype == torch.bfloat16 and runner.kv_cache.dtype == torch.bfloat16


def test_kv_cache_shape_and_threads(llama):
    folder, _ = llama
    before = torch.get_num_threads()
    try:
        runner = ModelRunner(_config(folder, num_threads=1), folder)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    # [K/V, layers, blocks, block_size, kv_heads, head_dim]
    assert runner.kv_cache.shape == (2, 2, 128, 4, 2, 8)
    # no GPU here: the CPU and the PyTorch op set (a GPU would get the Triton-language kernels)
    assert runner.device.type == "cpu" and runner.ops.name in ("cpu", "torch") and runner.kv_cache.device.type == "cpu"


def test_mixed_batch_logits_equal_separate_runs(llama):
    """A prompt, a continuation with history and decode rows in one step give the logits of separate steps."""
    folder, _ = llama
    gen = torch.Generator().manual_seed(0)
    a, b, c = (torch.randint(0, 128, (n,), generator=gen).tolist() for n in (9, 14, 6))
    alone, mixed = ModelRunner(_config(folder), folder), ModelRunner(_config(folder), folder)
    blocks = {"a": [5, 3, 9], "b": [7, 1, 2, 30], "c": [11, 12]}
    # history: b's first 8 tokens and c's first 5 (both runners)
    for r in (alone, mixed):
        r.compute_logits(SchedulerOutput([_chunk("b", b[:8], 0, blocks["b"], False), _chunk("c", c[:5], 0, blocks["c"], False)]))
    expected = torch.cat([
        alone.compute_logits(SchedulerOutput([_chunk("c", c[5:], 5, blocks["c"])])),
        alone.compute_logits(SchedulerOutput([_chunk("a", a, 0, blocks["a"])])),
        alone.compute_logits(SchedulerOutput([_chunk("b", b[8:], 8, blocks["b"])])),
    ])
    got = mixed.compute_logits(SchedulerOutput([
        _chunk("c", c[5:], 5, blocks["c"]), _chunk("a", a, 0, blocks["a"]), _chunk("b", b[8:], 8, blocks["b"]),
    ]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_execute_order_and_unsampled_chunks(llama):
    folder, model = llama
    runner = ModelRunner(_config(folder), folder)
    p, q = [3, 4, 5, 6, 7], [9, 8, 7]
    out = runner.execute(SchedulerOutput([
        _chunk("p", p, 0, [1, 2]), _chunk("x", [1, 2, 3, 4], 0, [3], sample=False), _chunk("q", q, 0, [4]),
    ]))
    assert out.request_ids == ["p", "q"]
    with torch.no_grad():
        ref = [int(model(torch.tensor([t])).logits[0, -1].argmax()) for t in (p, q)]
    assert out.sampled_token_ids == ref
    # then a decode row for q placed before p's decode: the order follows the chunks
    out2 = runner.execute(SchedulerOutput([_chunk("q", [ref[1]], 3, [4]), _chunk("p", [ref[0]], 5, [1, 2])]))
    assert out2.request_ids == ["q", "p"]
    assert runner.execute(SchedulerOutput()).request_ids == []


def test_seeded_sampling_independent_of_batch_and_released(llama):
    folder, _ = llama
    runner = ModelRunner(_config(folder), folder)
    seeded = SamplingParams(do_sample=True, seed=7, temperature=1.5)
    prompt = [5, 6, 7, 8]
    alone = runner.execute(SchedulerOutput([_chunk("s1", prompt, 0, [1], params=seeded)])).sampled_token_ids
    crowd = runner.execute(SchedulerOutput([
        _chunk("o", [1, 2, 3], 0, [2], params=SamplingParams(do_sample=True)),
        _chunk("s2", prompt, 0, [3], params=seeded),
    ])).sampled_token_ids
    assert alone[0] == crowd[1]
    runner.execute(SchedulerOutput(finished_request_ids=["s1", "s2"]))  # seeds are stateless: nothing to leak


def test_chunk_beyond_its_blocks_fails(llama):
    folder, _ = llama
    runner = ModelRunner(_config(folder), folder)
    with pytest.raises(ValueError, match="blocks"):
        runner.execute(SchedulerOutput([_chunk("a", [1] * 5, 0, [1])]))
    with pytest.raises(ValueError, match="request b: 9 positions but 2 blocks"):  # a decode step's row
        runner.execute(SchedulerOutput([_chunk("a", [1], 3, [1]), _chunk("b", [1], 8, [2, 3])]))


def test_a_decode_steps_batch_is_the_general_build(llama):
    folder, _ = llama
    runner = ModelRunner(_config(folder), folder)  # blocks of 4
    history = [1, 2, 3, 4, 5, 6]
    chunks = [_chunk("a", [5], 4, [1, 2], n_out=1), _chunk("b", [6], 9, [3, 4, 5], n_out=3),
              _chunk("c", [7], 0, [6])]
    chunks[1].history, chunks[1].num_prompt_tokens = history, 5
    fast, general = runner._prepare(chunks), runner._prepare_mixed(chunks)
    assert fast.context.slot_mapping.tolist() == [8, 21, 24] == general.context.slot_mapping.tolist()
    for name in ("input_ids", "positions", "sample_rows"):
        assert torch.equal(getattr(fast, name), getattr(general, name)), name
    fd, gd = fast.context.decode, general.context.decode
    assert fd.block_table.tolist() == [[1, 2, 0], [3, 4, 5], [6, 0, 0]] == gd.block_table.tolist()
    assert torch.equal(fd.positions, gd.positions) and (fd.num_rows, fd.block_size) == (gd.num_rows, gd.block_size)
    assert fast.sampling == general.sampling and fast.sampling[1].token_ids is history
    assert fast.drafts == general.drafts == [[], [], []]
    assert fast.context.prefills == [] and fast.context.prefill_meta is None and not fast.prompt_rows
    assert runner._ints([]).tolist() == [] and runner._ints([1, 2**40]).tolist() == [1, 2**40]


def _copy_checkpoint(src: str, dst: str, edit) -> None:
    os.makedirs(dst, exist_ok=True)
    with open(os.path.join(src, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def test_loader_rejects_missing_and_unknown_tensors(llama, tmp_path):
    folder, _ = llama
    missing, unknown = str(tmp_path / "missing"), str(tmp_path / "unknown")
    _copy_checkpoint(folder, missing, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    _copy_checkpoint(folder, unknown, lambda t: t.__setitem__("model.extra.weight", torch.zeros(2)))
    with pytest.raises(ValueError, match="qkv_proj.*shards.*k"):
        ModelRunner(_config(missing), missing)
    with pytest.raises(ValueError, match="model.extra.weight"):
        ModelRunner(_config(unknown), unknown)


def test_llm_engine_greedy_matches_transformers(tiny_llama_dir):
    """The whole engine (tokenizer, scheduler, runner) on the shared tiny checkpoint."""
    from transformers import AutoModelForCausalLM

    from tgi_backend.engine.engine import LLMEngine

    engine = LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="float32", max_batch_prefill_tokens=16,
                                    block_size=4), model_path=tiny_llama_dir)
    prompts = [engine.tokenize(t) for t in ("Hello there", "a b c d e f g h i j k l m n o p q r s t", "x")]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    got = engine.generate(prompts, params)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    for prompt, tokens in zip(prompts, got):
        ids = list(prompt)
        with torch.no_grad():
            for _ in range(6):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert tokens == ids[len(prompt):]


def test_sharded_checkpoint_and_stray_safetensors(llama, tmp_path):
    """Shards listed by model.safetensors.index.json load; a stray consolidated.safetensors is ignored."""
    folder, model = llama
    sharded = tmp_path / "sharded"
    model.save_pretrained(str(sharded), safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    save_file({"junk": torch.zeros(1)}, str(sharded / "consolidated.safetensors"))
    a = ModelRunner(_config(folder), folder)
    b = ModelRunner(_config(str(sharded)), str(sharded))
    for (name, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.equal(pa, pb), name


def test_args_from_older_config_keys():
    """Checkpoints saved before transformers 5 use rope_theta / rope_scaling and torch_dtype."""
    from tgi_backend.models.llama import llama_args, mistral_args, qwen2_args

    base = dict(vocab_size=10, hidden_size=64, intermediate_size=8, num_hidden_layers=3, num_attention_heads=4)
    llama31 = llama_args({**base, "rope_theta": 500000.0, "num_key_value_heads": 2, "tie_word_embeddings": True,
                          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert (llama31.rope_theta, llama31.rope_type, llama31.num_kv_heads, llama31.head_dim) == (500000.0, "llama3", 2, 16)
    assert llama31.tie_word_embeddings and llama31.window(0) is None
    assert llama_args({**base, "rope_scaling": {"type": "linear", "factor": 2.0}}).rope_type == "linear"
    assert mistral_args({**base, "sliding_window": 4096}).sliding_windows == (4096,) * 3
    assert mistral_args({**base, "sliding_window": None}).window(2) is None
    qwen = {**base, "sliding_window": 32, "max_window_layers": 1}
    assert qwen2_args({**qwen, "use_sliding_window": False}).window(2) is None
    assert qwen2_args({**qwen, "use_sliding_window": True}).sliding_windows == (None, 32, 32)
    assert qwen2_args(qwen).qkv_bias and not qwen2_args(qwen).o_bias


def test_block_copies_are_applied_before_the_forward(tiny_llama_dir):
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.model_runner import ModelRunner
    from tgi_backend.engine.scheduler_output import SchedulerOutput

    runner = ModelRunner(EngineConfig(model_id=tiny_llama_dir, max_batch_total_tokens=256, max_total_tokens=64),
                         tiny_llama_dir)
    runner.kv_cache[:, :, 3].normal_()
    runner.execute(SchedulerOutput(block_copies=[(3, 5)]))
    assert torch.equal(runner.kv_cache[:, :, 5], runner.kv_cache[:, :, 3])
