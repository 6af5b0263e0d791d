"""The native CPU kernels (kernels/cpu): decode attention against a float64 reference of the same attention,
the residual RMSNorm against the layer's PyTorch code, their fallbacks (shapes they do not take, no compiler,
disabled), and the op set that carries them."""
from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

from tgi_backend.engine.forward_context import DecodeBatch, ForwardContext, forward_context
from tgi_backend.kernels import cpu
from tgi_backend.kernels.cpu import paged_decode, prefill_attn, rms_norm
from tgi_backend.layers import attention
from tgi_backend.layers.norm import RMSNorm
from tgi_backend.layers.norm import rms_norm as rms_norm_torch
from tgi_backend.layers.platform import get_ops, select_ops

needs_kernel = pytest.mark.skipif(cpu.library() is None, reason="no C compiler: the kernel did not build")


def _problem(rows, heads, kv_heads, dim, bs, dtype, seed=0, lengths=None):
    """A random cache of scattered blocks, rows of different lengths, q strided as the model's qkv split is."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [int(x) for x in torch.randint(1, 6 * bs, (rows,), generator=g)]
    width = max((n - 1) // bs + 1 for n in lengths)
    pool = rows * width + 3
    kc = torch.randn(pool, bs, kv_heads, dim, generator=g).to(dtype)
    vc = torch.randn(pool, bs, kv_heads, dim, generator=g).to(dtype)
    perm = torch.randperm(pool, generator=g)
    table = torch.zeros(rows, width, dtype=torch.long)
    for r, n in enumerate(lengths):
        used = (n - 1) // bs + 1
        table[r, :used] = perm[r * width : r * width + used]  # padding stays block 0, as the runner pads
    qkv = torch.randn(rows, heads + 2 * kv_heads, dim, generator=g).to(dtype)
    dec = DecodeBatch(rows, table, torch.tensor([n - 1 for n in lengths]), bs)
    return qkv[:, :heads], kc, vc, dec


def _reference(q, kc, vc, dec, scale, window):
    """Each row on its own, in float64, over exactly the keys it sees."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // kc.shape[2]
    for r in range(q.shape[0]):
        p = int(dec.positions[r])
        first = max(0, p - window + 1) if window else 0
        k = kc.index_select(0, dec.block_table[r]).flatten(0, 1)[first : p + 1].double()  # [n, kv_heads, dim]
        v = vc.index_select(0, dec.block_table[r]).flatten(0, 1)[first : p + 1].double()
        k, v = k.repeat_interleave(group, 1).transpose(0, 1), v.repeat_interleave(group, 1).transpose(0, 1)
        out[r] = F.scaled_dot_product_attention(q[r].double().unsqueeze(1), k, v, scale=scale).squeeze(1)
    return out


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "heads,kv_heads,dim,bs,window",
    [
        (8, 2, 64, 16, None),  # group 4, the specialized path
        (8, 2, 64, 16, 21),  # a sliding window starting mid-block
        (4, 4, 128, 16, None),  # group 1 (no GQA), dim 128
        (16, 2, 64, 8, None),  # group 8, small blocks
        (8, 4, 64, 8, 11),  # group 2, small blocks, a window
        (4, 4, 64, 16, 13),  # group 1 (16 keys a tile): a window's first keys outside the tiles
        (6, 2, 80, 5, 7),  # group 3 and dim 80: the generic path; blocks of 5 leave keys outside tiles
        (16, 1, 16, 4, None),  # group 16: one key per tile
    ],
)
def test_kernel_matches_float64_attention(dtype, heads, kv_heads, dim, bs, window):
    q, kc, vc, dec = _problem(9, heads, kv_heads, dim, bs, dtype)
    assert paged_decode.supports(q, kc, dec)
    scale = dim**-0.5
    got = paged_decode.decode_attention(q, kc, vc, dec, scale, window)
    want = _reference(q, kc, vc, dec, scale, window)
    assert got.dtype == dtype and got.shape == q.shape
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(got.double(), want, **tol)
    # and no further from the reference than the PyTorch path it replaces
    torch_err = (attention.decode_attention(q, kc, vc, dec, scale, window).double() - want).abs().max()
    assert (got.double() - want).abs().max() <= max(2 * torch_err, 1e-6)


