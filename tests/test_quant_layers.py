"""Quantized linears: packers round-trip, each format's layer equals its dequantized float reference, packed
q/k/v shards land in the right columns, and format detection follows config.json / --quantize."""
from __future__ import annotations

import pytest
import torch

from tgi_backend.layers.linear import Linear, QKVLinear
from tgi_backend.layers.quantization import strategy_for
from tgi_backend.layers.quantization.checkpoint import PACKERS, quantization_config
from tgi_backend.layers.quantization.packing import (
    AWQ_ORDER, pack_cols, pack_rows, quantize_groups, dequantize, unpack_cols, unpack_rows,
)


@pytest.fixture(autouse=True)
def _own_rng():
    """Seeds set here must not change the random draws of tests that run later."""
    with torch.random.fork_rng():
        yield


def test_pack_unpack_round_trip():
    g = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        v = torch.randint(0, 1 << bits, (16, 24), generator=g)
        assert torch.equal(unpack_rows(pack_rows(v, bits), bits), v.to(torch.int32))
        assert torch.equal(unpack_cols(pack_cols(v, bits), bits), v.to(torch.int32))
    v = torch.randint(0, 16, (4, 16), generator=g)
    words = pack_cols(v, 4, AWQ_ORDER)
    assert torch.equal(unpack_cols(words, 4, AWQ_ORDER), v.to(torch.int32))
    # AutoAWQ's description: nibble i of a word holds column AWQ_ORDER[i]
    assert int(words[0, 0]) & 0xF == int(v[0, 0]) and (int(words[0, 0]) >> 4) & 0xF == int(v[0, 2])


def test_round_to_nearest_error_is_bounded():
    w = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    for sym in (True, False):
        q, zeros, scales, g_idx = quantize_groups(w, 4, 32, sym=sym)
        err = (dequantize(q, zeros, scales, g_idx).T - w).abs()
        # half a step, or one step where the rounded zero point pushes an extreme past the grid
        assert float((err - scales[g_idx.long()] * (1.0 if not sym else 0.5) * 1.01).max()) < 1e-6


def _close(got: torch.Tensor, want: torch.Tensor, compute: str) -> None:
    # the int ops take bfloat16 activations (compute.act_dtype): ~3 significant digits; a packing slip is O(1)
    tol = 1e-4 if compute == "dense" else 1e-2 * float(want.abs().max())
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


def _qkv_base() -> QKVLinear:
    layer = QKVLinear(hidden=64, head_dim=16, num_heads=4, num_kv_heads=2)  # q 64, k 32, v 32
    layer.weight.data.normal_()
    return layer


FORMATS = [
    ("gptq", dict(bits=4, group_size=32, sym=True), "int4"),
    ("gptq", dict(bits=4, group_size=32, sym=False, desc_act=True), "int4"),
    ("gptq", dict(bits=8, group_size=32, sym=True), "dense"),
    ("gptq", dict(bits=4, group_size=16, sym=True), "dense"),  # group size the int4 op does not take
    ("awq", dict(group_size=32), "int4"),
    ("fp8", dict(per_channel=False), "dense"),
    ("fp8", dict(per_channel=True), "dense"),
]


def _packed_qkv(fmt: str, opts: dict) -> tuple[torch.nn.Module, torch.Tensor]:
    """A q/k/v layer loaded from a checkpoint of format `fmt`, and its dequantized [out, in] reference."""
    torch.manual_seed(0)
    base = _qkv_base()
    layer = strategy_for(None, {"quantization_config": quantization_config(fmt, opts)}).build(base)
    params = dict(layer.named_parameters())
    reference = []
    for shard, (offset, size) in base.shard_offsets.items():
        tensors, deq = PACKERS[fmt](f"{shard}_proj", base.weight.data[offset : offset + size], opts)
        reference.append(deq)
        for name, t in tensors.items():
            params[name].weight_loader(params[name], t, shard)
    layer.process_weights_after_loading()
    return layer, torch.cat(reference)


@pytest.mark.parametrize("fmt,opts,compute", FORMATS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(FORMATS)])
def test_packed_layer_equals_dequantized_reference(fmt, opts, compute):
    layer, reference = _packed_qkv(fmt, opts)
    assert layer.weight_format == compute and layer.bias is None
    x = torch.randn(5, 64)
    ref = x @ reference.T
    _close(layer(x), ref, compute)
    assert [t.shape[-1] for t in layer.split(layer(x))] == [64, 32, 32]


@pytest.mark.parametrize("quantize,fmt", [("eetq", "int8"), ("bitsandbytes", "int8"), ("bitsandbytes-nf4", "int4")])
def test_on_the_fly_quantization(quantize, fmt):
    torch.manual_seed(0)
    base = Linear(128, 48)
    base.weight.data.normal_()
    layer = strategy_for(quantize, {}).build(base)
    layer.weight.weight_loader(layer.weight, base.weight.data)
    layer.process_weights_after_loading()
    assert layer.weight_format == fmt
    x = torch.randn(3, 128)
    exact = x @ base.weight.data.T
    err = (layer(x) - exact).abs().max() / exact.abs().max()
    assert err < (0.02 if fmt == "int8" else 0.2)
    ref = x @ layer.dequantized_weight().T  # and it computes what it stores
    _close(layer(x), ref, fmt)


def test_fp8_on_the_fly_from_float_checkpoint():
    base = Linear(32, 16)
    base.weight.data.normal_()
    layer = strategy_for("fp8", {}).build(base)
    layer.weight.weight_loader(layer.weight, base.weight.data)
    layer.process_weights_after_loading()
    torch.testing.assert_close(layer.dequantized_weight(), base.weight.data, rtol=0.07, atol=1e-3)


