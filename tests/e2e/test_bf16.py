"""The CPU's fast path through the real tritonserver: in bf16 the decode steps run the fused native decoder (one
row: the LM head inside the step; many rows: the AMX linears where the CPU has them). One stream's greedy
tokens (the server's decode steps several at a time, --decode-steps' default) equal the in-process engine's one
step at a time; concurrent streams all finish whole. Its own module-scoped server: the
session server serves the float32 model other tests rely on."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from client.grpc_client import TGITritonClient

pytestmark = pytest.mark.e2e
PROMPT = "The fused decoder through Triton"
NEW_TOKENS = 16
STREAMS = 12  # past the few-row kernel's rows (4 with native bf16, 8 where it is emulated)


@pytest.fixture(scope="module")
def bf16_server(tiny_llama_dir, launch_server, tmp_path_factory):
    start, stop = launch_server
    srv = start(tiny_llama_dir, tmp_path_factory.mktemp("e2e-bf16-server"), ("--dtype", "bfloat16", "--no-frontend"))
    yield srv
    stop(srv)


def test_one_stream_equals_the_in_process_fused_engine(tiny_llama_dir, bf16_server):
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.engine.request import SamplingParams

    engine = LLMEngine(EngineConfig(model_id=tiny_llama_dir, dtype="bfloat16", max_total_tokens=512, decode_steps=1))
    if engine.runner.fused is None or not engine.runner.fused.greedy_rows(1):
        pytest.skip("no fused decoder on this CPU (no C compiler or no native bf16 plan)")
    want = engine.generate([engine.tokenize(PROMPT)], SamplingParams(max_new_tokens=NEW_TOKENS, ignore_eos=True))[0]
    client = TGITritonClient(bf16_server.grpc_url)
    got = client.generate(PROMPT, max_tokens=NEW_TOKENS, sampling_parameters={"ignore_eos": True})
    assert got.token_ids == want
    maps = "".join(Path(f"/proc/{pid}/maps").read_text() for pid in bf16_server.stub_pids())
    assert "/decoder-" in maps  # the server's engine runs the fused decoder's library too


def test_concurrent_streams_finish_whole(bf16_server):
    def one(i: int) -> list[int]:
        client = TGITritonClient(bf16_server.grpc_url)
        return client.generate(f"{PROMPT} {i}", max_tokens=NEW_TOKENS, sampling_parameters={"ignore_eos": True}).token_ids

    with ThreadPoolExecutor(STREAMS) as pool:
        outputs = list(pool.map(one, range(STREAMS)))
    assert [len(ids) for ids in outputs] == [NEW_TOKENS] * STREAMS
