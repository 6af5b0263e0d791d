"""A tiny Mixtral (mixture of experts) served through the real tritonserver: one streaming gRPC request
equals the in-process engine's greedy output. Its own server (the session one serves a Llama), module-scoped."""
from __future__ import annotations

import pytest

from client.grpc_client import TGITritonClient

pytestmark = pytest.mark.e2e
PROMPT = "The experts of a mixture"
NEW_TOKENS = 16
TINY_MIXTRAL = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
    num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=512,
)


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory) -> str:
    from tgi_backend.weights.demo import build_random_checkpoint

    out = str(tmp_path_factory.mktemp("tiny-mixtral"))
    return build_random_checkpoint(out, arch="mixtral", seed=0, dtype="float32", **TINY_MIXTRAL)


@pytest.fixture(scope="module")
def mixtral_server(mixtral_dir, launch_server, tmp_path_factory):
    start, stop = launch_server
    srv = start(mixtral_dir, tmp_path_factory.mktemp("e2e-mixtral"))
    yield srv
    stop(srv)


def test_streamed_mixtral_equals_in_process_greedy(mixtral_dir, mixtral_server):
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.engine.request import SamplingParams

    engine = LLMEngine(EngineConfig(model_id=mixtral_dir, dtype="float32", max_total_tokens=512),
                       model_path=mixtral_dir)
    assert type(engine.runner.model).__name__ == "MixtralForCausalLM"
    want = engine.generate([engine.tokenize(PROMPT)], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0]

    client = TGITritonClient(mixtral_server.grpc_url)
    deltas = list(client.generate_stream(PROMPT, max_tokens=NEW_TOKENS,
                                         sampling_parameters={"ignore_eos": True, "temperature": 0}))
    assert len(deltas) > 1  # streamed, token by token
    assert [t for d in deltas for t in d.token_ids] == want
    assert deltas[-1].finish_reason == "length"
    assert "".join(d.text for d in deltas) == engine.tokenizer.decode(want, skip_special_tokens=True)
