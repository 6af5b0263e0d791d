"""Pure helpers of the benchmark suite: percentiles, latencies, ratios, roofline bounds, markdown table."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field


@dataclass(slots=True)
class Row:
    model: str
    scenario: str
    peer: str
    dtype: str
    concurrency: int
    output_tokens: int = 0
    seconds: float = 0.0
    prompt_tokens: int = 0
    ttft_ms_p50: float | None = None
    ttft_ms_p99: float | None = None
    itl_ms_p50: float | None = None
    itl_ms_p99: float | None = None
    peak_rss_mib: float | None = None
    note: str = ""
    ratios: dict[str, float] = field(default_factory=dict)
    roofline: float | None = None  # measured / bound

    @property
    def output_tok_s(self) -> float:
        return round(self.output_tokens / self.seconds, 1) if self.seconds > 0 else 0.0

    @property
    def prefill_tok_s(self) -> float | None:
        """Prompt tokens per second, for the `prefill` scenario (one new token: the time is the prefill's)."""
        if self.scenario != "prefill" or self.seconds <= 0:
            return None
        return round(self.prompt_tokens / self.seconds, 1)

    def to_json(self) -> dict:
        d = asdict(self)
        d["output_tok_s"] = self.output_tok_s
        d["prefill_tok_s"] = self.prefill_tok_s
        return d


def median_run(runs: list[Row]) -> Row:
    """One peer's repeated runs of a scenario (--repeat) as its run of median speed, latencies and peak RSS
    included (the lower median: a run that happened, not an average), the spread in its note. A peer that never
    ran (skipped, or failed every time) keeps its first row."""
    done = [r for r in runs if r.output_tok_s > 0]
    if len(runs) <= 1 or not done:
        return runs[0]

    def speed(r: Row) -> float:
        return r.output_tok_s if r.prefill_tok_s is None else r.prefill_tok_s

    ordered = sorted(done, key=speed)
    mid = ordered[(len(ordered) - 1) // 2]
    spread = f"median of {len(done)} runs ({_fmt(speed(ordered[0]))}-{_fmt(speed(ordered[-1]))})"
    if len(done) < len(runs):
        spread += f", {len(runs) - len(done)} failed"
    mid.note = f"{mid.note}; {spread}" if mid.note else spread
    return mid


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank on the sorted values (q in 0..100); None for no values; NaNs (failed streams) dropped."""
    clean = sorted(v for v in values if v == v)
    if not clean:
        return None
    k = min(len(clean) - 1, max(0, round(q / 100 * (len(clean) - 1))))
    return round(clean[k], 2)


def latencies(starts: list[float], stamps: list[list[float]]) -> tuple[list[float], list[float]]:
    """TTFT per request (first stamp - its start) and every inter-token gap, in milliseconds."""
    ttft, itl = [], []
    for start, ts in zip(starts, stamps):
        ts = [t for t in ts if t == t]
        if ts:
            ttft.append((ts[0] - start) * 1000)
            itl.extend((b - a) * 1000 for a, b in zip(ts, ts[1:]))
    return ttft, itl


def fill_latency(row: Row, ttft: list[float], itl: list[float]) -> Row:
    row.ttft_ms_p50, row.ttft_ms_p99 = percentile(ttft, 50), percentile(ttft, 99)
    row.itl_ms_p50, row.itl_ms_p99 = percentile(itl, 50), percentile(itl, 99)
    return row


def add_ratios(rows: list[Row], peers: list[str]) -> None:
    """row.ratios[peer] = our tok/s / that peer's tok/s in the same model, scenario and dtype."""
    index = {(r.model, r.scenario, r.dtype, r.peer): r for r in rows if r.output_tok_s > 0}
    for r in rows:
        if r.output_tok_s <= 0:
            continue
        for peer in peers:
            ref = index.get((r.model, r.scenario, r.dtype, peer))
            if ref is not None and ref is not r:
                r.ratios[peer] = round(r.output_tok_s / ref.output_tok_s, 2)


@dataclass(slots=True)
class Machine:
    bandwidth_gb_s: float  # memory read, GB/s, over a buffer past any cache (DRAM)
    matmul_gflop_s: dict[str, float]  # per dtype name
    # GB/s over buffers of these sizes (bytes): a model's weights, which the host's L3 may partly hold (a sum
    # over 256 MiB read 45 GB/s where 1 GiB read 26-32 here, with 300 MB of L3 shared by the host)
    bandwidth_by_size: dict[int, float] = field(default_factory=dict)

    def bandwidth_for(self, nbytes: int) -> float:
        """GB/s over the smallest measured buffer that holds nbytes; past them all, the DRAM figure."""
        fits = [size for size in self.bandwidth_by_size if size >= nbytes]
        return self.bandwidth_by_size[min(fits)] if fits else self.bandwidth_gb_s

    def bound_tok_s(self, weight_bytes: int, params: int, concurrency: int, dtype: str) -> float:
        """Decode bound: each step reads the weights once and does 2 * params FLOPs per sequence."""
        step_mem = weight_bytes / (self.bandwidth_for(weight_bytes) * 1e9)
        # The best matmul of any dtype: an engine may compute a bf16 model's GEMMs in float32 (emulated bf16).
        rate = max(self.matmul_gflop_s.values())
        step_flops = concurrency * 2 * params / (rate * 1e9)
        return concurrency / max(step_mem, step_flops)


def add_roofline(rows: list[Row], machine: Machine, sizes: dict[str, tuple[int, int]]) -> None:
    """sizes[model] = (params read per decode step, params computed per prompt token: no LM head)."""
    for r in rows:
        if r.model not in sizes or r.output_tok_s <= 0:
            continue
        params, per_prompt_token = sizes[r.model]
        if r.prefill_tok_s is not None:  # compute bound: 2 FLOPs per parameter per prompt token
            bound = max(machine.matmul_gflop_s.values()) * 1e9 / (2 * per_prompt_token)
            r.roofline = round(r.prefill_tok_s / bound, 3)
            continue
        nbytes = params * (2 if r.dtype == "bfloat16" else 4)
        bound = machine.bound_tok_s(nbytes, params, r.concurrency, r.dtype)
        r.roofline = round(r.output_tok_s / bound, 3) if bound > 0 else None


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    return f"{x:,.1f}" if isinstance(x, float) else f"{x:,}"


def markdown(rows: list[Row], peers: list[str]) -> str:
    """One line per measurement; 'vs X' columns are our tok/s divided by peer X's."""
    head = ["model", "scenario", "dtype", "peer", "out tok/s (prefill: prompt tok/s)", "TTFT p50/p99 ms", "ITL p50/p99 ms",
            "peak RSS MiB", "of roofline"] + [f"vs {p}" for p in peers] + ["note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        speed = r.output_tok_s if r.prefill_tok_s is None else r.prefill_tok_s
        cells = [r.model, r.scenario, r.dtype, r.peer, _fmt(speed),
                 f"{_fmt(r.ttft_ms_p50)} / {_fmt(r.ttft_ms_p99)}", f"{_fmt(r.itl_ms_p50)} / {_fmt(r.itl_ms_p99)}",
                 _fmt(r.peak_rss_mib), "-" if r.roofline is None else f"{r.roofline:.0%}"]
        cells += [str(r.ratios.get(p, "-")) for p in peers]
        cells.append(r.note.replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def roofline_line(machine: Machine) -> str:
    rates = ", ".join(f"{k} {v:,.0f} GFLOP/s" for k, v in machine.matmul_gflop_s.items())
    sized = "".join(f", {gb:.1f} over {n / 2**20:,.0f} MiB" for n, gb in sorted(machine.bandwidth_by_size.items()))
    return (f"Roofline: memory read {machine.bandwidth_gb_s:.1f} GB/s past the caches{sized} (a model's weights); "
            f"matmul {rates}. 'of roofline' = tok/s / (concurrency / max(weight bytes / bandwidth over them, "
            "concurrency * 2 * params / matmul rate)).")
