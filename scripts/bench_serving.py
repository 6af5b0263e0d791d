#!/usr/bin/env python
"""Serving benchmark: the same load through Triton's gRPC streaming, on the engine in-process, and with
transformers' `generate` (static batch). Writes JSON and a markdown table with ratios between them.

    .venv/bin/python scripts/bench_serving.py --model demo --concurrency 8
    .venv/bin/python scripts/bench_serving.py --model medium --concurrency 1 --concurrency 16
    .venv/bin/python scripts/bench_serving.py --model small --concurrency 1 --concurrency 32 --paired 5
    .venv/bin/python scripts/bench_serving.py --model small --concurrency 32 --sched 3

Models: `demo` (the built-in demo checkpoint), `small` / `medium` (random-weight Llamas of the benchmark suite,
generated once under the cache folder), or a local checkpoint folder. Prompts are random token ids and EOS is
ignored, so every request produces exactly --new-tokens tokens.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import statistics
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARCHS = {
    # hidden, layers, heads, kv heads, intermediate (the peers' reference figures use these shapes)
    "small": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2,
                  intermediate_size=1408),
    "medium": dict(hidden_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=4,
                   intermediate_size=2816),
}


@dataclass
class Result:
    peer: str
    concurrency: int
    output_tokens: int
    seconds: float
    ttft_ms: list[float] = field(default_factory=list, repr=False)
    itl_ms: list[float] = field(default_factory=list, repr=False)
    note: str = ""
    # the measured load, time.monotonic(): what --sched's trace sums over (not a warm-up, nor the CPU bookkeeping)
    window: tuple[float, float] | None = field(default=None, repr=False)

    def summary(self) -> dict:
        return {
            "peer": self.peer,
            "concurrency": self.concurrency,
            "output_tokens": self.output_tokens,
            "seconds": round(self.seconds, 3),
            "output_tok_s": round(self.output_tokens / self.seconds, 1) if self.seconds else 0.0,
            "ttft_ms_p50": _pct(self.ttft_ms, 50),
            "ttft_ms_p99": _pct(self.ttft_ms, 99),
            "itl_ms_p50": _pct(self.itl_ms, 50),
            "itl_ms_p99": _pct(self.itl_ms, 99),
            "note": self.note,
        }


def _pct(values: list[float], q: int) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k], 2)


def _latencies(starts: list[float], stamps: list[list[float]]) -> tuple[list[float], list[float]]:
    ttft, itl = [], []
    for start, ts in zip(starts, stamps):
        if ts:
            ttft.append((ts[0] - start) * 1000)
            itl.extend((b - a) * 1000 for a, b in zip(ts, ts[1:]))
    return ttft, itl


def resolve_model(name: str) -> str:
    from tgi_backend.weights import demo

    if name == "demo":
        return demo.ensure_demo_model()
    if name in ARCHS:
        root = Path(os.environ.get("TGI_TRITON_CACHE", Path.home() / ".cache" / "tgi-triton"))
        out = root / f"bench-llama-{name}-v1"
        if not (out / "config.json").exists():
            tmp = out.with_name(out.name + f".tmp{os.getpid()}")
            demo.build_random_checkpoint(
                str(tmp), arch="llama", seed=0, dtype="bfloat16", vocab_size=32000,
                max_position_embeddings=2048, **ARCHS[name],
            )
            os.replace(tmp, out)
        return str(out)
    return name


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_prompts(vocab: int, n: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(n)]


# ---- peers ---------------------------------------------------------------------------------------
_RUNS = itertools.count()

def make_engine(path: str, dtype: str, speculate: int = 0) -> Any:
    """The in-process engine as the Triton peer's server builds it, warmed up."""
    from tgi_backend.config import EngineConfig
    from tgi_backend.engine.engine import LLMEngine
    from tgi_backend.engine.request import SamplingParams

    engine = LLMEngine(EngineConfig(model_id=path, dtype=dtype, max_total_tokens=1024, speculate=speculate))
    engine.generate([[5] * 8], SamplingParams(max_new_tokens=2, ignore_eos=True))  # warm-up
    return engine


def bench_engine(path: str, prompts: list[list[int]], new_tokens: int, dtype: str, speculate: int = 0) -> Result:
    return run_engine(make_engine(path, dtype, speculate), prompts, new_tokens, speculate)


