"""The benchmark's raw-protobuf gRPC load (scripts/bench_serving.py) against the shared server: every token of
every request counted, as the in-process engine counts them."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench_serving  # noqa: E402


def test_raw_grpc_load_counts_every_token(server, tiny_llama_dir):
    load = bench_serving.TritonProcess(tiny_llama_dir, "float32")
    load.grpc = int(server.grpc_url.rsplit(":", 1)[1])
    prompts = bench_serving.make_prompts(200, 3, 6)
    served = load.run_load(prompts, 5)
    assert served.output_tokens == 15 and served.seconds > 0
    assert len(served.ttft_ms) == 3 and len(served.itl_ms) == 3 * 4
    engine = bench_serving.make_engine(tiny_llama_dir, "float32")
    for _ in range(2):  # one engine serves several runs (fresh request ids)
        assert bench_serving.run_engine(engine, prompts, 5).output_tokens == 15
