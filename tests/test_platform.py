"""Op-set selection (layers/platform.py), the torch op set against today's per-segment path, and the pure parts
of the decode CUDA-graph runner (buckets, padding into static buffers), all on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tgi_backend.engine.cuda_graphs import (
    PADDING_SLOT, DecodeGraphRunner, DecodeInputs, bucket_for, copy_padded, graph_batch_sizes,
)
from tgi_backend.engine.forward_context import DecodeBatch, ForwardContext, PrefillSegment, forward_context
from tgi_backend.layers.attention import PagedAttention
from tgi_backend.layers.norm import RMSNorm
from tgi_backend.kernels.cpu import library
from tgi_backend.layers.platform import OP_SETS, get_ops, select_ops


def test_selection_is_lazy_and_by_device():
    # a fresh process: this one may already have imported triton through other tests
    script = textwrap.dedent('''
        import json, sys, torch
        import tgi_backend.engine.cuda_graphs
        from tgi_backend.layers.platform import select_ops
        cpu = select_ops(torch.device("cpu")).name
        out = {"cpu": cpu, "triton_imported": "triton" in sys.modules, "cuda_init": torch.cuda.is_initialized()}
        try:
            import triton  # noqa: F401
            has_triton = True
        except ImportError:
            has_triton = False
        out["cuda"] = select_ops(torch.device("cuda")).name  # picks by device type; launches nothing
        out["has_triton"] = has_triton
        print(json.dumps(out))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cpu"] == ("cpu" if library() is not None else "torch")  # the native kernel when it builds
    assert not out["triton_imported"], "choosing the CPU op set imported triton"
    assert not out["cuda_init"], "importing cuda_graphs initialised CUDA"
    assert out["cuda"] == ("triton" if out["has_triton"] else "torch")


def test_explicit_name_and_registry():
    assert set(OP_SETS) == {"torch", "cpu", "triton"}
    assert select_ops(torch.device("cpu"), "torch") is get_ops("torch")
    with pytest.raises(ValueError, match="unknown op set"):
        select_ops(torch.device("cpu"), "tpu")


def _mixed_step(seed: int, window: int | None) -> tuple[torch.Tensor, ...]:
    """A step with 2 decode rows and 2 prefill chunks (one with history) over a small random cache."""
    g = torch.Generator().manual_seed(seed)
    bs, heads, kv_heads, dim = 4, 4, 2, 16
    kc = torch.randn(12, bs, kv_heads, dim, generator=g)
    vc = torch.randn(12, bs, kv_heads, dim, generator=g)
    dec = DecodeBatch(2, torch.tensor([[1, 2, 0], [3, 4, 5]]), torch.tensor([6, 9]), bs)
    segs = [PrefillSegment(2, 7, 0, None), PrefillSegment(7, 13, 5, torch.tensor([6, 7, 8]))]
    def slot(blocks: list[int], p: int) -> int:
        return blocks[p // bs] * bs + p % bs

    slots = torch.tensor([slot([1, 2], 6), slot([3, 4, 5], 9)] + [slot([9, 10], p) for p in range(5)]
                         + [slot([6, 7, 8], p) for p in range(5, 11)])
    q = torch.randn(13, heads, dim, generator=g)
    k = torch.randn(13, kv_heads, dim, generator=g)
    v = torch.randn(13, kv_heads, dim, generator=g)
    return kc, vc, dec, segs, slots, q, k, v, window


@pytest.mark.parametrize("window", [None, 3])
def test_torch_op_set_matches_paged_attention(window):
    kc, vc, dec, segs, slots, q, k, v, window = _mixed_step(0, window)
    layer = PagedAttention(4, 2, 16, 0.25, window)
    layer.bind_kv_cache(kc.clone(), vc.clone())
    with forward_context(ForwardContext(slots, dec, segs, 4)):
        want = layer(q, k, v)
    ops = get_ops("torch")  # bit for bit; the "cpu" set's kernel is checked in test_cpu_kernels.py
    kc2, vc2 = kc.clone(), vc.clone()
    ops.store_kv(kc2, vc2, k, v, slots)
    out = torch.empty_like(q)
    out[:2] = ops.decode_attention(q[:2], kc2, vc2, dec, 0.25, window)
    got = ops.prefill_attention(q, k, v, kc2, vc2, ops.prepare_prefill(segs, q.device), 0.25, window, out=out)
    assert got is out
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(kc2, layer.k_cache) and torch.equal(vc2, layer.v_cache)


def test_torch_rms_norm_and_rotary_match_the_layers():
    g = torch.Generator().manual_seed(1)
    norm = RMSNorm(32, 1e-6)
    norm.weight.data = torch.randn(32, generator=g)
    x, r = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)
    ops = get_ops("torch")
    y, s = ops.rms_norm_residual(x, norm.weight, norm.eps, r)
    y_want, s_want = norm(x, r)
    assert torch.equal(y, y_want) and torch.equal(s, s_want)
    assert torch.equal(ops.rms_norm_residual(x, norm.weight, norm.eps), norm(x))


# ---- CUDA-graph runner: the parts that need no GPU ------------------------------------------------------
def test_graph_batch_sizes_and_buckets():
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 32]
    assert graph_batch_sizes(12) == [1, 2, 4, 8, 12]
    sizes = graph_batch_sizes(12)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 12)] == [1, 2, 4, 8, 8, 12, 12]
    assert bucket_for(13, sizes) is None and bucket_for(0, sizes) is None
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def _inputs(rows: int, width: int, seed: int) -> DecodeInputs:
    g = torch.Generator().manual_seed(seed)
    return DecodeInputs(
        input_ids=torch.randint(1, 100, (rows,), generator=g),
        positions=torch.randint(1, 4 * width, (rows,), generator=g),
        block_table=torch.randint(1, 50, (rows, width), generator=g),
        slot_mapping=torch.randint(0, 200, (rows,), generator=g),
    )


def test_copy_padded_fills_the_bucket_and_clears_stale_rows():
    static = DecodeInputs.allocate(8, 6, torch.device("cpu"))
    assert torch.equal(static.slot_mapping, torch.full((8,), PADDING_SLOT))
    copy_padded(static.head(8), _inputs(7, 5, 0))  # a big step first: leaves values everywhere
    src = _inputs(3, 2, 1)
    dst = static.head(4)
    copy_padded(dst, src)
    assert torch.equal(dst.input_ids, torch.cat([src.input_ids, torch.zeros(1, dtype=torch.long)]))
    assert torch.equal(dst.positions, torch.cat([src.positions, torch.zeros(1, dtype=torch.long)]))
    assert torch.equal(dst.slot_mapping, torch.cat([src.slot_mapping, torch.tensor([PADDING_SLOT])]))
    assert torch.equal(dst.block_table[:3, :2], src.block_table)
    assert int(dst.block_table[:3, 2:].abs().sum()) == 0 and int(dst.block_table[3].abs().sum()) == 0
    assert dst.input_ids.data_ptr() == static.input_ids.data_ptr()  # views of the one static buffer
    with pytest.raises(ValueError):
        copy_padded(dst, _inputs(5, 2, 2))
    with pytest.raises(ValueError):
        copy_padded(dst, _inputs(2, 7, 3))


def test_runner_loads_into_static_buffers_without_a_gpu():
    ops = select_ops(torch.device("cpu"))
    runner = DecodeGraphRunner(torch.nn.Identity(), block_size=4, max_batch_size=16, max_blocks_per_row=8,
                               device=torch.device("cpu"), ops=ops)
    src = _inputs(5, 3, 4)
    assert runner.load(src) == 8
    assert torch.equal(runner.static.input_ids[:5], src.input_ids)
    assert torch.equal(runner.static.slot_mapping[5:8], torch.full((3,), PADDING_SLOT))
    ctx = runner.context(8)  # the forward context a graph is captured with: views of the static buffers
    assert ctx.decode is not None and ctx.decode.num_rows == 8 and not ctx.prefills and ctx.ops is ops
    assert ctx.decode.block_table.data_ptr() == runner.static.block_table.data_ptr()
    assert ctx.decode.max_ctx == 8 * 4
    assert runner.load(_inputs(17, 3, 5)) is None  # more rows than the largest bucket
    assert runner.load(_inputs(2, 9, 6)) is None  # wider than the static block table
    assert runner.run(src) is None  # nothing captured: the caller runs eagerly


# ---- the runner's decode graphs, end to end on the CPU ------------------------------------------------------
GRAPH_SCRIPT = '''
import json, torch
from transformers import LlamaConfig, LlamaForCausalLM
from tgi_backend.config import EngineConfig
from tgi_backend.engine.model_runner import ModelRunner
from tgi_backend.engine.request import SamplingParams
from tgi_backend.engine.scheduler_output import ScheduledChunk, SchedulerOutput
from tgi_backend.layers.platform import get_ops

folder = {folder!r}
config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     intermediate_size=64, vocab_size=128, max_position_embeddings=128, initializer_range=0.1)
config.architectures = ["LlamaForCausalLM"]
torch.manual_seed(0)
LlamaForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
cfg = EngineConfig(model_id=folder, dtype="float32", block_size=4, max_total_tokens=64,
                   max_batch_total_tokens=512).resolve(128)


class EagerRecorder:
    """What a CUDA graph does, on the CPU: replay recomputes the recorded output in place from the static inputs."""
    replays = 0

    def record(self, forward):
        out = forward()

        def replay():
            EagerRecorder.replays += 1
            out.copy_(forward())
        return replay, out


eager = ModelRunner(cfg, folder)  # the CPU's torch op set, no graphs
graphed = ModelRunner(cfg, folder)
graphed.ops = get_ops("triton")  # what a GPU runs: its KV store skips the padding rows' slot -1
graphed.use_decode_graphs([1, 2, 4], EagerRecorder())
after_capture = EagerRecorder.replays
greedy = SamplingParams()
prompts = [[5, 9, 2, 7, 1], [3, 3, 8, 1, 4, 6, 2], [11, 12, 13], [20, 21], [30, 31, 32, 33]]
blocks = [list(range(1 + 16 * i, 17 + 16 * i)) for i in range(len(prompts))]
chunks = lambda tokens, start: [ScheduledChunk(str(i), t, s, blocks[i], True, greedy)
                                for i, (t, s) in enumerate(zip(tokens, start))]
n = len(prompts)
out = SchedulerOutput(chunks(prompts, [0] * n))  # prefill every request (eager on both)
a, b = eager.compute_logits(out), graphed.compute_logits(out)
worst = float((a - b).abs().max())
history = [list(p) + [int(t)] for p, t in zip(prompts, a.argmax(-1))]
replayed = []
for rows in (3, 3, 5, 1):  # 3 rows: bucket 4 with a padding row; 5 rows: past the largest bucket, eager
    before = EagerRecorder.replays
    out = SchedulerOutput(chunks([[h[-1]] for h in history[:rows]], [len(h) - 1 for h in history[:rows]]))
    a, b = eager.compute_logits(out), graphed.compute_logits(out)
    worst = max(worst, float((a - b).abs().max()))
    replayed.append(EagerRecorder.replays - before)
    for h, t in zip(history, a.argmax(-1)):
        h.append(int(t))
cache_diff = float((eager.kv_cache - graphed.kv_cache).abs().max())
print("RESULT" + json.dumps({{"worst": worst, "replayed": replayed, "cache_diff": cache_diff,
                             "captured": sorted(graphed.graphs.graphs), "after_capture": after_capture}}))
'''


def test_runner_replays_decode_through_its_graphs_and_matches_eager(tmp_path):
    """ModelRunner.use_decode_graphs with the triton op set (TRITON_INTERPRET=1) against the torch path: same
    logits, padding rows write no KV, batches past the largest bucket run eagerly."""
    from interpreted import run_interpreted

    result = run_interpreted(GRAPH_SCRIPT.format(folder=str(tmp_path / "llama")))
    assert result["captured"] == [1, 2, 4] and result["after_capture"] == 0
    assert result["replayed"] == [1, 1, 0, 1]  # 3 rows -> bucket 4 (twice), 5 rows eager, 1 row -> bucket 1
    assert result["worst"] < 1e-4, result
    assert result["cache_diff"] < 1e-4, result  # the padding row's slot -1 was skipped: block 0 untouched