def run_engine(engine: Any, prompts: list[list[int]], new_tokens: int, speculate: int = 0) -> Result:
    from tgi_backend.engine.request import SamplingParams

    # ids only, as the served load asks for `output_ids` alone (so neither detokenizes)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True, detokenize=False)
    stamps: dict[str, list[float]] = {}
    run = next(_RUNS)  # request ids stay unique when one engine serves several runs
    switches = _own_involuntary_switches()
    start, began = time.perf_counter(), time.monotonic()
    for i, p in enumerate(prompts):
        engine.add_request(f"b{run}-{i}", p, params)
        stamps[f"b{run}-{i}"] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps[out.request_id].append(time.perf_counter())
    seconds = time.perf_counter() - start
    ttft, itl = _latencies([start] * len(prompts), list(stamps.values()))
    note = f"threads preempted {_own_involuntary_switches() - switches} times"  # against the served engine's
    if speculate:  # a step's accepted tokens leave together: their gaps are 0 in the ITL figures
        stats = engine.stats()
        share = stats.accepted_tokens / stats.draft_tokens if stats.draft_tokens else 0.0
        note += f"; --speculate {speculate}: {stats.accepted_tokens} of {stats.draft_tokens} drafts accepted ({share:.0%})"
    return Result("engine in-process", len(prompts), sum(map(len, stamps.values())), seconds, ttft, itl, note,
                  (began, began + seconds))


def bench_transformers(path: str, prompts: list[list[int]], new_tokens: int, dtype: str) -> Result:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    torch_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).eval()
    stamps: list[float] = []

    class Clock(LogitsProcessor):  # called once per decoding step: a timestamp per generated token
        def __call__(self, input_ids, scores):
            stamps.append(time.perf_counter())
            return scores

    lens = {len(p) for p in prompts}
    if len(lens) != 1:
        raise ValueError("the static-batch peer needs prompts of one length")
    ids = torch.tensor(prompts)
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1, :8], max_new_tokens=2, do_sample=False, pad_token_id=0)  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, logits_processor=LogitsProcessorList([Clock()]), **kwargs)
    seconds = time.perf_counter() - start
    produced = (out.shape[1] - ids.shape[1]) * len(prompts)
    ttft, itl = _latencies([start] * len(prompts), [stamps] * len(prompts))
    return Result("transformers generate", len(prompts), produced, seconds, ttft, itl, "static batch")


def bench_triton(path: str, prompts: list[list[int]], new_tokens: int, dtype: str,
                 serve_flags: tuple[str, ...] = (), client: str = "python") -> Result:
    server = TritonProcess(path, dtype, serve_flags, client)
    try:
        server.start()
        return server.run_load(prompts, new_tokens)
    finally:
        server.stop()


# The C++ load generator (scripts/loadgen, built by `scripts/setup_peers.sh loadgen`, outside the repo).
LOADGEN = Path(os.environ.get("TGI_TRITON_PEERS", Path.home() / ".cache" / "tgi-triton" / "peers")) / "loadgen" / \
    "triton_stream_load"
CLIENTS = ("python", "cpp")