@needs_kernel
def test_one_row_one_key_and_long_rows():
    q, kc, vc, dec = _problem(3, 8, 2, 64, 16, torch.bfloat16, seed=1, lengths=[1, 700, 33])
    got = paged_decode.decode_attention(q, kc, vc, dec, 0.125, None)
    torch.testing.assert_close(got.double(), _reference(q, kc, vc, dec, 0.125, None), rtol=1.6e-2, atol=1e-2)
    # one visible key: the output is that key's value
    torch.testing.assert_close(got[0].float(), vc[dec.block_table[0, 0], 0].repeat_interleave(4, 0).float())


@needs_kernel
def test_threads_do_not_change_the_result():
    q, kc, vc, dec = _problem(16, 8, 2, 64, 16, torch.float32, seed=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = paged_decode.decode_attention(q, kc, vc, dec, 0.125, None)
        torch.set_num_threads(2)
        two = paged_decode.decode_attention(q, kc, vc, dec, 0.125, None)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)  # each (row, KV head) is computed by one thread in a fixed order


def test_shapes_the_kernel_does_not_take_keep_the_torch_path():
    for heads, kv_heads, dim, dtype in [(4, 2, 8, torch.float32), (4, 2, 64, torch.float16)]:
        q, kc, vc, dec = _problem(4, heads, kv_heads, dim, 4, dtype, seed=3)
        assert not paged_decode.supports(q, kc, dec)
        want = attention.decode_attention(q, kc, vc, dec, 0.3, None)
        assert torch.equal(paged_decode.decode_attention(q, kc, vc, dec, 0.3, None), want)


def test_a_failed_build_is_an_os_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")  # a "compiler" that fails every build
    with pytest.raises(OSError, match="failed"):
        cpu.build(directory=tmp_path)
    assert not list(tmp_path.iterdir())  # no half-written library left behind


def test_a_compiler_speaking_utf8_builds_under_an_ascii_locale(tmp_path, monkeypatch):
    """Triton's stub runs Python with an ASCII locale while gcc quotes its warnings in UTF-8: that failed the
    model's load (UnicodeDecodeError) instead of building."""
    real = cpu._compiler()
    if real is None:
        pytest.skip("no C compiler")
    cc = tmp_path / "cc-utf8"
    cc.write_text(f"#!/bin/sh\nprintf '\\342\\200\\230warning\\342\\200\\231\\n' >&2\nexec {real} \"$@\"\n")
    cc.chmod(0o755)
    monkeypatch.setenv("CC", str(cc))
    monkeypatch.setattr("locale.getpreferredencoding", lambda do_setlocale=True: "ascii")
    monkeypatch.setattr("locale.getencoding", lambda: "ascii", raising=False)
    src = tmp_path / "tiny.c"
    src.write_text("int answer(void) { return 42; }\n")
    assert cpu.build(src, tmp_path / "cache").exists()


def test_build_is_cached_per_source(tmp_path):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    src = tmp_path / "tiny.c"
    src.write_text("int answer(void) { return 42; }\n")
    first = cpu.build(src, tmp_path / "cache")
    mtime = first.stat().st_mtime_ns
    assert cpu.build(src, tmp_path / "cache") == first and first.stat().st_mtime_ns == mtime
    src.write_text("int answer(void) { return 43; }\n")
    assert cpu.build(src, tmp_path / "cache") != first  # a changed source builds a new library


def test_disabled_or_unbuildable_selects_the_torch_set(monkeypatch):
    cpu.library.cache_clear()
    get_ops.cache_clear()  # earlier tests' runners may have built the "cpu" set already
    try:
        monkeypatch.setenv("TGI_CPU_KERNELS", "0")
        assert cpu.library() is None
        assert select_ops(torch.device("cpu")).name == "torch"
        with pytest.raises(ImportError):
            get_ops("cpu")
    finally:
        monkeypatch.undo()
        cpu.library.cache_clear()
        get_ops.cache_clear()
    if cpu.library() is not None:
        assert select_ops(torch.device("cpu")).name == "cpu"
        assert get_ops("cpu").decode_attention is paged_decode.decode_attention
        assert get_ops("cpu").prefill_attention is prefill_attn.prefill_attention


