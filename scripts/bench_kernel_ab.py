#!/usr/bin/env python
"""Paired A/B of two versions of the native decode-attention kernel in one process (issue 7).

`bench_ab.py` compares engine configurations; a change to a C kernel's source cannot be loaded twice under one
name, and two processes run a second apart on this shared host drift by +-20%. Here each side is the kernel
tree (`tgi_backend/kernels/cpu`) with the files of a folder copied over it (`--a` / `--b`; none: the tree as it
is), built into its own library; both run `paged_decode` on the same caches in turns (ABBA), and the report
gives the median ratio of their times and its range.

    git show HEAD~1:tgi_backend/kernels/cpu/paged_decode_avx2.h > /tmp/old/paged_decode_avx2.h
    .venv/bin/python scripts/bench_kernel_ab.py --a /tmp/old --rows 128 --ctx 192 --layers 8

The caches hold `--layers` layers of the small model's shape by default (8 heads, 2 KV heads, head dim 64),
blocks scattered as a long-running server has them. Writes bench-results/bench-kernel-ab-<time>.json/.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent)]
KERNELS = HERE.parent / "tgi_backend" / "kernels" / "cpu"


def side_tree(overrides: str | None, into: Path) -> Path:
    """The kernel sources with the files of `overrides` (a folder, or None) copied over them, in `into`."""
    shutil.copytree(KERNELS, into, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    if overrides:
        files = [f for f in Path(overrides).iterdir() if f.is_file()]
        if not files:
            raise ValueError(f"{overrides}: no files to put over the kernel sources")
        for f in files:
            shutil.copy(f, into / f.name)
    return into


def load_op(tree: Path) -> Callable[..., int]:
    """paged_decode from the library built out of `tree`."""
    from tgi_backend.kernels import cpu

    return cpu.load(tree / "paged_decode.c", "paged_decode").paged_decode  # the kernel cache, keyed by the text


def run(a: str | None, b: str | None, rows: int, ctx: int, layers: int, rounds: int = 40, heads: int = 8,
        kv_heads: int = 2, dim: int = 64, block: int = 16, threads: int = 2) -> dict[str, Any]:
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        ops = [load_op(side_tree(side, Path(tmp) / name)) for name, side in (("a", a), ("b", b))]
        gen = torch.Generator().manual_seed(0)
        width = ctx // block + 1
        blocks = rows * width + 1
        table = (torch.randperm(blocks - 1, generator=gen) + 1)[: rows * width].view(rows, width).contiguous()
        caches = [tuple(torch.randn(blocks, block, kv_heads, dim, generator=gen).bfloat16() for _ in range(2))
                  for _ in range(layers)]
        positions = torch.full((rows,), ctx - 1, dtype=torch.long)
        q = torch.randn(rows, heads, dim, generator=gen).bfloat16()
        out = torch.empty_like(q)

        def step(op: Callable[..., int]) -> float:
            start = time.perf_counter()
            for k, v in caches:
                status = op(q.data_ptr(), q.stride(0), k.data_ptr(), v.data_ptr(), table.data_ptr(), table.stride(0),
                            positions.data_ptr(), out.data_ptr(), rows, heads, kv_heads, dim, block, 0,
                            dim ** -0.5, threads, width * block, 1)
                if status != 0:
                    raise RuntimeError(f"paged_decode returned {status}")
            return time.perf_counter() - start

        times: tuple[list[float], list[float]] = ([], [])
        step(ops[0]), step(ops[1])  # warm
        for r in range(rounds):
            for i in ((0, 1) if r % 2 == 0 else (1, 0)):  # ABBA: neither side always first
                times[i].append(step(ops[i]))
    ratios = [ta / tb for ta, tb in zip(*times)]
    return {"a": a, "b": b, "rows": rows, "ctx": ctx, "layers": layers, "rounds": rounds,
            "shape": {"heads": heads, "kv_heads": kv_heads, "dim": dim, "block": block, "threads": threads},
            "a_ms": round(statistics.median(times[0]) * 1e3, 3), "b_ms": round(statistics.median(times[1]) * 1e3, 3),
            "b_speed": {"median": round(statistics.median(ratios), 4), "min": round(min(ratios), 4),
                        "max": round(max(ratios), 4)}}


def markdown(result: dict[str, Any]) -> str:
    s = result["b_speed"]
    return "\n".join([
        "| side | sources | ms for the layers (median) |",
        "|---|---|---|",
        f"| A | {result['a'] or 'the tree'} | {result['a_ms']} |",
        f"| B | {result['b'] or 'the tree'} | {result['b_ms']} |",
        "",
        f"B's speed against A over {result['rounds']} rounds, {result['rows']} rows of {result['ctx']} keys, "
        f"{result['layers']} layers: median {s['median']:.3f}x (min {s['min']:.3f}, max {s['max']:.3f})",
    ])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--a", help="folder of files put over the kernel sources for A (default: the tree)")
    p.add_argument("--b", help="the same for B (default: the tree)")
    p.add_argument("--rows", type=int, default=128)
    p.add_argument("--ctx", type=int, default=192, help="keys each row attends to")
    p.add_argument("--layers", type=int, default=8, help="layers of caches (8 of the small model: past L3)")
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--out", default=str(HERE.parent / "bench-results"))
    args = p.parse_args(argv)
    if not (args.a or args.b):
        p.error("give --a or --b (a folder of changed sources), or both")
    result = run(args.a, args.b, args.rows, args.ctx, args.layers, args.rounds)
    table = markdown(result)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-kernel-ab-{stamp}.json").write_text(json.dumps(result, indent=1))
    (out / f"bench-kernel-ab-{stamp}.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
