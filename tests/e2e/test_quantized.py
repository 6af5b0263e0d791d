"""A GPTQ-quantized tiny Llama with LoRA adapters through the real tritonserver: streamed greedy tokens equal
the in-process engine's for the base, a preloaded adapter (`lora_name`) and an adapter loaded on first use
from --lora-root (`adapter_id`); an unknown adapter is a clear error. Its own module-scoped server: the
session server serves a plain float model that other tests rely on."""
from __future__ import annotations

import pytest

from client.grpc_client import InferenceServerException, TGITritonClient

pytestmark = pytest.mark.e2e
PROMPT = "Quantized weights and adapters"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def quantized_setup(tiny_llama_dir, tmp_path_factory):
    """(gptq checkpoint, lora root): adapters made by peft on the float twin of the same base."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    from tgi_backend.layers.quantization.checkpoint import quantize_checkpoint

    work = tmp_path_factory.mktemp("e2e-quantized")
    gptq = quantize_checkpoint(tiny_llama_dir, str(work / "gptq"), "gptq", bits=4, group_size=32, desc_act=True)
    targets = {"a": ["q_proj", "v_proj", "down_proj"], "b": ["k_proj", "o_proj", "gate_proj", "up_proj"]}
    for seed, (name, modules) in enumerate(targets.items()):
        import torch

        torch.manual_seed(seed)
        base = LlamaForCausalLM.from_pretrained(tiny_llama_dir, torch_dtype=torch.float32)
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=modules, init_lora_weights=False))
        model.save_pretrained(str(work / "adapters" / name))
    return gptq, str(work / "adapters")


@pytest.fixture(scope="module")
def quantized_server(quantized_setup, launch_server, tmp_path_factory):
    gptq, root = quantized_setup
    start, stop = launch_server
    srv = start(gptq, tmp_path_factory.mktemp("e2e-quantized-server"),
                ("--lora-adapters", f"a={root}/a", "--lora-root", root))
    yield srv
    stop(srv)


def test_quantized_model_and_adapters_equal_in_process(quantized_setup, quantized_server):
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.engine.request import SamplingParams

    gptq, root = quantized_setup
    engine = LLMEngine(EngineConfig(model_id=gptq, dtype="float32", max_total_tokens=512,
                                    lora_adapters=f"a={root}/a", lora_root=root), model_path=gptq)
    assert type(engine.runner.model.model.layers[0].mlp.down_proj.base).__name__ == "GPTQLinear"
    prompt = engine.tokenize(PROMPT)
    client = TGITritonClient(quantized_server.grpc_url)
    outputs = {}
    for adapter, key in ((None, None), ("a", "lora_name"), ("b", "adapter_id")):
        want = engine.generate([prompt], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True,
                                                        adapter_id=adapter))[0]
        params = {"ignore_eos": True, "temperature": 0, **({key: adapter} if key else {})}
        got = client.generate(PROMPT, max_tokens=NEW_TOKENS, sampling_parameters=params)
        assert got.token_ids == want, adapter
        outputs[adapter] = tuple(got.token_ids)
    assert len(set(outputs.values())) == 3  # each adapter changes the continuation


def test_unknown_adapter_is_a_validation_error(quantized_server):
    client = TGITritonClient(quantized_server.grpc_url)
    with pytest.raises(InferenceServerException, match="unknown adapter `nope`"):
        client.generate(PROMPT, max_tokens=2, sampling_parameters={"adapter_id": "nope"})
    assert len(client.generate(PROMPT, max_tokens=2).token_ids) == 2  # and the server still serves


def test_http_generate_takes_adapter_id_as_a_request_parameter(quantized_server):
    import json

    client = TGITritonClient(quantized_server.grpc_url)
    want = client.generate(PROMPT, max_tokens=6, sampling_parameters={"adapter_id": "b", "ignore_eos": True}).token_ids
    body = {"text_input": PROMPT, "max_tokens": 6, "parameters": {"adapter_id": "b", "ignore_eos": True}}
    status, text = quantized_server.post("/v2/models/tgi_llm/generate", body)
    assert status == 200, text
    ids = json.loads(text)["output_ids"]
    assert (ids if isinstance(ids, list) else [ids]) == want
    status, text = quantized_server.post("/v2/models/tgi_llm/generate", {**body, "parameters": {"adapter_id": "zz"}})
    assert status == 400 and "unknown adapter `zz`" in text
