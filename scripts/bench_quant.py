#!/usr/bin/env python
"""Quantization benchmark (issue 6): decode tokens/s at batch 1 and 16, and prefill tokens/s of 4 x 512-token
prompts in one step (2,048 rows: where int8 / int4 leave their ops for a float32 GEMM), on a random ~250M-parameter
Llama (hidden 1024, 16 layers, 16/4 heads, intermediate 2816, vocab 32000), in-process engine, one run each:

    float32 | bfloat16 | int8 (--quantize eetq) | int4 (--quantize bitsandbytes-nf4, groups of 128)

with the model's weight memory and the process RSS. Each variant runs in its own process (clean RSS).
bfloat16 linears run prepacked for oneDNN here (tgi_backend.layers.linear.prepack); ratios are given against
both bfloat16 and float32.

    .venv/bin/python scripts/bench_quant.py [--new-tokens 32] [--prompt 32]

Writes bench-results/bench-quant-<time>.json and .md. The machine may be shared: figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEDIUM = dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
              intermediate_size=2816)
VOCAB = 32000
VARIANTS = {  # name -> EngineConfig overrides
    "float32": dict(dtype="float32"),
    "bfloat16": dict(dtype="bfloat16"),
    "int8": dict(dtype="float32", quantize="eetq"),
    "int4": dict(dtype="float32", quantize="bitsandbytes-nf4"),
}


def resolve_model() -> str:
    """The float32 random-weight medium Llama under the cache folder, built once."""
    from tgi_backend.weights import demo

    root = Path(os.environ.get("TGI_TRITON_CACHE", Path.home() / ".cache" / "tgi-triton"))
    out = root / "bench-llama-medium-f32-v1"
    if not (out / "config.json").exists():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        demo.build_random_checkpoint(str(tmp), arch="llama", seed=0, dtype="float32", vocab_size=VOCAB,
                                     max_position_embeddings=4096, **MEDIUM)
        os.replace(tmp, out)
    return str(out)


def rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def weight_mb(model) -> float:
    """Parameters, buffers and the prepacked weights (oneDNN layout, held outside the parameters)."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    for m in model.modules():
        packed = getattr(m, "packed", None)
        for t in packed.tensors() if hasattr(packed, "tensors") else ():
            tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values()) / 2**20


def make_engine(path: str, **overrides):
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine

    config = dict(model_id=path, max_total_tokens=PREFILL_LEN + 8, max_batch_total_tokens=8192,
                  enable_prefix_caching=False)
    return LLMEngine(EngineConfig(**{**config, **overrides}), model_path=path)


def decode_rate(engine, batch: int, prompt_len: int, new_tokens: int, adapters: list | None = None) -> float:
    """Tokens/s over steps where every row decodes (the prefill step is left out)."""
    from tgi_backend.engine.request import SamplingParams

    for i in range(batch):
        prompt = [(7 * i + 13 * j) % (VOCAB - 3) + 3 for j in range(prompt_len)]
        adapter = adapters[i % len(adapters)] if adapters else None
        engine.add_request(f"b{batch}-{i}-{time.monotonic_ns()}", prompt,
                           SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, adapter_id=adapter))
    rows, seconds = 0, 0.0
    while engine.has_unfinished_requests():
        decoding = engine.scheduler.num_running == batch and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        start = time.perf_counter()
        outs = engine.step()
        if decoding:
            seconds += time.perf_counter() - start
            rows += len(outs)
    return rows / seconds if seconds else 0.0


PREFILL_PROMPTS, PREFILL_LEN = 4, 512


def prefill_rate(engine) -> float:
    """Prompt tokens/s of PREFILL_PROMPTS prompts admitted together (one step within the default budget)."""
    from tgi_backend.engine.request import SamplingParams

    for i in range(PREFILL_PROMPTS):
        prompt = [(11 * i + 17 * j) % (VOCAB - 3) + 3 for j in range(PREFILL_LEN)]
        engine.add_request(f"p{i}-{time.monotonic_ns()}", prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        engine.step()
    return PREFILL_PROMPTS * PREFILL_LEN / (time.perf_counter() - start)


def run_variant(name: str, new_tokens: int, prompt_len: int) -> dict:
    import torch

    path = resolve_model()
    start = time.perf_counter()
    engine = make_engine(path, **VARIANTS[name])
    load_s = time.perf_counter() - start
    decode_rate(engine, 1, 8, 4)  # warm-up
    result = {"variant": name, "threads": torch.get_num_threads(), "load_s": round(load_s, 1),
              "weights_mb": round(weight_mb(engine.runner.model), 1), "rss_mb": round(rss_mb(), 1)}
    for batch in (1, 16):
        result[f"decode_tok_s_b{batch}"] = round(decode_rate(engine, batch, prompt_len, new_tokens), 1)
    prefill_rate(engine)  # warm-up: the first large step allocates the float32 buffers
    result["prefill_tok_s"] = round(prefill_rate(engine), 1)
    return result


def table(results: list[dict]) -> str:
    by = {r["variant"]: r for r in results}
    lines = ["| variant | weights MB | RSS MB | decode tok/s b1 | b16 | b1 vs bf16 | b1 vs fp32 | b16 vs bf16 | b16 vs fp32 "
             "| prefill tok/s | prefill vs bf16 |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ratios = [_ratio(r[f"decode_tok_s_b{b}"], by.get(peer, {}).get(f"decode_tok_s_b{b}"))
                  for b in (1, 16) for peer in ("bfloat16", "float32")]
        lines.append(f"| {r['variant']} | {r['weights_mb']} | {r['rss_mb']} | {r['decode_tok_s_b1']} | "
                     f"{r['decode_tok_s_b16']} | " + " | ".join(ratios) + f" | {r.get('prefill_tok_s', '-')} | "
                     + _ratio(r.get("prefill_tok_s"), by.get("bfloat16", {}).get("prefill_tok_s")) + " |")
    return "\n".join(lines)


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}x" if value is not None and base else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--variant", choices=sorted(VARIANTS), help="run one variant here (internal)")
    parser.add_argument("--only", nargs="*", choices=sorted(VARIANTS), default=list(VARIANTS))
    args = parser.parse_args()
    if args.variant:
        print("RESULT" + json.dumps(run_variant(args.variant, args.new_tokens, args.prompt)), flush=True)
        return
    resolve_model()  # build once, before the children race for it
    results = []
    for name in args.only:
        proc = subprocess.run([sys.executable, __file__, "--variant", name, "--new-tokens", str(args.new_tokens),
                               "--prompt", str(args.prompt)], capture_output=True, text=True)
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT")), None)
        if line is None:
            raise SystemExit(f"variant {name} failed:\n{proc.stderr[-3000:]}")
        results.append(json.loads(line[len("RESULT"):]))
        print(results[-1], flush=True)
    out_dir = Path(__file__).resolve().parents[1] / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = table(results)
    meta = {"model": "random Llama, hidden 1024, 16 layers, 16/4 heads, intermediate 2816, vocab 32000",
            "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "runs": 1, "aim": "int4 >= 2x bf16 at b1"}
    (out_dir / f"bench-quant-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out_dir / f"bench-quant-{stamp}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