def test_gptq_checkpoint_bias_is_kept_when_nonzero():
    base = Linear(64, 16)
    layer = strategy_for(None, {"quantization_config": quantization_config("gptq", {"group_size": 32})}).build(base)
    tensors, deq = PACKERS["gptq"]("x", torch.randn(16, 64), {"group_size": 32})
    for name, t in {**tensors, "bias": torch.arange(16.0)}.items():
        getattr(layer, name).weight_loader(getattr(layer, name), t)
    layer.process_weights_after_loading()
    x = torch.randn(2, 64)
    _close(layer(x), x @ deq.T + torch.arange(16.0), layer.weight_format)


def test_format_detection_and_errors():
    assert strategy_for(None, {}) is None
    assert strategy_for(None, {"quantization_config": {"quant_method": "awq", "group_size": 64}}).name == "awq"
    assert strategy_for("gptq", {"quantization_config": {"quant_method": "gptq", "bits": 4}}).name == "gptq"
    ct = {"quant_method": "compressed-tensors",
          "config_groups": {"g": {"weights": {"type": "float", "num_bits": 8, "strategy": "channel"}}}}
    assert strategy_for(None, {"quantization_config": ct}).name == "fp8"
    with pytest.raises(ValueError, match="--quantize must be one of"):
        strategy_for("int3", {})
    with pytest.raises(ValueError, match="does not apply"):
        strategy_for("eetq", {"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="needs a GPTQ checkpoint"):
        strategy_for("gptq", {})
    with pytest.raises(ValueError, match="not supported"):
        strategy_for(None, {"quantization_config": {"quant_method": "gptq", "bits": 3}})
    with pytest.raises(ValueError, match="unsupported quantization format"):
        strategy_for(None, {"quantization_config": {"quant_method": "hqq"}})


_int8pack = torch._weight_int8pack_mm  # the real op, which the test below wraps to count its calls


def test_int8_many_rows_take_the_float32_gemm_and_agree_with_the_int8_op(monkeypatch):
    from tgi_backend.layers.quantization import compute

    torch.manual_seed(0)
    base = Linear(128, 48)
    base.weight.data.normal_()
    layer = strategy_for("eetq", {}).build(base)
    layer.weight.weight_loader(layer.weight, base.weight.data)
    layer.process_weights_after_loading()
    x = torch.randn(compute.INT8_FLOAT_ROWS + 3, 128)
    calls = []
    monkeypatch.setattr(torch, "_weight_int8pack_mm", lambda *a: calls.append(1) or _int8pack(*a))
    wide = layer(x)  # >= INT8_FLOAT_ROWS rows: no int8 op
    assert not calls
    narrow = torch.cat([layer(x[i : i + 8]) for i in range(0, x.shape[0], 8)])  # the int8 op, 8 rows at a time
    assert calls
    ref = x @ layer.dequantized_weight().T
    _close(wide, ref, "int8")
    torch.testing.assert_close(wide, narrow, rtol=0.02, atol=0.02 * float(ref.abs().max()))



_int4pack = torch._weight_int4pack_mm_for_cpu  # the real op, which the tests below wrap to count its calls
INT4_FORMATS = [f for f in FORMATS if f[2] == "int4"]


@pytest.mark.parametrize("fmt,opts,_", INT4_FORMATS, ids=[f"{f}-{i}" for i, (f, _, _) in enumerate(INT4_FORMATS)])
def test_int4_many_rows_take_the_float32_gemm_and_agree_with_the_int4_op(fmt, opts, _, monkeypatch):
    from tgi_backend.layers.quantization import compute

    layer, reference = _packed_qkv(fmt, opts)  # 128 output rows: two of the op's blocks; act-order permutes
    assert layer.weight_format == "int4" and layer.int4_block
    x = torch.randn(compute.INT4_FLOAT_ROWS + 3, 64)
    calls = []
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or _int4pack(*a))
    wide = layer(x)
    assert not calls
    narrow = torch.cat([layer(x[i : i + 64]) for i in range(0, x.shape[0], 64)])  # the op, 64 rows at a time
    assert calls
    ref = x @ reference.T
    _close(wide, ref, "int4")
    torch.testing.assert_close(wide, narrow, rtol=0.02, atol=0.02 * float(ref.abs().max()))


def test_int4_unpack_is_checked_against_the_values_packed(monkeypatch):
    from tgi_backend.layers.quantization import compute

    g = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (96, 128), generator=g)  # [in, out]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.T.contiguous().to(torch.int32), 8)
    assert compute._unpack_block(packed, q) in compute.INT4_BLOCK_ROWS  # 64 with AVX-512, 32 with AVX2 only
    assert not compute._unpack_block(packed, q.roll(1, dims=1))  # a layout that moved the output rows
    # 48 output rows: not whole blocks of the op, so a layer keeps the op at any row count
    base = Linear(128, 48)
    base.weight.data.normal_()
    layer = strategy_for("bitsandbytes-nf4", {}).build(base)
    layer.weight.weight_loader(layer.weight, base.weight.data)
    layer.process_weights_after_loading()
    assert layer.weight_format == "int4" and not layer.int4_block
    calls = []
    monkeypatch.setattr(torch, "_weight_int4pack_mm_for_cpu", lambda *a: calls.append(1) or _int4pack(*a))
    x = torch.randn(compute.INT4_FLOAT_ROWS + 1, 128)
    _close(layer(x), x @ layer.dequantized_weight().T, "int4")
    assert calls
