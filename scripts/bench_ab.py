#!/usr/bin/env python
"""Paired A/B of two engine configurations in one process (issue 7).

On a shared host whose speed drifts by +-20% from one run to the next, two runs of `scripts/bench` cannot tell
a 5% change from noise. Here both engines load the same checkpoint into one process, each holds `--rows`
decoding requests, and they take turns: a block of `--steps` decode steps on A, then a block on B (the order
flips every round), `--rounds` times. Each round's ratio B / A compares blocks measured a second apart, so the
drift cancels; the report gives the median ratio and its range.

    .venv/bin/python scripts/bench_ab.py --model small --rows 1 --b speculate=4
    .venv/bin/python scripts/bench_ab.py --model medium --rows 32 --b dtype=float32

--a / --b take EngineConfig fields as key=value, the names of tgi_llm's model parameters (A defaults to the
plain engine). --a-without / --b-without switch native CPU kernels off on that side once it is built
(NATIVE_PARTS: decode_attention, prefill_attention, rms_norm, rope_store, gemv, decoder, screen), which no config field does:

    .venv/bin/python scripts/bench_ab.py --model small --rows 4 --a-without gemv

--a-sources / --b-sources take a folder of changed kernel sources (as `bench_kernel_ab.py`'s --a / --b): that
side's fused decode step runs decoder.c built from the kernel tree with those files over it (a C change cannot
be loaded twice under one name), so a change to the step's kernels is measured against the tree in one process:

    git show HEAD~1:tgi_backend/kernels/cpu/panel.h > /tmp/old/panel.h
    .venv/bin/python scripts/bench_ab.py --model small --rows 32 --a-sources /tmp/old

Knobs read once per process (OMP_WAIT_POLICY, MALLOC_* and other environment variables) cannot be compared this
way: run `scripts/bench` alternately for those. Writes bench-results/bench-ab-<time>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]


def parse_overrides(items: Sequence[str]) -> dict[str, str]:
    """["speculate=4", "dtype=float32"] -> {"speculate": "4", "dtype": "float32"}."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"expected key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = value.strip()
    return out


@dataclass
class Side:
    name: str
    overrides: dict[str, str]
    without: Sequence[str] = ()
    sources: str | None = None  # a folder of kernel sources over the tree, for the fused step's decoder.c
    engine: Any = None
    tok_s: list[float] = field(default_factory=list)


@dataclass
class Summary:
    ratios: list[float]  # B / A per round, in round order

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    def to_json(self) -> dict[str, Any]:
        return {"ratios": [round(r, 4) for r in self.ratios], "median": round(self.median, 4),
                "min": round(min(self.ratios), 4), "max": round(max(self.ratios), 4)}


def summarize(a_tok_s: Sequence[float], b_tok_s: Sequence[float]) -> Summary:
    if len(a_tok_s) != len(b_tok_s) or not a_tok_s:
        raise ValueError("one rate per round and side, at least one round")
    return Summary([b / a for a, b in zip(a_tok_s, b_tok_s)])


def _without_gemv(engine: Any) -> None:
    """Linears back on oneDNN's bf16 layout (sharing their float32 copy; with no oneDNN bf16, F.linear's bf16 for
    the rows before the copy's), or plain where no copy was made."""
    import dataclasses

    from torch import nn

    from tgi_backend.layers import linear

    for module in engine.runner.model.modules():
        packed = getattr(module, "packed", None)
        if packed is None or not packed.native_rows:
            continue
        if packed.plain is not packed.small:  # native bf16: oneDNN's layout is there for the other rows
            packed.native_rows = 0
        elif packed.large is not None:
            bf16_only = dataclasses.replace(linear.EMULATED_BF16, fp32_rows=None)
            module.packed = (linear.prepack(packed.small, bf16_only, getattr(module, "bias", None))
                             or linear.PackedWeight(packed.dtype, packed.small, small_packed=False))  # AVX2 only
            module.packed.large, module.packed.large_bias = packed.large, packed.large_bias
            module.packed.large_rows = packed.large_rows
        else:
            module.packed, module.weight = None, nn.Parameter(packed.small, requires_grad=False)


def _without_op(**change: Any) -> Any:
    def switch(engine: Any) -> None:
        import dataclasses

        engine.runner.ops = dataclasses.replace(engine.runner.ops, **change)
    return switch


