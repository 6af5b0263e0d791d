"""Decode CUDA graphs for the GPU: capture the model's decode forward once per batch-size bucket, replay it.

A decode step launches a few hundred small kernels; on a GPU their launch cost outweighs their work, so the
whole forward is recorded once per bucket (`--cuda-graphs`, TGI's default 1, 2, 4, 8, 16, 32) against static
input buffers and replayed; ModelRunner.use_decode_graphs sets it up and sends decode-only steps through it.
A batch is padded up to its bucket: padding rows decode token 0 at position 0 through block 0 and write their
K/V to the padding slot (-1, which the triton store skips); their outputs are dropped.

Requirements on what is captured (the runner's job to guarantee): the attention layers use the "triton" op set
(its decode path makes no host syncs and reads the block table and positions from the DecodeBatch tensors,
which are the static buffers here); no per-step Python state outside these buffers (LoRA off); the cache is
already allocated. Nothing here touches CUDA at import time; the pure parts (buckets, padding) run on the CPU,
and a `Recorder` that replays by recomputing tests the whole path there (tests/test_platform.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import torch
from torch import nn

from tgi_backend.engine.forward_context import DecodeBatch, ForwardContext, forward_context

PADDING_SLOT = -1  # the triton KV store skips negative slots


def parse_graph_sizes(spec: str) -> list[int]:
    """TGI's --cuda-graphs: comma-separated batch sizes, "0" (or empty) for none."""
    try:
        sizes = sorted({int(part) for part in spec.replace(" ", "").split(",") if part})
    except ValueError as exc:
        raise ValueError(f"--cuda-graphs takes comma-separated batch sizes or 0, got {spec!r}") from exc
    if any(s < 0 for s in sizes):
        raise ValueError(f"--cuda-graphs batch sizes must be >= 0, got {spec!r}")
    return [s for s in sizes if s > 0]


def graph_batch_sizes(max_batch_size: int) -> list[int]:
    """1, 2, 4, 8, ... up to max_batch_size, and max_batch_size itself when it is not a power of two."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    sizes = []
    n = 1
    while n < max_batch_size:
        sizes.append(n)
        n *= 2
    sizes.append(max_batch_size)
    return sizes


def bucket_for(num_rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding num_rows rows; None when the batch is too large (run eagerly)."""
    fitting = [s for s in sizes if s >= num_rows]
    return min(fitting) if fitting and num_rows > 0 else None


@dataclass(slots=True)
class DecodeInputs:
    """One decode step's inputs; as static buffers, the graph reads exactly these tensors on every replay."""

    input_ids: torch.Tensor  # [rows] int64
    positions: torch.Tensor  # [rows] int64
    block_table: torch.Tensor  # [rows, width] int64, padded with block 0
    slot_mapping: torch.Tensor  # [rows] int64

    @property
    def num_rows(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def allocate(cls, rows: int, max_blocks: int, device: torch.device) -> DecodeInputs:
        def zeros(*shape: int) -> torch.Tensor:
            return torch.zeros(shape, dtype=torch.long, device=device)

        return cls(zeros(rows), zeros(rows), zeros(rows, max_blocks),
                   torch.full((rows,), PADDING_SLOT, dtype=torch.long, device=device))

    def head(self, rows: int) -> DecodeInputs:
        """The first `rows` rows, as views (a smaller bucket shares the largest bucket's buffers)."""
        return DecodeInputs(self.input_ids[:rows], self.positions[:rows], self.block_table[:rows],
                            self.slot_mapping[:rows])


def copy_padded(dst: DecodeInputs, src: DecodeInputs, padding_slot: int = PADDING_SLOT) -> None:
    """Writes src into the static buffers dst (a bucket's views) and resets dst's remaining rows to padding."""
    n, width = src.num_rows, src.block_table.shape[1]
    if n > dst.num_rows or width > dst.block_table.shape[1]:
        raise ValueError(f"{n} rows x {width} blocks do not fit {tuple(dst.block_table.shape)}")
    dst.input_ids[:n].copy_(src.input_ids, non_blocking=True)
    dst.input_ids[n:].zero_()
    dst.positions[:n].copy_(src.positions, non_blocking=True)
    dst.positions[n:].zero_()  # position 0 reads key 0 of block 0: finite, and dropped
    dst.block_table[:n, :width].copy_(src.block_table, non_blocking=True)
    dst.block_table[:n, width:].zero_()
    dst.block_table[n:].zero_()
    dst.slot_mapping[:n].copy_(src.slot_mapping, non_blocking=True)
    dst.slot_mapping[n:].fill_(padding_slot)


class Recorder(Protocol):
    """Turns a forward into (replay, output): replay() recomputes output in place from the static inputs."""

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]: ...


