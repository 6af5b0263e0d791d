"""Smoke test of the benchmark suite: its pure functions (scripts/bench/report.py), and one peer on the tiny model."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from bench import report as R  # noqa: E402


def test_percentile_nearest_rank_and_nan() -> None:
    vals = [float(v) for v in range(1, 101)]
    assert R.percentile(vals, 50) == 51.0  # rank round(49.5) = 50 (0-based)
    assert R.percentile(vals, 99) == 99.0
    assert R.percentile(vals, 0) == 1.0 and R.percentile(vals, 100) == 100.0
    assert R.percentile([], 50) is None
    assert R.percentile([float("nan"), 3.0], 50) == 3.0  # a failed stream's NaN is dropped


def test_latencies_ttft_and_gaps() -> None:
    ttft, itl = R.latencies([0.0, 1.0], [[0.5, 0.6, 0.8], []])
    assert ttft == pytest.approx([500.0])
    assert itl == pytest.approx([100.0, 200.0])


def _row(peer: str, tok: int, secs: float, scenario: str = "1", dtype: str = "float32") -> R.Row:
    return R.Row("small", scenario, peer, dtype, int(scenario), output_tokens=tok, seconds=secs)


def test_ratios_same_model_scenario_dtype_only() -> None:
    ours, hf = _row("ours", 200, 1.0), _row("hf", 100, 1.0)
    other = _row("hf", 50, 1.0, dtype="bfloat16")
    skipped = _row("vllm", 0, 0.0)
    rows = [ours, hf, other, skipped]
    R.add_ratios(rows, ["hf", "vllm"])
    assert ours.ratios == {"hf": 2.0}  # no ratio to a skipped peer, nor across dtypes
    assert hf.ratios == {}  # never a ratio to itself
    assert skipped.ratios == {}


def test_roofline_memory_and_compute_bound() -> None:
    m = R.Machine(bandwidth_gb_s=10.0, matmul_gflop_s={"float32": 100.0})
    # 1e8 params fp32 = 0.4 GB per step -> 25 tok/s at batch 1 (memory bound)
    assert m.bound_tok_s(int(4e8), int(1e8), 1, "float32") == pytest.approx(25.0)
    # batch 1000: 2e11 FLOPs per step / 1e11 per s -> 2 s per step -> 500 tok/s (compute bound)
    assert m.bound_tok_s(int(4e8), int(1e8), 1000, "float32") == pytest.approx(500.0)
    two = R.Machine(bandwidth_gb_s=10.0, matmul_gflop_s={"float32": 100.0, "bfloat16": 50.0})
    assert two.bound_tok_s(int(2e8), int(1e8), 1000, "bfloat16") == pytest.approx(500.0)  # best dtype's rate
    row = _row("ours", 25, 2.0)
    R.add_roofline([row], m, {"small": (int(1e8), int(1e8))})
    assert row.roofline == pytest.approx(0.5)


def test_the_memory_bound_takes_the_bandwidth_over_the_weights_footprint() -> None:
    m = R.Machine(bandwidth_gb_s=10.0, matmul_gflop_s={"bfloat16": 100.0},
                  bandwidth_by_size={2**27: 40.0, 2**29: 20.0})
    assert m.bandwidth_for(2**26) == 40.0 and m.bandwidth_for(2**27 + 1) == 20.0 and m.bandwidth_for(2**30) == 10.0
    assert m.bound_tok_s(int(4e8), int(2e8), 1, "bfloat16") == pytest.approx(50.0)  # 0.4 GB at 20 GB/s
    line = R.roofline_line(m)
    assert "10.0 GB/s past the caches, 40.0 over 128 MiB, 20.0 over 512 MiB" in line


def test_prefill_rows_report_prompt_tokens_per_second_against_the_compute_bound() -> None:
    m = R.Machine(bandwidth_gb_s=10.0, matmul_gflop_s={"bfloat16": 200.0})
    row = R.Row("small", "prefill", "ours", "bfloat16", 32, output_tokens=32, seconds=2.0, prompt_tokens=16384)
    assert row.prefill_tok_s == pytest.approx(8192.0) and row.to_json()["prefill_tok_s"] == row.prefill_tok_s
    R.add_roofline([row], m, {"small": (int(2e8), int(1e7))})  # bound: 200e9 / (2 * 1e7) = 10,000 tok/s
    assert row.roofline == pytest.approx(0.819, abs=1e-3)
    assert "8,192.0" in R.markdown([row], [])
    assert R.Row("small", "32", "ours", "bfloat16", 32, output_tokens=1, seconds=1.0).prefill_tok_s is None


def test_the_compute_bound_takes_the_engines_panel_linear_where_bf16_runs_on_it() -> None:
    from bench import peers as P
    from tgi_backend.kernels.cpu import panel

    bw, rates, _ = P.measure_machine(["bfloat16"], seconds=0.05)
    assert bw > 0 and rates["bfloat16"] > 0
    if panel.available():  # AVX2 without AVX-512: torch's bf16 matmul is no bound there
        assert rates[P.PANELS_RATE] > 0 and P.PANELS_RATE in R.roofline_line(R.Machine(bw, rates))
    else:
        assert P.panels_rate(0.05) == {} and P.PANELS_RATE not in rates
    assert P.PANELS_RATE not in P.measure_machine(["float32"], seconds=0.05)[1]


def test_repeated_runs_keep_each_peers_median_run_and_its_spread() -> None:
    runs = [_row("ours", tok, 1.0, scenario="32") for tok in (300, 100, 200, 400)]
    runs[1].ttft_ms_p50 = 7.0
    mid = R.median_run(runs)
    assert mid is runs[2] and mid.output_tok_s == 200.0  # lower median of 100, 200, 300, 400: a real run
    assert mid.note == "median of 4 runs (100.0-400.0)"
    failed = [_row("ours", 0, 0.0), _row("ours", 50, 1.0)]
    failed[1].note = "drafts 3"
    assert R.median_run(failed).note == "drafts 3; median of 1 runs (50.0-50.0), 1 failed"
    skipped = [_row("vllm", 0, 0.0, scenario="32"), _row("vllm", 0, 0.0, scenario="32")]
    assert R.median_run(skipped) is skipped[0] and skipped[0].note == ""
    one = _row("hf", 10, 1.0)
    assert R.median_run([one]) is one and one.note == ""
    prefill = [R.Row("small", "prefill", "ours", "bfloat16", 32, output_tokens=32, seconds=s, prompt_tokens=16384)
               for s in (2.0, 4.0, 1.0)]
    assert R.median_run(prefill) is prefill[0]  # by prompt tokens/s: 4,096 / 8,192 / 16,384


def test_markdown_table_shape() -> None:
    ours, hf = _row("ours", 200, 1.0), _row("hf", 100, 1.0)
    ours.note = "a|b"
    R.add_ratios([ours, hf], ["hf"])
    R.fill_latency(ours, [10.0, 20.0], [1.0])
    table = R.markdown([ours, hf], ["hf"]).splitlines()
    assert len(table) == 4
    assert all(line.count("|") == table[0].count("|") for line in table)  # a '|' in a note is escaped
    assert "| 2.0 |" in table[2] and "200.0" in table[2]
    assert "Roofline" in R.roofline_line(R.Machine(30.0, {"bfloat16": 400.0}))


def test_engine_speculate_peer_reports_its_accepted_drafts(tiny_llama_dir: str) -> None:
    from bench import peers as P

    prompts = [[5, 6, 7, 8] * 4, [9, 10, 11] * 5]
    got = P.PEERS["engine-speculate"](tiny_llama_dir, prompts, 24, "float32")
    assert got.output_tokens == 48
    assert "--speculate 4:" in got.note and "drafts accepted" in got.note


def test_ab_overrides_and_summary() -> None:
    import bench_ab as AB

    assert AB.parse_overrides(["speculate=4", "block-size = 32"]) == {"speculate": "4", "block_size": "32"}
    for bad in (["speculate"], ["=4"]):
        with pytest.raises(ValueError):
            AB.parse_overrides(bad)
    s = AB.summarize([100.0, 50.0, 80.0], [110.0, 60.0, 80.0])
    assert s.ratios == pytest.approx([1.1, 1.2, 1.0]) and s.median == pytest.approx(1.1)
    assert s.to_json()["min"] == 1.0 and s.to_json()["max"] == 1.2
    with pytest.raises(ValueError):
        AB.summarize([1.0], [])
    assert AB.tokens_needed(3, 10, 20, 0) == 213 and AB.tokens_needed(3, 10, 20, 4) == 1033
    assert AB.tokens_needed(3, 10, 20, 0, decode_steps=4) == 828


def test_ab_pairs_two_engines_in_one_process(tiny_llama_dir: str) -> None:
    import bench_ab as AB

    result = AB.run(tiny_llama_dir, {}, {"block_size": "32"}, rows=2, prompt_tokens=12, steps=2, rounds=2,
                    warmup=1, dtype="float32")
    assert len(result["a_tok_s"]) == len(result["b_tok_s"]) == 2
    assert all(x > 0 for x in result["a_tok_s"] + result["b_tok_s"])
    assert result["b_over_a"]["min"] <= result["b_over_a"]["median"] <= result["b_over_a"]["max"]
    assert "block_size=32" in AB.markdown(result) and "| A | defaults |" in AB.markdown(result)
    with pytest.raises(ValueError, match="not EngineConfig fields"):
        AB.run(tiny_llama_dir, {"no_such_knob": "1"}, {}, rows=1, prompt_tokens=4, steps=1, rounds=1)


def test_ab_switches_native_kernels_off_on_one_side(tiny_llama_dir: str) -> None:
    import bench_ab as AB
    from tgi_backend.layers.platform import get_ops

    try:
        get_ops("cpu")
    except ImportError:
        pytest.skip("no C compiler: no native kernels")
    result = AB.run(tiny_llama_dir, {"dtype": "bfloat16"}, {"dtype": "bfloat16"}, rows=2, prompt_tokens=12,
                    steps=2, rounds=2, warmup=1, a_without=sorted(AB.NATIVE_PARTS))
    assert all(x > 0 for x in result["a_tok_s"] + result["b_tok_s"])
    assert "without gemv" in AB.markdown(result) and result["a_without"] == sorted(AB.NATIVE_PARTS)
    with pytest.raises(ValueError, match="unknown native parts"):
        AB.run(tiny_llama_dir, {}, {}, rows=1, prompt_tokens=4, steps=1, rounds=1, a_without=["nope"])


def test_ab_runs_a_sides_fused_step_on_kernels_from_other_sources(tiny_llama_dir: str, tmp_path) -> None:
    import bench_ab as AB
    from tgi_backend.kernels.cpu import SOURCE, library

    if library("decoder") is None:
        pytest.skip("no C compiler")
    same = tmp_path / "same"  # the tree's own text: the cached build (a changed source compiles for a minute)
    same.mkdir()
    (same / "panel.h").write_text(SOURCE.with_name("panel.h").read_text())
    result = AB.run(tiny_llama_dir, {"dtype": "bfloat16"}, {"dtype": "bfloat16"}, rows=2, prompt_tokens=12,
                    steps=2, rounds=2, warmup=1, a_sources=str(same))
    assert all(x > 0 for x in result["a_tok_s"] + result["b_tok_s"])
    assert f"kernels from {same}" in AB.markdown(result) and result["b_sources"] is None
    with pytest.raises(ValueError, match="no fused decode step"):
        AB.run(tiny_llama_dir, {"dtype": "bfloat16"}, {}, rows=1, prompt_tokens=4, steps=1, rounds=1,
               a_without=["decoder"], a_sources=str(same))


def test_kernel_ab_runs_the_attention_op_of_each_side_in_turns(tmp_path) -> None:
    import bench_kernel_ab as KAB
    from tgi_backend.kernels.cpu import library

    if library("paged_decode") is None:
        pytest.skip("no C compiler")
    # the tree on both sides: the cached build (a changed source compiles for a minute, too long for the suite)
    result = KAB.run(None, None, rows=3, ctx=40, layers=1, rounds=2)
    assert result["a_ms"] > 0 and result["b_ms"] > 0 and result["b_speed"]["min"] > 0
    assert "B's speed against A over 2 rounds" in KAB.markdown(result)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no files"):
        KAB.side_tree(str(tmp_path / "empty"), tmp_path / "tree")


def test_quant_table_has_prefill_against_bf16() -> None:
    import bench_quant

    def row(name: str, b1: float, b16: float, prefill: float | None) -> dict:
        r = {"variant": name, "weights_mb": 1.0, "rss_mb": 2.0, "decode_tok_s_b1": b1, "decode_tok_s_b16": b16}
        return r if prefill is None else {**r, "prefill_tok_s": prefill}

    table = bench_quant.table([row("bfloat16", 10, 100, 500.0), row("int4", 20, 110, 600.0),
                               row("old", 10, 100, None)]).splitlines()
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert table[3].endswith("| 600.0 | 1.20x |")
    assert table[4].endswith("| - | - |")  # a result from before the prefill figure


def test_involuntary_switches_are_read_from_proc_status() -> None:
    import bench_serving as S

    status = "Name:\tpython\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t42\n"
    assert S._involuntary_switches(status) == 42 and S._involuntary_switches("Name:\tx\n") == 0
    assert S._own_involuntary_switches() >= 0


def test_cpp_load_generator_files_round_trip() -> None:
    """The C++ load generator's requests file and output, as bench_serving writes and reads them."""
    import struct

    import bench_serving as S

    data = S.loadgen_requests([[1, 2, 3], [7]], 16)
    assert struct.unpack("<I", data[:4]) == (2,)
    assert struct.unpack("<II3i", data[4:24]) == (16, 3, 1, 2, 3)
    assert struct.unpack("<IIi", data[24:]) == (16, 1, 7)
    out = "start 1000000000\n0 1 1500000000\n1 3 1600000000\nfinal 1\n0 2 2000000000\nfinal 0\n"
    start, stamps = S.parse_loadgen(out, 2)
    assert start == 1.0 and stamps == [[1.5, 2.0, 2.0], [1.6, 1.6, 1.6]]
    start, stamps = S.parse_loadgen("start 0\n0 1 5\nerror model not ready\n", 2)
    assert len(stamps[0]) == 2 and stamps[0][1] != stamps[0][1] and stamps[1][0] != stamps[1][0]  # NaN: failed
    with pytest.raises(RuntimeError):
        S.parse_loadgen("", 1)