def _without_decode_attention(engine: Any) -> None:
    from tgi_backend.layers import attention

    _without_op(decode_attention=attention.decode_attention)(engine)


def _without_prefill_attention(engine: Any) -> None:
    from tgi_backend.layers import attention

    _without_op(prefill_attention=attention.prefill_segments_attention, prepare_prefill=lambda s, d: list(s))(engine)


def _without_screen(engine: Any) -> None:
    """Greedy LM heads past the fused step's rows on the panels (panel.linear's argmax), not screen.c."""
    if engine.runner.fused is not None:
        engine.runner.fused.lm_head_screen = None


# a native CPU kernel -> how an engine runs without it (its PyTorch path)
NATIVE_PARTS = {
    "decode_attention": _without_decode_attention,
    "prefill_attention": _without_prefill_attention,  # decode steps only here: scripts/bench's prefill for it
    "rms_norm": _without_op(norm_in_layers=False),
    "rope_store": _without_op(rope_store=None),
    "gemv": _without_gemv,
    "decoder": lambda engine: setattr(engine.runner, "fused", None),  # the model's modules, op by op
    "screen": _without_screen,
}


def switch_off(engine: Any, parts: Sequence[str]) -> None:
    unknown = sorted(set(parts) - set(NATIVE_PARTS))
    if unknown:
        raise ValueError(f"unknown native parts {unknown}; known: {sorted(NATIVE_PARTS)}")
    if parts and engine.runner.ops.name != "cpu":
        raise ValueError(f"the engine runs the {engine.runner.ops.name!r} op set: no native CPU kernels to switch off")
    for part in parts:
        NATIVE_PARTS[part](engine)


def use_sources(engine: Any, sources: str | None) -> None:
    """The engine's fused decode step on decoder.c built from the kernel tree with `sources`' files over it."""
    if not sources:
        return
    import tempfile

    from bench_kernel_ab import side_tree
    from tgi_backend.kernels import cpu

    if engine.runner.fused is None:
        raise ValueError("--a-sources / --b-sources: this engine has no fused decode step to rebuild")
    with tempfile.TemporaryDirectory() as tmp:  # the library stays loaded once its tree is gone
        engine.runner.fused.lib = cpu.load(side_tree(sources, Path(tmp) / "kernels") / "decoder.c", "decoder")


def tokens_needed(warmup: int, rounds: int, steps: int, speculate: int, decode_steps: int = 1) -> int:
    """New tokens a request may produce over the run, with room to spare: each step can emit 1 + speculate,
    or decode_steps (the prefill step emits one too, and the request must still run after the last block)."""
    return (warmup + rounds * steps + 2) * max(1 + speculate, decode_steps) + 8


def build(path: str, dtype: str, overrides: dict[str, str], prompt_tokens: int, new_tokens: int) -> Any:
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine

    values = {"model_id": path, "dtype": dtype, "max_total_tokens": str(prompt_tokens + new_tokens)}
    values.update(overrides)
    config = EngineConfig.from_strings(values)
    if config.extra:
        raise ValueError(f"not EngineConfig fields: {sorted(config.extra)}")
    return LLMEngine(config)


def start_rows(engine: Any, prompts: list[list[int]], warmup: int, tag: str) -> None:
    """Adds one request per prompt and steps until every one decodes, then `warmup` steps more."""
    from tgi_backend.engine.request import SamplingParams

    for i, prompt in enumerate(prompts):
        budget = engine.config.max_total_tokens - len(prompt)
        engine.add_request(f"{tag}-{i}", prompt, SamplingParams(max_new_tokens=budget, ignore_eos=True))
    while not all(r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running) or (
        engine.scheduler.num_running < len(prompts)
    ):
        engine.step()
    for _ in range(warmup):
        engine.step()


def timed_block(engine: Any, steps: int, rows: int) -> float:
    """Decode tokens/s over `steps` steps; raises if a request ended (the batch would no longer be `rows`)."""
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
        for out in engine.step():
            tokens += len(out.new_token_ids)
    seconds = time.perf_counter() - start
    if engine.scheduler.num_running < rows:
        raise RuntimeError("a request finished during the run: raise max_total_tokens or lower --rounds")
    return tokens / seconds