class CudaGraphRecorder:
    """One CUDA graph per call, all in one memory pool (one graph replays at a time)."""

    def __init__(self, warmup_iters: int = 2) -> None:
        self.warmup_iters = warmup_iters
        self.pool = None

    def record(self, forward: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        # warm up on a side stream, as the CUDA-graph docs ask: lazy inits and triton compiles stay out
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup_iters):
                forward()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            output = forward()
        return graph.replay, output


class DecodeGraphRunner:
    """Captures `model(input_ids, positions) -> hidden [rows, hidden]` for decode-only steps, per bucket.

    Use: `capture()` once after the weights and the KV cache are in place; then per decode-only step
    `run(inputs)` returns the hidden states of the real rows, or None when the batch is not captured (too many
    rows or blocks: run eagerly). The returned tensor lives in the graphs' memory: it is valid until the next
    `run`, so compute logits from it (or clone it) first.
    """

    def __init__(
        self, model: nn.Module, block_size: int, max_batch_size: int, max_blocks_per_row: int,
        device: torch.device, padding_slot: int = PADDING_SLOT, ops: object = None,
        sizes: Sequence[int] | None = None, recorder: Recorder | None = None,
    ) -> None:
        self.model = model
        self.ops = ops  # the op set the attention layers use when captured: the runner's "triton" set
        self.block_size = block_size
        self.sizes = sorted(sizes) if sizes else graph_batch_sizes(max_batch_size)
        self.padding_slot = padding_slot
        self.recorder: Recorder = recorder or CudaGraphRecorder()
        self.static = DecodeInputs.allocate(max(self.sizes), max_blocks_per_row, torch.device(device))
        self.graphs: dict[int, Callable[[], None]] = {}  # bucket -> replay
        self.outputs: dict[int, torch.Tensor] = {}
        self._contexts: dict[int, ForwardContext] = {}  # kept alive: the graphs baked in their tensors

    def context(self, bucket: int) -> ForwardContext:
        """The decode-only forward context over the bucket's static buffers."""
        if bucket not in self._contexts:
            s = self.static.head(bucket)
            dec = DecodeBatch(num_rows=bucket, block_table=s.block_table, positions=s.positions,
                              block_size=self.block_size)
            self._contexts[bucket] = ForwardContext(slot_mapping=s.slot_mapping, decode=dec, prefills=[],
                                                    block_size=self.block_size, ops=self.ops)
        return self._contexts[bucket]

    def _forward(self, bucket: int) -> torch.Tensor:
        s = self.static.head(bucket)
        with forward_context(self.context(bucket)):
            return self.model(s.input_ids, s.positions)

    @torch.inference_mode()
    def capture(self) -> None:
        """Records one graph per bucket, largest first (the recorder shares one memory pool among them)."""
        for bucket in sorted(self.sizes, reverse=True):
            copy_padded(self.static.head(bucket), self.static.head(0), self.padding_slot)  # all padding rows
            self.graphs[bucket], self.outputs[bucket] = self.recorder.record(lambda b=bucket: self._forward(b))
        if torch.cuda.is_available() and self.static.input_ids.is_cuda:
            torch.cuda.synchronize()

    def load(self, inputs: DecodeInputs) -> int | None:
        """Copies a step's inputs into its bucket's static buffers; returns the bucket, None if not captured."""
        bucket = bucket_for(inputs.num_rows, self.sizes)
        if bucket is None or inputs.block_table.shape[1] > self.static.block_table.shape[1]:
            return None
        copy_padded(self.static.head(bucket), inputs, self.padding_slot)
        return bucket

    @torch.inference_mode()
    def run(self, inputs: DecodeInputs) -> torch.Tensor | None:
        # inputs: [rows] ids / positions / slots, [rows, width] block table -> hidden: [rows, hidden] or None
        bucket = self.load(inputs)
        if bucket is None or bucket not in self.graphs:
            return None
        self.graphs[bucket]()
        return self.outputs[bucket][: inputs.num_rows]
