"""Multi-LoRA: logits equal peft's on the same random base and adapter; a mixed batch of adapters and the base
equals each run alone; load, use, unload, use again; unknown names and bad folders are clear errors."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.config import EngineConfig
from tgi_backend.engine.engine import LLMEngine
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.layers.linear import native_bf16
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.errors import ValidationError
from tgi_backend.weights.adapters import adapter_under_root, parse_lora_adapters, read_adapter

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, max_position_embeddings=256)
PROMPT = [5, 17, 3, 99, 42, 7, 1, 250, 31, 64, 8]
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # name -> LoraConfig arguments
    "all": dict(r=4, lora_alpha=8, target_modules=ALL),
    "rs": dict(r=8, lora_alpha=4, target_modules=ALL, use_rslora=True),
    "qv": dict(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "pattern": dict(r=4, lora_alpha=8, target_modules=["k_proj", "down_proj", "gate_proj"],
                    rank_pattern={"down_proj": 2}, alpha_pattern={"gate_proj": 32}),
}


@pytest.fixture(autouse=True)
def _own_rng():
    """Seeds set here must not change the random draws of tests that run later."""
    with torch.random.fork_rng():
        yield


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """A random base Llama (transformers) and random PEFT adapters saved as peft saves them."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tgi_backend.weights.demo import build_random_checkpoint

    root = tmp_path_factory.mktemp("lora")
    base_dir = build_random_checkpoint(str(root / "base"), arch="llama", seed=0, dtype="float32", **TINY)
    references = {}
    for i, (name, kwargs) in enumerate(ADAPTERS.items()):
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        torch.manual_seed(100 + i)
        model = get_peft_model(base, LoraConfig(init_lora_weights=False, **kwargs)).eval()
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.mul_(0.5)  # a delta the size of the weights, not larger
            references[name] = model(torch.tensor([PROMPT])).logits[0, -1].float()
        model.save_pretrained(str(root / "adapters" / name))
    with torch.no_grad():
        base = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        references[None] = base(torch.tensor([PROMPT])).logits[0, -1].float()
    return base_dir, str(root / "adapters"), references


def _spec(adapters_dir: str, names) -> str:
    return ",".join(f"{n}={adapters_dir}/{n}" for n in names)


def _runner(base_dir: str, **kw) -> ModelRunner:
    config = EngineConfig(model_id=base_dir, dtype="float32", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=512, **kw).resolve(256)
    return ModelRunner(config, base_dir)


def test_logits_equal_peft(lora_setup):
    base_dir, adapters_dir, references = lora_setup
    runner = _runner(base_dir, lora_adapters=_spec(adapters_dir, ADAPTERS))
    blocks = iter(range(0, 128, 3))
    for name, ref in references.items():
        chunk = ScheduledChunk(f"r-{name}", PROMPT, 0, [next(blocks) for _ in range(3)], True,
                               SamplingParams(adapter_id=name))
        logits = runner.compute_logits(SchedulerOutput([chunk]))[0]
        torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-4, msg=f"adapter {name}")
    assert not torch.allclose(references["all"], references[None], atol=1e-2)  # the adapters matter


def test_bfloat16_base_prepacked_with_adapters_follows_peft(lora_setup):
    """bf16: base linears run prepacked (oneDNN layout, where the CPU has native bf16) under the LoRA deltas."""
    base_dir, adapters_dir, references = lora_setup
    config = EngineConfig(model_id=base_dir, dtype="bfloat16", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=512, lora_adapters=_spec(adapters_dir, ADAPTERS)).resolve(256)
    runner = ModelRunner(config, base_dir)
    blocks = iter(range(0, 128, 3))
    for name, ref in references.items():
        chunk = ScheduledChunk(f"b-{name}", PROMPT, 0, [next(blocks) for _ in range(3)], True,
                               SamplingParams(adapter_id=name))
        logits = runner.compute_logits(SchedulerOutput([chunk]))[0].float()
        effect = (references["all"] - references[None]).norm()  # how far the strongest adapter moves the logits
        assert (logits - ref).norm() < 0.05 * effect, f"adapter {name}: bf16 drifts from peft"  # seen: 0.004-0.007
    if native_bf16():
        assert any(getattr(m, "packed", None) is not None for m in runner.model.modules())