def run(path: str, a: dict[str, str], b: dict[str, str], rows: int = 1, prompt_tokens: int = 128,
        steps: int = 20, rounds: int = 10, warmup: int = 3, dtype: str = "bfloat16",
        a_without: Sequence[str] = (), b_without: Sequence[str] = (), a_sources: str | None = None,
        b_sources: str | None = None) -> dict[str, Any]:
    from tgi_backend.config import EngineConfig

    sides = [Side("A", a, a_without, a_sources), Side("B", b, b_without, b_sources)]
    for side in sides:
        config = EngineConfig.from_strings({"model_id": path, **side.overrides})
        side.engine = build(path, dtype, side.overrides, prompt_tokens,
                            tokens_needed(warmup, rounds, steps, config.speculate, config.decode_steps))
        switch_off(side.engine, side.without)
        use_sources(side.engine, side.sources)
    from bench_serving import make_prompts

    # the suite's random prompts, the same for both sides: distinct rows, no prefix-cache hits between them
    prompts = make_prompts(sides[0].engine.runner.model.args.vocab_size, rows, prompt_tokens)
    for side in sides:
        start_rows(side.engine, prompts, warmup, side.name)
    for r in range(rounds):
        for side in sides if r % 2 == 0 else sides[::-1]:  # ABBA: neither side always runs first
            side.tok_s.append(timed_block(side.engine, steps, rows))
    summary = summarize(sides[0].tok_s, sides[1].tok_s)
    return {
        "model": path, "dtype": dtype, "rows": rows, "prompt_tokens": prompt_tokens, "steps": steps,
        "rounds": rounds, "a": a, "b": b, "a_without": list(a_without), "b_without": list(b_without),
        "a_sources": a_sources, "b_sources": b_sources,
        "a_tok_s": [round(x, 2) for x in sides[0].tok_s], "b_tok_s": [round(x, 2) for x in sides[1].tok_s],
        "b_over_a": summary.to_json(),
    }


def markdown(result: dict[str, Any]) -> str:
    def label(overrides: dict[str, str], without: Sequence[str], sources: str | None = None) -> str:
        parts = [f"{k}={v}" for k, v in overrides.items()] + [f"without {p}" for p in without]
        parts += [f"kernels from {sources}"] if sources else []
        return ", ".join(parts) or "defaults"

    def row(side: str) -> str:
        key = side.lower()
        config = label(result[key], result.get(f"{key}_without", []), result.get(f"{key}_sources"))
        return f"| {side} | {config} | {statistics.median(result[f'{key}_tok_s']):.1f} |"

    s = result["b_over_a"]
    return "\n".join([
        "| side | config | decode tok/s per round (median) |",
        "|---|---|---|",
        row("A"),
        row("B"),
        "",
        f"B / A over {result['rounds']} rounds of {result['steps']} steps, {result['rows']} rows: "
        f"median {s['median']:.3f} (min {s['min']:.3f}, max {s['max']:.3f})",
    ])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", help="small, medium, demo or a checkpoint folder")
    p.add_argument("--a", nargs="*", default=[], metavar="KEY=VALUE", help="EngineConfig overrides of A")
    p.add_argument("--b", nargs="*", default=[], metavar="KEY=VALUE", help="EngineConfig overrides of B")
    p.add_argument("--a-without", nargs="*", default=[], metavar="KERNEL", help="native kernels A runs without")
    p.add_argument("--b-without", nargs="*", default=[], metavar="KERNEL", help="native kernels B runs without")
    p.add_argument("--a-sources", metavar="DIR", help="kernel sources over the tree for A's fused decode step")
    p.add_argument("--b-sources", metavar="DIR", help="the same for B")
    p.add_argument("--rows", type=int, default=1, help="decoding requests per engine")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="decode steps per block")
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--out", default=str(HERE.parent / "bench-results"))
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench_serving import resolve_model

    result = run(resolve_model(args.model), parse_overrides(args.a), parse_overrides(args.b), rows=args.rows,
                 prompt_tokens=args.prompt_tokens, steps=args.steps, rounds=args.rounds, warmup=args.warmup,
                 dtype=args.dtype, a_without=args.a_without, b_without=args.b_without, a_sources=args.a_sources,
                 b_sources=args.b_sources)
    result["model_name"] = args.model
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    md = markdown(result)
    (out / f"bench-ab-{stamp}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"bench-ab-{stamp}.md").write_text(md + "\n")
    print(json.dumps(result))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
