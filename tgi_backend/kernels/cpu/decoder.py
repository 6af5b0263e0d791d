"""A whole decode step of a Llama-family decoder on the native kernel of decoder.c: one call per step.

A model hands over its tensors as `DecoderWeights` (models/llama.py: `decoder_weights()`); the runner sends
decode-only steps of up to `max_rows` rows here and everything else through the model. The C structs are
built once; a step costs one call (for Llama's plain lookups it gathers its embeddings and rotary rows
itself). Up to the few-row kernel's rows the linears run it on the plain weights; past them, where the CPU has
AMX, on a copy packed for the tiles (amx.h), up to AMX_MAX_ROWS rows. Where it has AVX2 and no native bf16,
every row runs on a copy packed in panels (panel.h), the LM head too, up to PANEL_MAX_ROWS.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable

import torch

from tgi_backend.engine.forward_context import DecodeBatch
from tgi_backend.kernels.cpu import library, panel, screen
from tgi_backend.kernels.cpu.act import EXACT, act_table
from tgi_backend.kernels.cpu.weight_arena import move_to_huge_pages
from tgi_backend.layers.linear import COPY_MEMORY_FRACTION, bf16_support, physical_memory

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
MAX_DIM = 512  # rope.h
# AMX from 5 rows: per linear 1.3-2.9x oneDNN's from 5 to 32 rows (small / medium matrices, Emerald Rapids),
# even at 128. A whole step against the modules (ABBA): small 8 / 32 / 64 / 96 / 128 rows 1.97x / 1.44x / 1.20x /
# 1.05x / 1.06x, medium 32 / 64 / 96 / 128 rows 1.73x / 1.07x / 1.00x / 0.97x. Served, where the modules' many
# ops hand the GIL to the serving threads and a preempted OpenMP thread stalls them, 128 streams against a limit
# of 96 (switched every 40 steps in one server, decode tok/s): small 1.048x / 1.060x, medium 1.105x / 1.009x
AMX_MAX_ROWS = 128
PANEL_MAX_ROWS = 128
# a thread that waits on a phase this long (~15 ns a spin here: ~20 us, past a task's few us) redoes the tasks
# still out: their thread is most likely preempted by the serving threads sharing the cores
STEAL_SPINS = 1024
ROW_TASKS = 8  # decoder.c's: a norm, rope or attention phase has at most this many tasks (tests name tasks by index)


class _Layer(ctypes.Structure):
    _fields_ = [(name, _P) for name in ("input_norm", "post_norm", "qkv", "qkv_bias", "o", "o_bias", "gate_up",
                                        "gate_up_bias", "down", "down_bias", "qkv_amx", "o_amx", "gate_up_amx",
                                        "down_amx", "qkv_panel", "o_panel", "gate_up_panel", "down_panel",
                                        "k_cache", "v_cache")] + [("window", _I64)]


class _Model(ctypes.Structure):
    _fields_ = [(name, _I64) for name in ("layers", "hidden", "heads", "kv_heads", "dim", "intermediate",
                                          "block_size", "num_slots", "few_rows", "max_rows")] + [
        ("eps", _F32), ("scale", _F32), ("final_norm", _P), ("act_table", _P), ("layer", ctypes.POINTER(_Layer)),
        ("lm_head", _P), ("lm_head_panel", _P), ("vocab", _I64), ("panels", _I64), ("embed", _P), ("vocab_rows", _I64),
        ("cos_table", _P),
        ("sin_table", _P), ("max_positions", _I64)]


class _Step(ctypes.Structure):
    _fields_ = [("rows", _I64), ("x", _P), ("cos", _P), ("sin", _P), ("slots", _P), ("table", _P),
                ("positions", _P), ("table_row_stride", _I64), ("max_len", _I64), ("threads", _I64), ("out", _P),
                ("steal_spins", _I64), ("stall_task", _I64), ("stolen", _I64), ("argmax", _P), ("ids", _P)]


@dataclass(frozen=True, slots=True)
class LayerWeights:
    """One decoder layer's tensors: bf16, linears [out, in] row-major (as loaded), biases None where none."""

    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor  # gate rows, then up rows
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None
    k_cache: torch.Tensor  # [blocks, block_size, kv_heads, dim]
    v_cache: torch.Tensor
    window: int | None


