#!/usr/bin/env python
"""What the TGI/OpenAI HTTP front costs: N concurrent streaming requests through the front's /generate_stream
(SSE) vs straight to Triton's gRPC stream (tgi_llm), on one `tgi-triton serve`, alternating rounds.

    .venv/bin/python scripts/bench_frontend.py --model demo --concurrency 32 --new-tokens 128

Same text prompts, greedy, same max_new_tokens on both paths (so the same tokens). The front always asks tgi_llm
for per-token details (TGI's events carry logprobs), the gRPC peer does not: that cost is the front's.
Writes JSON and a markdown table under bench-results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import Result, _latencies, free_port, resolve_model  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly judge boxing matches".split()


def prompts(n: int, words: int) -> list[str]:
    return [" ".join(WORDS[(i + k) % len(WORDS)] for k in range(words)) + f" {i}" for i in range(n)]


async def grpc_round(url: str, texts: list[str], new_tokens: int) -> Result:
    from client.aio_client import AsyncTGITritonClient

    stamps: list[list[float]] = [[] for _ in texts]
    async with AsyncTGITritonClient(url) as client:
        async def one(text: str, out: list[float]) -> None:
            params = {"max_new_tokens": new_tokens}
            async for delta in client.generate_stream(text, sampling_parameters=params, exclude_input_in_output=True):
                out.extend([time.perf_counter()] * len(delta.token_ids))

        start = time.perf_counter()
        await asyncio.gather(*(one(t, s) for t, s in zip(texts, stamps)))
        seconds = time.perf_counter() - start
    ttft, itl = _latencies([start] * len(texts), stamps)
    return Result("triton gRPC stream", len(texts), sum(map(len, stamps)), seconds, ttft, itl)


async def front_round(url: str, texts: list[str], new_tokens: int) -> Result:
    import aiohttp

    stamps: list[list[float]] = [[] for _ in texts]
    limits = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=limits, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def one(text: str, out: list[float]) -> None:
            body = {"inputs": text, "parameters": {"max_new_tokens": new_tokens}}
            async with session.post(url + "/generate_stream", json=body) as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        event = json.loads(line[5:])
                        if "error" in event:
                            raise RuntimeError(event["error"])
                        out.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(one(t, s) for t, s in zip(texts, stamps)))
        seconds = time.perf_counter() - start
    ttft, itl = _latencies([start] * len(texts), stamps)
    return Result("HTTP front SSE", len(texts), sum(map(len, stamps)), seconds, ttft, itl)


def start_server(path: str, dtype: str, concurrency: int) -> tuple[object, str, str]:
    import subprocess
    import urllib.request

    grpc, http, metrics, front = free_port(), free_port(), free_port(), free_port()
    exe = Path(sys.executable).with_name("tgi-triton")
    cmd = [str(exe), "serve", "--model-id", path, "--dtype", dtype, "--max-total-tokens", "1024",
           "--max-concurrent-requests", str(max(128, concurrency)), "--grpc-port", str(grpc),
           "--http-port", str(http), "--metrics-port", str(metrics), "--port", str(front)]
    log = open(Path("/tmp") / f"bench-frontend-{front}.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tgi-triton serve exited early; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{front}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, f"127.0.0.1:{grpc}", f"http://127.0.0.1:{front}"
        except OSError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the server did not become ready")


def stop_server(proc: object) -> None:
    import os
    import signal
    import subprocess

    assert isinstance(proc, subprocess.Popen)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def combine(results: list[Result]) -> dict:
    """Rounds of one peer: tokens and seconds summed, latencies pooled."""
    merged = Result(results[0].peer, results[0].concurrency, sum(r.output_tokens for r in results),
                    sum(r.seconds for r in results), [x for r in results for x in r.ttft_ms],
                    [x for r in results for x in r.itl_ms], note=f"{len(results)} rounds")
    return merged.summary()


def markdown(rows: list[dict], model: str) -> str:
    lines = ["| model | peer | conc. | tokens | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | vs gRPC |",
             "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {model} | {r['peer']} | {r['concurrency']} | {r['output_tokens']} | {r['output_tok_s']} | "
                     f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']} | {r['itl_ms_p50']} / {r['itl_ms_p99']} | "
                     f"{r.get('vs_grpc', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo", help="demo | small | medium | folder")
    ap.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=24)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--out", default="bench-results")
    args = ap.parse_args(argv)
    path = resolve_model(args.model)
    proc, grpc_url, front_url = start_server(path, args.dtype, args.concurrency)
    texts = prompts(args.concurrency, args.prompt_words)
    runs: dict[str, list[Result]] = {"grpc": [], "front": []}
    try:
        asyncio.run(grpc_round(grpc_url, texts[:2], 4))  # warm-up both paths
        asyncio.run(front_round(front_url, texts[:2], 4))
        for _ in range(args.rounds):  # alternate, so drift hits both peers alike
            runs["grpc"].append(asyncio.run(grpc_round(grpc_url, texts, args.new_tokens)))
            runs["front"].append(asyncio.run(front_round(front_url, texts, args.new_tokens)))
    finally:
        stop_server(proc)
    rows = [combine(runs["grpc"]), combine(runs["front"])]
    for row in rows:
        row["vs_grpc"] = round(row["output_tok_s"] / rows[0]["output_tok_s"], 3) if rows[0]["output_tok_s"] else None
    out = Path(args.out)
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    report = {"args": vars(args), "rows": rows}
    (out / f"bench-frontend-{stamp}.json").write_text(json.dumps(report, indent=2))
    table = markdown(rows, args.model)
    (out / f"bench-frontend-{stamp}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