def test_sched_trace_summary_of_a_window() -> None:
    import sched_report as T

    def switch(t: float, cpu: int, pid: int, prev: int, prev_name: str, state: str, nxt: int, nxt_name: str) -> str:
        return (f"{pid}/{prev} [{cpu:03d}] {t:.6f}: sched:sched_switch: prev_comm={prev_name} prev_pid={prev} "
                f"prev_prio=120 prev_state={state} ==> next_comm={nxt_name} next_pid={nxt} next_prio=120")

    lines = [  # CPU 0: the engine thread 11, preempted by tritonserver (pid 50) for 2 ms; CPU 1: engine 12, idle
        switch(10.000, 0, 0, 0, "swapper/0", "R", 11, "tgi-engine"),
        switch(10.000, 1, 0, 0, "swapper/1", "R", 12, "tgi-engine"),
        switch(10.004, 0, 10, 11, "tgi-engine", "R", 51, "tritonserver"),
        "10/12 [001] 10.005000: sched:sched_waking: comm=x pid=99 prio=120 target_cpu=001",
        switch(10.006, 0, 50, 51, "tritonserver", "S", 11, "tgi-engine"),
        switch(10.007, 1, 10, 12, "tgi-engine", "S", 0, "swapper/1"),
        "10/11 [000] 10.007500: sched:sched_waking: comm=tgi-engine pid=12 prio=120 target_cpu=000",
        switch(10.008, 0, 10, 11, "tgi-engine", "S", 12, "tgi-engine"),  # 12 woke onto CPU 0 while CPU 1 idled
        switch(10.009, 1, 0, 0, "swapper/1", "R", 77, "stranger"),
        switch(10.010, 1, 30, 77, "stranger", "S", 0, "swapper/1"),
        switch(10.010, 0, 10, 12, "tgi-engine", "S", 0, "swapper/0"),
    ]
    s = T.summarize(lines, 10.0, 10.010, {50: "tritonserver", 10: "stub"}, {11: "engine", 12: "engine"})
    ms = {k: round(v, 3) for k, v in s.run_ms.items()}
    assert ms == {"engine": 4 + 2 + 2 + 7, "tritonserver": 2.0, "idle": 2.0, "other": 1.0}
    assert round(s.preempted_ms, 3) == 2.0 and s.preemptions == 1
    assert round(s.waits_beside_idle_ms, 3) == 0.5  # 12 waited 10.0075-10.008 while CPU 1 idled
    assert round(s.others["stranger"], 3) == 1.0
    assert s.preempted_by == {"tritonserver": 1}  # thread 51's process, from its own switch out
    row = T.markdown([{"model": "small", "concurrency": 32, "side": "served", "output_tok_s": 1.0,
                       **T.median_row([s, s])}])
    cells = ("| small | 32 | served | 1.0 | 0.01 | 15.0 | 1.0 | 2.0 | 2.0 | 2.0 (1) | 0.5 | tritonserver 1 | "
             "stranger 1.0 |")
    assert row.splitlines()[2] == cells