def _engine(base_dir: str, **kw) -> LLMEngine:
    config = EngineConfig(model_id=base_dir, dtype="float32", block_size=4, max_total_tokens=64,
                          max_batch_total_tokens=1024, **kw)
    return LLMEngine(config, model_path=base_dir)


def _run(engine: LLMEngine, jobs: list[tuple[list[int], str | None]], max_new: int = 6) -> list[list[int]]:
    ids = []
    for i, (prompt, adapter) in enumerate(jobs):
        rid = f"j{i}-{len(engine.scheduler.requests)}-{adapter}-{id(jobs)}"
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True, adapter_id=adapter))
        ids.append(rid)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    return [out[rid] for rid in ids]


def test_mixed_batch_equals_each_alone(lora_setup):
    base_dir, adapters_dir, _ = lora_setup
    names = ["all", "rs", "qv"]
    engine = _engine(base_dir, lora_adapters=_spec(adapters_dir, names), enable_prefix_caching=False)
    jobs = [(PROMPT[: 5 + i], n) for i, n in enumerate(names + [None])]
    mixed = _run(engine, jobs)
    alone = [_run(engine, [job])[0] for job in jobs]
    assert mixed == alone
    assert len({tuple(m) for m in mixed}) > 1  # different adapters, different continuations


def test_load_use_unload_use_again(lora_setup, tmp_path):
    base_dir, adapters_dir, _ = lora_setup
    engine = _engine(base_dir, lora_root=str(tmp_path))  # LoRA on, nothing preloaded
    base = _run(engine, [(PROMPT, None)])[0]
    engine.load_adapter("a", f"{adapters_dir}/all")
    with_a = _run(engine, [(PROMPT, "a")])[0]
    assert with_a != base  # and the prefix cache, warm from the base run, was not reused for "a"
    assert with_a == _run(_engine(base_dir, lora_adapters=_spec(adapters_dir, ["all"])), [(PROMPT, "all")])[0]
    engine.unload_adapter("a")
    with pytest.raises(ValidationError, match="unknown adapter `a`"):
        engine.add_request("x", PROMPT, SamplingParams(adapter_id="a"))
    assert _run(engine, [(PROMPT, None)])[0] == base
    engine.load_adapter("a", f"{adapters_dir}/all")
    assert _run(engine, [(PROMPT, "a")])[0] == with_a


def test_adapters_load_on_first_use_from_the_root_with_lru_eviction(lora_setup):
    base_dir, adapters_dir, _ = lora_setup
    engine = _engine(base_dir, lora_root=adapters_dir, max_loras=1)
    first = _run(engine, [(PROMPT, "qv")])[0]
    assert set(engine.runner.lora.slots) == {"qv"}
    _run(engine, [(PROMPT, "rs")])
    assert set(engine.runner.lora.slots) == {"rs"}  # qv was idle: evicted
    assert _run(engine, [(PROMPT, "qv")])[0] == first
    engine.add_request("busy", PROMPT, SamplingParams(max_new_tokens=2, adapter_id="qv"))
    with pytest.raises(ValidationError, match="in use"):
        engine.add_request("other", PROMPT, SamplingParams(adapter_id="all"))
    for name in ("../base", "/etc", "nope"):
        with pytest.raises(ValidationError, match="unknown adapter"):
            engine.add_request(f"bad-{name}", PROMPT, SamplingParams(adapter_id=name))


def test_lora_off_and_bad_adapters(lora_setup, tmp_path):
    base_dir, adapters_dir, _ = lora_setup
    with pytest.raises(ValidationError, match="LoRA is off"):
        _engine(base_dir).add_request("x", PROMPT, SamplingParams(adapter_id="a"))
    with pytest.raises(ValueError, match="no adapter_config.json"):
        read_adapter(str(tmp_path))
    assert adapter_under_root(adapters_dir, "all") and adapter_under_root(adapters_dir, "../base") is None
    assert parse_lora_adapters("org/ad, b=/x/y") == [("org/ad", "org/ad"), ("b", "/x/y")]
    with pytest.raises(ValueError, match="given twice"):
        parse_lora_adapters("a=/x,a=/y")


