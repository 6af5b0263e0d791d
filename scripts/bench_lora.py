#!/usr/bin/env python
"""Multi-LoRA benchmark (issue 6): decode tokens/s of a batch whose rows use 4 different adapters vs the same
batch on the base model, on the random ~250M-parameter Llama (see bench_quant.py), float32, in-process, one run:

    base (LoRA off) | base rows with LoRA on | 4 adapters mixed (rank 16 on q/k/v/o/gate/up/down)

at batch 4 and 16. Adapters are random PEFT folders written here. Aim: mixed >= 0.8x base.

    .venv/bin/python scripts/bench_lora.py [--new-tokens 32] [--rank 16]

Writes bench-results/bench-lora-<time>.json and .md. The machine may be shared: figures are noisy.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quant import MEDIUM, decode_rate, make_engine, resolve_model  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_adapter(folder: Path, rank: int, seed: int) -> str:
    """A random PEFT LoRA folder for the medium Llama (B scaled small: a realistic delta)."""
    import torch
    from safetensors.torch import save_file

    h, inter, layers = MEDIUM["hidden_size"], MEDIUM["intermediate_size"], MEDIUM["num_hidden_layers"]
    kv = h // MEDIUM["num_attention_heads"] * MEDIUM["num_key_value_heads"]
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h),
              "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for name, (n_in, n_out) in shapes.items():
            part = "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            key = f"base_model.model.model.layers.{i}.{part}.{name}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, n_in, generator=g) / n_in**0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(n_out, rank, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS),
              "bias": "none", "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return str(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    args = parser.parse_args()
    path = resolve_model()
    names = ["a0", "a1", "a2", "a3"]
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec = ",".join(f"{n}={write_adapter(Path(tmp) / n, args.rank, i)}" for i, n in enumerate(names))
        runs = (("base (LoRA off)", {}, None), ("base rows, LoRA on", {"lora_adapters": spec}, None),
                ("4 adapters mixed", {"lora_adapters": spec}, names))
        for label, overrides, adapters in runs:
            engine = make_engine(path, dtype="float32", **overrides)
            decode_rate(engine, 1, 8, 4)  # warm-up
            results[label] = {f"b{b}": round(decode_rate(engine, b, args.prompt, args.new_tokens, adapters), 1)
                              for b in (4, 16)}
            print(label, results[label], flush=True)
            del engine
    base = results["base (LoRA off)"]
    lines = ["| batch | base tok/s | base rows, LoRA on | 4 adapters mixed | mixed / base |", "|---|---|---|---|---|"]
    for b in ("b4", "b16"):
        mixed = results["4 adapters mixed"][b]
        lines.append(f"| {b[1:]} | {base[b]} | {results['base rows, LoRA on'][b]} | {mixed} | "
                     f"{mixed / base[b]:.2f}x |")
    md = "\n".join(lines)
    out_dir = Path(__file__).resolve().parents[1] / "bench-results"
    out_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"model": "random Llama medium (bench_quant.py), float32", "rank": args.rank, "targets": TARGETS,
            "prompt_tokens": args.prompt, "new_tokens": args.new_tokens, "runs": 1, "aim": "mixed >= 0.8x base"}
    (out_dir / f"bench-lora-{stamp}.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (out_dir / f"bench-lora-{stamp}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