@dataclass(frozen=True, slots=True)
class DecoderWeights:
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    eps: float
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    act: Callable[[torch.Tensor], torch.Tensor]  # elementwise, bf16 -> bf16 (the gated MLP's)
    embed: Callable[[torch.Tensor], torch.Tensor]  # token ids -> [rows, hidden]
    rotary: Callable[[torch.Tensor, torch.dtype], tuple[torch.Tensor, torch.Tensor]]  # cos, signed sin
    max_rows: int  # what the linears' native kernel takes (their plan's native_rows)
    lm_head: torch.Tensor | None = None  # [vocab, hidden] bf16 as loaded (tied: the embedding's), for AMX
    # where `embed` is a plain lookup and `rotary` a plain gather of float32 tables rounded to bf16: those, and
    # the step gathers its inputs itself (a 1-row step spent ~0.1 ms of Python on the lookups and their checks)
    embed_table: torch.Tensor | None = None  # [vocab, hidden] bf16
    rope_tables: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, signed sin: [positions, head_dim] float32


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def vnni_pack(w: torch.Tensor) -> torch.Tensor:
    """w [out, in] bf16 as amx.h's tiles read it: per block of 16 outputs x 32 inputs, 16 rows of the 16 outputs'
    pairs of inputs ([out / 16][in / 32][16][16][2]); out a multiple of 16, in of 32."""
    out, inn = w.shape
    return w.view(out // 16, 16, inn // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous()


def amx_available() -> bool:
    """AMX-BF16 in this build of decoder.c, and the tile state granted to the process."""
    lib = library("decoder")
    return lib is not None and bool(lib.amx_ready())


def amx_linear(x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None = None,
               out_dtype: torch.dtype | None = torch.bfloat16,
               argmax: torch.Tensor | None = None) -> torch.Tensor | None:
    """x [rows, in] @ w.T + bias on amx.h's kernel, w packed by vnni_pack, rounded to bf16 once (returned as
    bf16, or as float32 for logits); `argmax` (int64 [rows], with float32 or out_dtype None) gets each row's first
    maximum. out_dtype None: only the argmax, no logits written (returns None)."""
    lib = library("decoder")
    rows, inn = x.shape
    if argmax is not None and not (argmax.dtype is torch.int64 and argmax.is_contiguous() and argmax.numel() >= rows
                                   and out_dtype in (torch.float32, None)):
        raise ValueError("amx_linear: argmax takes int64 [rows], for float32 logits or none")
    if out_dtype is None and argmax is None:
        raise ValueError("amx_linear: no logits asks for the argmax")
    padded = -(-rows // 16) * 16
    if padded == rows and x.dtype is torch.bfloat16 and x.is_contiguous():
        xp = x  # whole 16-row tiles already (32 or 128 rows): no padded copy
    else:
        xp = torch.empty(padded, inn, dtype=torch.bfloat16)
        xp[:rows] = x
        xp[rows:] = 0
    out = None if out_dtype is None else torch.empty(rows, out_features, dtype=out_dtype)
    if lib is None or lib.amx_linear(xp.data_ptr(), rows, padded, inn, packed.data_ptr(), out_features, _ptr(bias),
                                     _ptr(out), int(out_dtype is torch.float32), torch.get_num_threads(),
                                     _ptr(argmax)) != 0:
        raise RuntimeError("amx_linear: no AMX here, in not a multiple of 32 / out of 16, or no memory")
    return out


def _linears(w: DecoderWeights) -> list[torch.Tensor]:
    """Every layer's qkv, o, gate_up and down weights (bf16, as loaded)."""
    return [t for lw in w.layers for t in (lw.qkv, lw.o, lw.gate_up, lw.down)]


def _copies_fit(tensors: list[torch.Tensor]) -> bool:
    """Copies of twice these tensors' bytes fit the share of memory the linear plans give theirs."""
    return 2 * sum(t.numel() * t.element_size() for t in tensors) <= COPY_MEMORY_FRACTION * physical_memory()


def _panels_wanted(w: DecoderWeights) -> bool:
    """The panels where bf16 has no native matmul here (no AMX: see build), the build has their kernel (AVX2
    without AVX-512) and they fit as the linear plan counts them (AVX2_PANELS), whose copy the step shares."""
    return bf16_support() != "native" and panel.available() and _copies_fit(_linears(w))


def _amx_packable(w: DecoderWeights) -> bool:
    """Shapes whole tiles, and room: the packed copies and the plain ones (the few-row kernel's) together fit."""
    linears = _linears(w)
    return all(map(_whole_tiles, linears)) and _copies_fit(linears + ([w.lm_head] if _head_packable(w) else []))


def _head_packable(w: DecoderWeights) -> bool:
    return w.lm_head is not None and _whole_tiles(w.lm_head)


def _whole_tiles(w: torch.Tensor) -> bool:
    """[out, in] in vnni_pack's blocks: out a multiple of 16, in of 32."""
    return w.shape[0] % 16 == 0 and w.shape[1] % 32 == 0


def supported(w: DecoderWeights) -> bool:
    """The shapes, dtypes and activations decoder.c takes (paged_decode.h's head dim and group, rope.h's dim,
    an activation act.h's table gives exactly)."""
    dim, group = w.head_dim, w.heads // max(w.kv_heads, 1)
    tensors = [w.final_norm] + [t for lw in w.layers for t in (lw.input_norm, lw.post_norm, lw.qkv, lw.qkv_bias,
                                                                 lw.o, lw.o_bias, lw.gate_up, lw.gate_up_bias,
                                                                 lw.down, lw.down_bias, lw.k_cache, lw.v_cache)
                                if t is not None]
    return (
        bool(w.layers) and w.act in EXACT and 1 <= w.max_rows and w.heads % max(w.kv_heads, 1) == 0 and group <= 16
        and dim % 16 == 0 and dim <= min(256, MAX_DIM)
        and all(t.dtype is torch.bfloat16 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)
    )


def _screened(head: torch.Tensor | None, panels: torch.Tensor | None) -> screen.ScreenedHead | None:
    """The LM head for screen.c beside its panels, where the build has the kernel and the weights allow it."""
    if head is None or panels is None or not screen.available():
        return None
    try:
        return screen.ScreenedHead(head, panels)
    except ValueError:  # weights it cannot bound (not finite, past 1e15) or index (one input, 2**31): the panels
        return None


class FusedDecoder:
    """Runs decode-only steps of up to `max_rows` rows through decoder.c; keeps the tensors it points to."""

    def __init__(self, weights: DecoderWeights, lib: ctypes.CDLL, amx: bool = False, panels: bool = False) -> None:
        self.weights, self.lib = weights, lib
        if amx and panels:
            raise ValueError("the fused decoder's many-row linears run on AMX or the panels, not both")
        if panels and not panel.available():
            raise RuntimeError("no panel kernel in this build (AVX2 without AVX-512)")
        # per layer: qkv, o, gate_up, down packed for AMX, in panels, or Nones
        self.amx = [tuple(vnni_pack(t) for t in (lw.qkv, lw.o, lw.gate_up, lw.down)) if amx else (None,) * 4
                    for lw in weights.layers]
        self.panels = [tuple(panel.pack(t) for t in (lw.qkv, lw.o, lw.gate_up, lw.down)) if panels
                       else (None,) * 4 for lw in weights.layers]
        self.lm_head_amx = vnni_pack(weights.lm_head) if amx and _head_packable(weights) else None
        # with panels every row runs on them, the step's LM head too: small model, steps of 1 / 2 / 4 / 8 rows
        # 1.21-1.24x / 1.23x / 1.21-1.22x / 1.15x the few-row kernel on the plain weights (medium 1.01x at one
        # row, DRAM-bound; 1.13x / 1.20x at 4 / 8), alternated in one process
        self.max_rows = AMX_MAX_ROWS if amx else PANEL_MAX_ROWS if panels else weights.max_rows
        first = weights.layers[0]
        self.hidden = first.o.shape[0]
        head = weights.lm_head
        # up to the few-row kernel's rows the step itself ends with the LM head where every row is plain greedy
        self.head_in_step = head is not None and head.is_contiguous() and head.shape[1] == self.hidden
        self.lm_head_panel = panel.pack(head) if panels and self.head_in_step else None
        # past the step's own rows, plain greedy rows take their tokens from screen.c (the same tokens)
        self.lm_head_screen = _screened(head, self.lm_head_panel)
        move_to_huge_pages(self.streamed())  # before the C structs take their addresses
        self.num_blocks = first.k_cache.shape[0]
        embed, rope = weights.embed_table, weights.rope_tables
        self.gather_x = embed is not None and embed.dtype is torch.bfloat16 and embed.is_contiguous()
        self.gather_rope = rope is not None and all(t.dtype is torch.float32 and t.is_contiguous()
                                                    and t.shape[1] == weights.head_dim for t in rope)
        self.act_table = act_table(weights.act)
        self.stall_task = -1  # tests: the task whose thread waits for the step to go on without it (decoder.c)
        self.stolen = 0  # tasks redone by a waiting thread and committed before their taker's copy, all steps
        # called right before each step's native call, which holds no GIL for milliseconds: a server's other
        # threads take their turn with the GIL there rather than amid the step's Python (serving/engine_loop.py)
        self.on_native: Callable[[], None] | None = None
        self._layers = (_Layer * len(weights.layers))(*[
            _Layer(_ptr(lw.input_norm), _ptr(lw.post_norm), _ptr(lw.qkv), _ptr(lw.qkv_bias), _ptr(lw.o),
                   _ptr(lw.o_bias), _ptr(lw.gate_up), _ptr(lw.gate_up_bias), _ptr(lw.down), _ptr(lw.down_bias),
                   *(_ptr(t) for t in packed), *(_ptr(t) for t in panelled), _ptr(lw.k_cache), _ptr(lw.v_cache),
                   lw.window or 0)
            for lw, packed, panelled in zip(weights.layers, self.amx, self.panels)])
        self._model = _Model(
            len(weights.layers), self.hidden, weights.heads, weights.kv_heads, weights.head_dim,
            first.down.shape[1], first.k_cache.shape[1], first.k_cache.shape[0] * first.k_cache.shape[1],
            0 if panels else weights.max_rows, self.max_rows, weights.eps, weights.scale, _ptr(weights.final_norm),
            _ptr(self.act_table), self._layers, _ptr(head) if self.head_in_step else None, _ptr(self.lm_head_panel),
            head.shape[0] if self.head_in_step else 0, int(panels), _ptr(embed) if self.gather_x else None,
            embed.shape[0] if self.gather_x else 0, *((_ptr(rope[0]), _ptr(rope[1]), rope[0].shape[0])
                                                     if self.gather_rope else (None, None, 0)))

    @classmethod
    def build(cls, weights: DecoderWeights | None) -> FusedDecoder | None:
        """None where the kernel did not build or does not take these weights (the model runs as before)."""
        if weights is None or not supported(weights):
            return None
        lib = library("decoder")
        if lib is None:
            return None
        amx = amx_available() and _amx_packable(weights)
        return cls(weights, lib, amx=amx, panels=not amx and _panels_wanted(weights))

    def streamed(self) -> list[torch.Tensor]:
        """What a step of few rows reads from memory: the panels where it has them, else the layers' plain weights,
        and the LM head."""
        if self.lm_head_panel is not None or self.panels[0][0] is not None:
            return [t for layer in self.panels for t in layer] + [t for t in (self.lm_head_panel,) if t is not None]
        head = self.weights.lm_head
        return _linears(self.weights) + ([head] if head is not None else [])

    def logits(self, hidden: torch.Tensor,
               greedy_only: bool) -> tuple[torch.Tensor | None, torch.Tensor | None] | None:
        """hidden [rows, hidden] -> (float32 logits, as the LM head computes them rounded to bf16, None) from the
        AMX or panel copy of the head, or where every row is plain greedy (None, each row's first maximum),
        for the rows past the few-row kernel's (with screen.c, any rows: head_in_step_for); None: the model's LM
        head (fewer rows, or no copy). The greedy
        tokens come from the registers and no logits are written: the head's 4 bytes per row and vocab
        entry (16 MB at 128 rows) went to memory and back. LM head per call, small model: 32 rows 1.56 -> 1.37 ms,
        128 rows 6.15 -> 2.84 ms. The panels against oneDNN's float32 copy (EPYC Milan): 32 / 128 rows
        8.9 -> 7.3 / 30.7 -> 27.8 ms; their greedy tokens from the registers against logits and torch.argmax
        (alternated): 9 / 32 / 128 rows 1.16x / 1.10x / 1.09x. Where every row is greedy, screen.c's integer
        screen gives the same tokens: small model's head, 32 / 128 rows 6.7 -> 3.8 / 23.6 -> 12.4 ms (EPYC Milan);
        medium's 12.9 -> 7.4 / 47.3 -> 24.8 ms."""
        if self.lm_head_panel is not None:  # any rows: the step's own head (greedy_rows) computes as this
            vocab = self.weights.lm_head.shape[0]
            if not greedy_only:
                return panel.linear(hidden, self.lm_head_panel, vocab, None, torch.float32), None
            greedy = torch.empty(hidden.shape[0], dtype=torch.int64)
            if self._screening:
                self.lm_head_screen.argmax(hidden, greedy)
            else:
                panel.linear(hidden, self.lm_head_panel, vocab, None, None, argmax=greedy)
            return None, greedy
        if self.lm_head_amx is None or hidden.shape[0] <= self.weights.max_rows:
            return None
        out = self.lm_head_amx.shape[0] * 16
        if not greedy_only:
            return amx_linear(hidden, self.lm_head_amx, out, out_dtype=torch.float32), None
        greedy = torch.empty(hidden.shape[0], dtype=torch.int64)
        amx_linear(hidden, self.lm_head_amx, out, out_dtype=None, argmax=greedy)
        return None, greedy

    def greedy_rows(self, rows: int) -> bool:
        """Whether a step of `rows` rows can end with the LM head's greedy tokens (forward's `argmax`)."""
        return self.head_in_step and 1 <= rows <= self.weights.max_rows

    # At few rows the head streams from DRAM, and screen.c's int8 copy is half the panels' bytes. Small model,
    # decode steps with the screen's tokens against the step's own head (scripts/bench_ab.py, alternated in
    # one process): 1 / 2 / 4 / 8 rows 1.157x / 1.163x / 1.145x / 1.21x, medium at one row 1.043x.
    def head_in_step_for(self, rows: int) -> bool:
        """Whether a step of `rows` greedy rows should end with its own LM head: where it can (greedy_rows), unless
        screen.c gives the tokens (logits)."""
        return self.greedy_rows(rows) and not self._screening

    @property
    def _screening(self) -> bool:
        """Whether plain greedy rows take their tokens from screen.c (built, and still paying)."""
        return self.lm_head_screen is not None and self.lm_head_screen.pays

    def run_ahead(self, ids: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, table: torch.Tensor,
                  max_ctx: int) -> torch.Tensor | None:
        """Decode steps of the same rows, each row's greedy token fed back as its next id: ids int64 [rows] (the
        first step's), pos and slots int64 [steps, rows] contiguous, table the rows' block table (wide enough for
        the last step) -> the greedy tokens [steps, rows], those of `steps` forward calls with their LM head
        (greedy_rows, or the screen). None where this copy cannot: the caller runs the steps one by one. One
        step struct, its pointers moved: these calls' Python ran ~80 us a step here, cold after the weights."""
        steps, rows = pos.shape
        in_step = self.head_in_step_for(rows)
        if not (self.gather_x and self.gather_rope and (in_step or self._screening)) or not 1 <= rows <= self.max_rows:
            return None
        tokens = torch.empty(steps, rows, dtype=torch.int64)
        out = torch.empty(rows, self.hidden, dtype=torch.bfloat16)
        ids, table = ids.contiguous(), table.contiguous()
        step = _Step(rows, None, None, None, 0, table.data_ptr(), 0, table.stride(0), max_ctx, torch.get_num_threads(),
                     out.data_ptr(), STEAL_SPINS, self.stall_task, 0, None, ids.data_ptr())
        screen = None if in_step else self.lm_head_screen.bind(out, rows)
        at, size = tokens.data_ptr(), rows * tokens.element_size()
        for s in range(steps):
            step.slots, step.positions = slots[s].data_ptr(), pos[s].data_ptr()
            if in_step:
                step.argmax = at + s * size
            if s:
                step.ids = at + (s - 1) * size
            if self.on_native is not None:
                self.on_native()
            status = self.lib.decode_step(ctypes.byref(self._model), ctypes.byref(step))
            self.stolen += step.stolen  # each call's own count
            if status != 0:
                _raise_step_status(status, rows, self)
            if screen is not None:
                screen(tokens[s])
        return tokens

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, slot_mapping: torch.Tensor,
                dec: DecodeBatch, argmax: torch.Tensor | None = None) -> torch.Tensor:
        # input_ids, positions, slot_mapping: [rows], one token per row -> hidden [rows, hidden] (final norm applied);
        # argmax (int64 [rows], greedy_rows): also each row's first maximum of the LM head's logits, which the
        # step computes as gemv.linear does and never writes. Small model, steps of 1 / 4 rows: 2.14 -> 2.07 /
        # 3.83 -> 3.59 ms (alternated processes); medium at one row: no change (its head streams from DRAM)
        rows = input_ids.shape[0]
        if not 1 <= rows <= self.max_rows or dec.num_rows != rows:
            raise ValueError(f"the fused decoder takes decode steps of 1..{self.max_rows} rows, got {rows}")
        if argmax is not None and not (self.greedy_rows(rows) and argmax.dtype is torch.int64
                                       and argmax.is_contiguous() and argmax.numel() == rows):
            raise ValueError(f"the step's greedy tokens take int64 [rows] for 1..{self.weights.max_rows} rows")
        # the rows' positions (dec.positions, a decode row's token at its context's last position) and block ids
        # are checked in C, which reads memory with them
        ids, pos = input_ids.contiguous(), dec.positions.contiguous()
        x = cos = sin = None
        if not self.gather_x:
            x = self.weights.embed(ids).contiguous()
        if not self.gather_rope:
            cos, sin = self.weights.rotary(pos, torch.bfloat16)
            cos, sin = cos.contiguous(), sin.contiguous()
        slots, table = slot_mapping.contiguous(), dec.block_table.contiguous()
        out = torch.empty(rows, self.hidden, dtype=torch.bfloat16)
        step = _Step(rows, _ptr(x), _ptr(cos), _ptr(sin), slots.data_ptr(), table.data_ptr(), pos.data_ptr(),
                     table.stride(0), dec.max_ctx, torch.get_num_threads(), out.data_ptr(), STEAL_SPINS,
                     self.stall_task, 0, _ptr(argmax), ids.data_ptr())
        if self.on_native is not None:
            self.on_native()
        status = self.lib.decode_step(ctypes.byref(self._model), ctypes.byref(step))
        self.stolen += step.stolen
        if status != 0:
            _raise_step_status(status, rows, self)
        return out


def _raise_step_status(status: int, rows: int, fused: FusedDecoder) -> None:
    """decode_step's failure codes as exceptions."""
    if status == -3:
        raise ValueError(f"slot mapping out of bounds: a slot outside the cache's {fused._model.num_slots}")
    if status == -4:
        raise IndexError(f"a token id outside the embedding's {fused._model.vocab_rows} rows")
    if status == -5:
        raise ValueError("decode batch out of bounds: a position past its block table, the context or the "
                         "rotary table, or a block id past the cache")
    if status == -2:
        raise MemoryError(f"decode_step: no memory for the activations of {rows} rows")
    raise RuntimeError(f"decode_step rejected {rows} rows (head dim {fused.weights.head_dim})")