def test_grouped_and_stacked_paths_equal_a_per_row_reference():
    from tgi_backend.layers.linear import QKVLinear
    from tgi_backend.layers.lora import LoraBatch, LoraLinear

    torch.manual_seed(0)
    base = QKVLinear(hidden=32, head_dim=8, num_heads=4, num_kv_heads=2)  # q 32, k 16, v 16
    base.weight.data.normal_()

    class Holder:
        batch = LoraBatch()

    layer = LoraLinear(base, {"q_proj": (0, 32), "k_proj": (32, 16), "v_proj": (48, 16)}, Holder)
    adapters = {0: {"q_proj": 4, "v_proj": 2}, 1: {"k_proj": 3}, 2: {"q_proj": 1, "k_proj": 2, "v_proj": 5}}
    pairs = {}
    for slot, ranks in adapters.items():
        pairs[slot] = {leaf: (torch.randn(r, 32), torch.randn(layer.shards[leaf][1], r)) for leaf, r in ranks.items()}
        layer.set_adapter(slot, pairs[slot], torch.float32)
    slots = [0, 0, 1, -1, 2, 2, 0, 1, -1]
    x = torch.randn(len(slots), 32)
    want = base(x)
    for row, slot in enumerate(slots):
        for leaf, (a, b) in pairs.get(slot, {}).items():
            off, size = layer.shards[leaf]
            want[row, off : off + size] += b @ (a @ x[row])
    Holder.batch = LoraBatch.from_slots(slots)  # every loaded adapter present: the stacked path
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    Holder.batch = LoraBatch.from_slots([s if s != 1 else -1 for s in slots])  # a subset: the grouped path
    for row, slot in enumerate(slots):
        if slot == 1:
            want[row] = base(x[row : row + 1])[0]
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)


def test_phi3_stored_packed_targets_equal_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=128, vocab_size=256, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    Phi3ForCausalLM(config).save_pretrained(str(tmp_path / "base"), safe_serialization=True)
    base = Phi3ForCausalLM.from_pretrained(str(tmp_path / "base"), torch_dtype=torch.float32).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"], init_lora_weights=False)
    model = get_peft_model(base, lora).eval()
    with torch.no_grad():
        want = model(torch.tensor([PROMPT])).logits[0, -1].float()
    model.save_pretrained(str(tmp_path / "ad"))
    runner = _runner(str(tmp_path / "base"), lora_adapters=f"ad={tmp_path}/ad")
    chunk = ScheduledChunk("r", PROMPT, 0, [0, 1, 2], True, SamplingParams(adapter_id="ad"))
    torch.testing.assert_close(runner.compute_logits(SchedulerOutput([chunk]))[0], want, rtol=1e-4, atol=1e-4)


def test_a_changed_or_removed_folder_under_the_root_is_read_again(lora_setup, tmp_path):
    import os
    import shutil

    base_dir, adapters_dir, _ = lora_setup
    shutil.copytree(f"{adapters_dir}/qv", tmp_path / "x")
    engine = _engine(base_dir, lora_root=str(tmp_path))
    first = _run(engine, [(PROMPT, "x")])[0]
    shutil.rmtree(tmp_path / "x")
    shutil.copytree(f"{adapters_dir}/all", tmp_path / "x")  # same name, other weights: a new version
    os.utime(tmp_path / "x" / "adapter_model.safetensors", ns=(1, 1))
    second = _run(engine, [(PROMPT, "x")])[0]
    assert second != first
    assert second == _run(_engine(base_dir, lora_adapters=_spec(adapters_dir, ["all"])), [(PROMPT, "all")])[0]
    shutil.rmtree(tmp_path / "x")
    with pytest.raises(ValidationError, match="unknown adapter `x`"):
        engine.add_request("gone", PROMPT, SamplingParams(adapter_id="x"))
    assert "x" not in engine.runner.lora.slots