def test_an_unusable_cache_dir_falls_back_to_the_temp_dir(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("TGI_KERNEL_CACHE", str(blocker / "kernels"))  # under a file: cannot be created
    monkeypatch.setattr(cpu.tempfile, "gettempdir", lambda: str(tmp_path))
    assert cpu.cache_dir() == tmp_path / f"tgi-triton-kernels-{os.getuid()}"
    monkeypatch.setenv("TGI_KERNEL_CACHE", str(tmp_path / "mine"))
    assert cpu.cache_dir() == tmp_path / "mine" and (tmp_path / "mine").is_dir()


@needs_kernel
def test_out_of_bounds_batches_are_refused_not_read():
    q, kc, vc, dec = _problem(2, 8, 2, 64, 16, torch.float32, seed=4, lengths=[5, 20])
    bad_pos = DecodeBatch(2, dec.block_table, torch.tensor([4, dec.max_ctx]), 16)  # past its table row
    bad_block = DecodeBatch(2, dec.block_table + kc.shape[0], dec.positions, 16)  # past the cache
    for bad in (bad_pos, bad_block):
        with pytest.raises(ValueError, match="out of bounds"):
            paged_decode.decode_attention(q, kc, vc, bad, 0.125, None)


# ---- residual RMSNorm --------------------------------------------------------------------------------------
needs_norm = pytest.mark.skipif(cpu.library("rms_norm") is None, reason="no C compiler: the kernel did not build")


@needs_norm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 300])  # 300 x 512 rows run on several threads
def test_rms_norm_matches_the_layer(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    norm = RMSNorm(512, 1e-5).to(dtype)
    norm.weight.data = torch.randn(512, generator=g).to(dtype)
    x, r = torch.randn(rows, 512, generator=g).to(dtype), torch.randn(rows, 512, generator=g).to(dtype)
    y, s = rms_norm.rms_norm_residual(x, norm.weight, norm.eps, r)
    y_want, s_want = norm(x, r)  # no forward context: the layer's PyTorch code
    assert torch.equal(s, s_want)  # the residual stream is bit for bit torch's add
    tol = dict(rtol=1e-5, atol=1e-5) if dtype is torch.float32 else dict(rtol=8e-3, atol=8e-3)  # one bf16 rounding
    torch.testing.assert_close(y, y_want, **tol)
    torch.testing.assert_close(rms_norm.rms_norm_residual(x, norm.weight, norm.eps), norm(x), **tol)


def test_rms_norm_shapes_it_does_not_take_keep_the_torch_code():
    w = torch.randn(16)
    x3 = torch.randn(2, 3, 16)  # per-head norms (3-D)
    assert torch.equal(rms_norm.rms_norm_residual(x3, w, 1e-6), rms_norm_torch(x3, w, 1e-6))
    xt = torch.randn(16, 4).t()  # not contiguous
    y, s = rms_norm.rms_norm_residual(xt, w, 1e-6, torch.ones(4, 16))
    assert torch.equal(s, xt + 1) and torch.equal(y, rms_norm_torch(xt + 1, w, 1e-6))


@needs_norm
def test_the_layer_runs_the_op_set_norm_inside_a_step():
    norm = RMSNorm(32, 1e-6)
    norm.weight.data = torch.randn(32)
    x, r = torch.randn(3, 32), torch.randn(3, 32)
    calls = []
    ops = dataclasses.replace(get_ops("cpu"), rms_norm_residual=lambda *a: calls.append(a) or a[0])
    dec = DecodeBatch(1, torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), 4)
    with forward_context(ForwardContext(torch.zeros(1, dtype=torch.long), dec, [], 4, ops=ops)):
        norm(x, r)
    assert len(calls) == 1 and calls[0][0] is x and calls[0][3] is r
    with forward_context(ForwardContext(torch.zeros(1, dtype=torch.long), dec, [], 4, ops=get_ops("torch"))):
        y, _ = norm(x, r)  # the torch set keeps the layer's own code
    assert torch.equal(y, norm(x, r)[0])