class TritonProcess:
    """`tgi-triton serve` as a subprocess, and a load of concurrent gRPC streams against it, sent by this
    process (client "python") or by the C++ load generator (client "cpp", a subprocess)."""

    def __init__(self, path: str, dtype: str, serve_flags: tuple[str, ...] = (), client: str = "python") -> None:
        self.path, self.dtype = path, dtype
        self.serve_flags = serve_flags  # extra `tgi-triton serve` flags: a second configuration
        self.proc = None
        if client not in CLIENTS:
            raise ValueError(f"client must be one of {CLIENTS}, got {client!r}")
        if client == "cpp" and not LOADGEN.exists():
            raise FileNotFoundError(f"{LOADGEN} is not built: run scripts/setup_peers.sh loadgen")
        self.client = client
        self.client_pid: int | None = None  # the C++ load generator's last process (scheduler traces)

    def start(self) -> None:
        import subprocess

        self.grpc, self.http, self.metrics = free_port(), free_port(), free_port()
        exe = Path(sys.executable).with_name("tgi-triton")
        cmd = [str(exe), "serve", "--model-id", self.path, "--dtype", self.dtype,
               "--max-total-tokens", "1024", "--grpc-port", str(self.grpc), "--http-port", str(self.http),
               "--metrics-port", str(self.metrics), "--no-frontend", *self.serve_flags]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-triton-{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        import tritonclient.grpc as grpcclient

        client = grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tgi-triton serve exited early; see {self.log.name}")
            try:
                # every model, not only tgi_llm: the ensemble's tokenizer stubs still loading would share the
                # two cores with the first measured requests (TTFT 0.3 s -> 2.4 s seen)
                if client.is_model_ready("tgi_llm") and client.is_server_ready():
                    return
            except Exception:
                pass
            time.sleep(0.5)
        raise TimeoutError("tritonserver did not become ready")

    def stop(self) -> None:
        import signal

        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except Exception:
                os.killpg(self.proc.pid, signal.SIGKILL)

    def run_load(self, prompts: list[list[int]], new_tokens: int) -> Result:
        """One load of concurrent streams (after a warm-up request), with the server's and the client's CPU."""
        load = self._cpp_load if self.client == "cpp" else self._python_load
        load([prompts[0][:8]], 2)  # warm-up
        server_before, wall_before = self.cpu_seconds(), time.perf_counter()
        start, began, stamps, client = load(prompts, new_tokens)
        wall = time.perf_counter() - wall_before
        server = self.cpu_seconds()
        seconds = max((x for s in stamps for x in s if x == x), default=start) - start
        ttft, itl = _latencies([start] * len(prompts), stamps)
        produced = sum(len([x for x in s if x == x]) for s in stamps)
        used = {k: (server[k] - server_before[k]) / wall for k in server}
        note = (f"cores used: engine {used['engine']:.2f}, tritonserver {used['tritonserver']:.2f}, "
                f"stub I/O {used['stub']:.2f}, client {client / wall:.2f}; engine threads preempted "
                f"{server['preempted'] - server_before['preempted']:.0f} times")
        peer = "triton gRPC stream" + (", C++ client" if self.client == "cpp" else "")
        return Result(peer, len(prompts), produced, seconds, ttft, itl, note, (began, began + seconds))

    def _cpp_load(self, batch: list[list[int]], n: int) -> tuple[float, float, list[list[float]], float]:
        """The load sent by the C++ load generator: (start, start, stamps, its CPU seconds), its clock
        CLOCK_MONOTONIC (time.monotonic's)."""
        import resource
        import subprocess
        import tempfile

        with tempfile.NamedTemporaryFile(suffix=".bin") as f:
            f.write(loadgen_requests(batch, n))
            f.flush()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            proc = subprocess.Popen([str(LOADGEN), f"127.0.0.1:{self.grpc}", "tgi_llm", f.name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.client_pid = proc.pid
            try:
                out, err = proc.communicate(timeout=3600)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode and "error " not in out:
            raise RuntimeError(f"the load generator failed ({proc.returncode}): {err.strip()[-500:]}")
        start, stamps = parse_loadgen(out, len(batch))
        return start, start, stamps, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    def _python_load(self, batch: list[list[int]], n: int) -> tuple[float, float, list[list[float]], float]:
        """All requests over one gRPC stream (multiplexed by request id), asking only for `output_ids`: one
        client thread, as perf_analyzer / genai-perf drive Triton, not one channel per request. The client is
        raw protobuf (requests built before the clock starts, responses read on the calling thread, token
        counts from the raw bytes): tritonclient's callback stream with a numpy array per response took ~90 us
        of CPU per response on these two cores, which a C++ load generator leaves to the server."""
        import grpc
        from tritonclient.grpc import service_pb2, service_pb2_grpc

        def request(i: int, prompt: list[int], n: int) -> service_pb2.ModelInferRequest:
            r = service_pb2.ModelInferRequest(model_name="tgi_llm", id=str(i))
            r.parameters["triton_enable_empty_final_response"].bool_param = True
            for name, dt, data in (
                ("input_ids", "INT32", struct.pack(f"<{len(prompt)}i", *prompt)),
                ("stream", "BOOL", b"\x01"),
                ("sampling_parameters", "BYTES", _bytes_element(json.dumps({"max_tokens": n, "ignore_eos": True}))),
            ):
                r.inputs.add(name=name, datatype=dt, shape=[len(prompt) if name == "input_ids" else 1])
                r.raw_input_contents.append(data)
            r.outputs.add(name="output_ids")
            return r

        def run(batch: list[list[int]], n: int) -> tuple[float, float, list[list[float]]]:
            stamps: list[list[float]] = [[] for _ in batch]
            requests = [request(i, prompt, n) for i, prompt in enumerate(batch)]
            done = threading.Event()

            def send():  # the stream stays open until every request has ended (gRPC reads it on its own thread)
                yield from requests
                done.wait(3600)

            left = len(batch)
            with grpc.insecure_channel(f"127.0.0.1:{self.grpc}") as channel:
                stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(send())
                start, began = time.perf_counter(), time.monotonic()
                try:
                    for message in stream:
                        if message.error_message:  # an error ends the run; its requests count as failed
                            for s in stamps:
                                s.append(float("nan"))
                            break
                        response = message.infer_response
                        if response.raw_output_contents:  # int32 ids
                            now = time.perf_counter()
                            stamps[int(response.id)].extend([now] * (len(response.raw_output_contents[0]) // 4))
                        if response.parameters["triton_final_response"].bool_param:
                            left -= 1
                            if left == 0:
                                break
                finally:
                    done.set()
                    stream.cancel()
            return start, began, stamps

        client_before = _own_cpu_seconds()
        start, began, stamps = run(batch, n)
        return start, began, stamps, _own_cpu_seconds() - client_before

    def cpu_seconds(self) -> dict[str, float]:
        """CPU seconds so far of the server's process tree: the engine's threads (named tgi-engine, with the
        OpenMP workers they started), the stubs' other threads (requests, responses, cancellation), tritonserver
        and the rest (the launcher); under "preempted", how often the engine's threads were switched out while
        runnable (another thread took the core: each IPC wake-up on these two cores can)."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {"engine": 0.0, "stub": 0.0, "tritonserver": 0.0, "other": 0.0, "preempted": 0.0}
        for pid in process_tree(self.proc.pid) if self.proc else []:
            try:
                process = Path(f"/proc/{pid}/comm").read_text().strip()
            except OSError:
                continue
            kind = {"tritonserver": "tritonserver", "triton_python_b": "stub"}.get(process, "other")
            for task in Path(f"/proc/{pid}/task").glob("*"):
                try:
                    comm = (task / "comm").read_text().strip()
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                    status = (task / "status").read_text() if comm == "tgi-engine" else ""
                except OSError:  # the thread ended meanwhile
                    continue
                out["engine" if comm == "tgi-engine" else kind] += (int(fields[11]) + int(fields[12])) / tick
                out["preempted"] += _involuntary_switches(status)
        return out


def loadgen_requests(prompts: list[list[int]], new_tokens: int) -> bytes:
    """The C++ load generator's requests file: uint32 count, then per request max_tokens, n and n int32 ids."""
    parts = [struct.pack("<I", len(prompts))]
    parts += [struct.pack(f"<II{len(p)}i", new_tokens, len(p), *p) for p in prompts]
    return b"".join(parts)


def parse_loadgen(text: str, count: int) -> tuple[float, list[list[float]]]:
    """The C++ load generator's output -> (start, per request a stamp per token), in seconds of
    CLOCK_MONOTONIC; an error the stream reported ends the run as in the Python client: NaN for every request."""
    start = None
    stamps: list[list[float]] = [[] for _ in range(count)]
    for line in text.splitlines():
        head, _, rest = line.partition(" ")
        if head == "start":
            start = int(rest) / 1e9
        elif head == "error":
            for s in stamps:
                s.append(float("nan"))
        elif head != "final":
            request, tokens, ns = map(int, line.split())
            stamps[request].extend([ns / 1e9] * tokens)
    if start is None:
        raise RuntimeError(f"the load generator printed no start: {text[:200]!r}")
    return start, stamps


def _own_involuntary_switches() -> int:
    """This process's threads' involuntary context switches so far (Linux; 0 elsewhere)."""
    total = 0
    for task in Path("/proc/self/task").glob("*"):
        try:
            total += _involuntary_switches((task / "status").read_text())
        except OSError:
            continue
    return total


def _involuntary_switches(status: str) -> int:
    """nonvoluntary_ctxt_switches from a /proc/<pid>/task/<tid>/status text (0 if absent)."""
    for line in status.splitlines():
        if line.startswith("nonvoluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def _bytes_element(text: str) -> bytes:
    """One BYTES tensor element as Triton's raw input format has it: a 4-byte little-endian length, then the bytes."""
    data = text.encode()
    return struct.pack("<I", len(data)) + data


def process_tree(root: int) -> list[int]:
    """root and every process under it, from /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, rest = stat.read_text().split(" ", 1)
            children.setdefault(int(rest.rsplit(")", 1)[1].split()[1]), []).append(int(pid))
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _own_cpu_seconds() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


PEERS = {"triton": bench_triton, "engine": bench_engine, "transformers": bench_transformers}


def markdown(rows: list[dict]) -> str:
    head = "| model | peer | conc. | out tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms | vs transformers | vs engine |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['peer']} | {r['concurrency']} | {r['output_tok_s']} | "
            f"{r['ttft_ms_p50']} / {r['ttft_ms_p99']} | {r['itl_ms_p50']} / {r['itl_ms_p99']} | "
            f"{r.get('vs_transformers', '-')} | {r.get('vs_engine', '-')} |"
        )
    return "\n".join(lines)


def add_ratios(rows: list[dict]) -> None:
    for r in rows:
        for peer, key in (("transformers generate", "vs_transformers"), ("engine in-process", "vs_engine")):
            ref = next((x for x in rows if x["peer"] == peer and x["model"] == r["model"]
                        and x["concurrency"] == r["concurrency"]), None)
            if ref and ref["output_tok_s"]:
                r[key] = round(r["output_tok_s"] / ref["output_tok_s"], 2)


def paired(path: str, vocab: int, concurrency: int, args: argparse.Namespace) -> dict:
    """Served / in-process throughput, alternated: one server and one in-process engine (this process, while
    the server idles) take turns in ABBA rounds on fresh prompts, so that a host whose speed drifts by 20-40%
    between runs still gives a ratio; per round (served + served) / (in-process + in-process)."""
    server = TritonProcess(path, args.dtype, tuple(args.serve_flag or ()), args.client)
    server.start()
    try:
        engine = make_engine(path, args.dtype)
        ratios: list[float] = []
        for r in range(args.paired):
            sets = [make_prompts(vocab, concurrency, args.prompt_tokens, seed=4 * r + i) for i in range(4)]
            rates = []
            for i, run in enumerate((server.run_load, lambda p, n: run_engine(engine, p, n),
                                     lambda p, n: run_engine(engine, p, n), server.run_load)):
                res = run(sets[i], args.new_tokens)
                rates.append(res.output_tokens / res.seconds)
            ratios.append((rates[0] + rates[3]) / (rates[1] + rates[2]))
            print(f"round {r + 1}: served {rates[0]:.1f} {rates[3]:.1f}, in-process {rates[1]:.1f} {rates[2]:.1f} "
                  f"tok/s: {ratios[-1]:.3f}", flush=True)
    finally:
        server.stop()
    return {"peer": "served / in-process, paired", "concurrency": concurrency, "ratios": [round(x, 3) for x in ratios],
            "median": round(statistics.median(ratios), 3), "min": round(min(ratios), 3), "max": round(max(ratios), 3),
            "serve_flags": list(args.serve_flag or ()), "client": args.client}


def sched(path: str, vocab: int, concurrency: int, args: argparse.Namespace) -> list[dict]:
    """Served and in-process loads taking turns (as --paired), each under the scheduler trace
    (scripts/sched_report.py): where the two cores went, in CPU milliseconds; per side, each figure's median."""
    sched_report = _sched_report()
    me = os.getpid()
    server = TritonProcess(path, args.dtype, tuple(args.serve_flag or ()), args.client)

    def served_groups() -> tuple[dict[int, str], dict[int, str]]:
        processes, threads = sched_report.server_groups(process_tree(server.proc.pid))
        clients = {me: "client", **({server.client_pid: "client"} if server.client_pid else {})}
        return {**processes, **clients}, threads

    def local_groups() -> tuple[dict[int, str], dict[int, str]]:  # every thread of this process runs the engine
        return {me: "client"}, {int(t.name): sched_report.ENGINE for t in Path(f"/proc/{me}/task").glob("*")}

    server.start()
    sides: dict[str, list[tuple[Result, Any]]] = {"served": [], "in-process": []}
    try:
        engine = make_engine(path, args.dtype)
        warm = make_prompts(vocab, concurrency, args.prompt_tokens, seed=97)
        server.run_load(warm, args.new_tokens)  # the first load's allocations, on both sides
        run_engine(engine, warm, args.new_tokens)
        for r in range(args.sched):
            prompts = make_prompts(vocab, concurrency, args.prompt_tokens, seed=100 + r)
            sides["served"].append(sched_report.record(lambda: server.run_load(prompts, args.new_tokens),
                                                       served_groups, attrgetter("window")))
            sides["in-process"].append(sched_report.record(lambda: run_engine(engine, prompts, args.new_tokens),
                                                           local_groups, attrgetter("window")))
    finally:
        server.stop()
    return [{"concurrency": concurrency, "side": side, "loads": len(runs),
             "output_tok_s": round(statistics.median(res.output_tokens / res.seconds for res, _ in runs), 1),
             **sched_report.median_row([summary for _, summary in runs])} for side, runs in sides.items()]


def _sched_report() -> Any:
    """scripts/sched_report.py, also where this file was imported as scripts.bench_serving (tests)."""
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    import sched_report

    return sched_report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", help="demo | small | medium | folder (repeatable)")
    ap.add_argument("--concurrency", type=int, action="append", help="concurrent requests (repeatable)")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--peers", default="triton,engine,transformers")
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--paired", type=int, default=0, metavar="ROUNDS",
                    help="instead of the peers: served / in-process ratio over ROUNDS alternated rounds")
    ap.add_argument("--serve-flag", action="append", help="a `tgi-triton serve` flag for the served side (repeatable)")
    ap.add_argument("--client", choices=CLIENTS, default="python",
                    help="the served load's sender: this process, or the C++ load generator (setup_peers.sh loadgen)")
    ap.add_argument("--sched", type=int, default=0, metavar="ROUNDS",
                    help="instead of the peers: where the cores go in served and in-process loads, ROUNDS each "
                         "(perf's scheduler trace)")
    args = ap.parse_args(argv)
    rows: list[dict] = []
    peers = {**PEERS, "triton": functools.partial(bench_triton, client=args.client)}
    for model in args.model or ["demo"]:
        path = resolve_model(model)
        vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
        for conc in args.concurrency or [8]:
            if args.paired:
                rows.append({"model": model, **paired(path, vocab, conc, args)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            if args.sched:
                rows.extend({"model": model, **r} for r in sched(path, vocab, conc, args))
                continue
            prompts = make_prompts(vocab, conc, args.prompt_tokens)
            for peer in args.peers.split(","):
                try:
                    res = peers[peer](path, prompts, args.new_tokens, args.dtype).summary()
                except Exception as exc:  # a missing peer is reported, not fatal
                    res = Result(peer, conc, 0, 0.0, note=f"skipped: {exc!r}"[:200]).summary()
                res["model"] = model
                rows.append(res)
                print(json.dumps(res), flush=True)
    out = Path(args.out)
    if args.paired:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"bench-paired-{stamp}.json").parent.mkdir(parents=True, exist_ok=True)
        (out / f"bench-paired-{stamp}.json").write_text(json.dumps(rows, indent=1))
        for r in rows:
            print(f"| {r['model']} | {r['concurrency']} | served / in-process median {r['median']} "
                  f"(min {r['min']}, max {r['max']}, {len(r['ratios'])} rounds) |")
        return 0
    if args.sched:
        sched_report = _sched_report()
        stamp = time.strftime("%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=True)
        (out / f"bench-sched-{stamp}.json").write_text(json.dumps(rows, indent=1))
        print(sched_report.markdown(rows))
        return 0
    add_ratios(rows)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    meta = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "dtype": args.dtype,
            "threads": os.cpu_count()}
    (out / f"bench-serving-{stamp}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    table = markdown(rows)
    (out / f"bench-serving-{stamp}.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
