"""screen.c's greedy LM head for AVX2 CPUs: an 8-bit integer screen of every output with rigorous bounds, then the
few outputs that may hold a row's maximum computed exactly from the panels: the token panel.linear's argmax
gives, at ~2.3x the products a cycle on the screen's share of the work."""
from __future__ import annotations

from typing import Callable

import torch

from tgi_backend.kernels.cpu import library, panel

STATS = 4  # floats per output (screen.c)
PROBE_ROWS = 256  # rows screened before `pays` judges


def available() -> bool:
    """The build has screen.c's kernel (AVX2 without AVX-512, as panel.h's)."""
    lib = library("screen")
    return lib is not None and bool(lib.screen_ready()) and panel.available()


class ScreenedHead:
    """An LM head [vocab, hidden] bf16 packed for the screen, beside its panels (panel.pack)."""

    def __init__(self, w: torch.Tensor, panels: torch.Tensor) -> None:
        lib = library("screen")
        if lib is None or w.dtype is not torch.bfloat16 or w.dim() != 2 or panels.shape[1] != w.shape[1]:
            raise ValueError("ScreenedHead takes a 2-D bf16 weight and its panels (and a built screen library)")
        if not 2 <= w.shape[1] or w.numel() >= 2**31:  # the exact part gathers 4 bytes ending at each weight, by int32
            raise ValueError("ScreenedHead takes 2 inputs or more, and fewer than 2**31 weights")
        w = w.contiguous()
        self.vocab, self.hidden = w.shape
        outs, kp = -(-self.vocab // 16) * 16, -(-self.hidden // 8) * 8
        self.wq = torch.empty(outs * kp, dtype=torch.int8)
        self.stats = torch.empty(outs * STATS, dtype=torch.float32)
        self.sumq = torch.empty(outs, dtype=torch.int32)
        if lib.screen_pack(w.data_ptr(), self.vocab, self.hidden, self.wq.data_ptr(), self.stats.data_ptr(),
                           self.sumq.data_ptr()) != 0:
            raise ValueError("ScreenedHead: weights not finite or past 1e15")
        self.w, self.panels, self.lib = w, panels, lib  # the exact part reads w; rows not narrowed, the panels
        self._hi = torch.empty(0, dtype=torch.float32)  # scratch [rows, outs], kept: 16 MB at 128 rows
        self.rows = self.whole_rows = 0  # rows asked for, and those the screen could not narrow (computed whole)

    def argmax(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """out (int64 [rows]) = each row's first maximum of x [rows, hidden] bf16 @ w.T rounded to bf16."""
        if x.dtype is not torch.bfloat16 or x.dim() != 2 or x.shape[1] != self.hidden or not (
                out.dtype is torch.int64 and out.is_contiguous() and out.numel() == x.shape[0]):
            raise ValueError("ScreenedHead.argmax: x bf16 [rows, hidden], out int64 [rows]")
        rows = x.shape[0]
        if rows == 0:
            return
        self.bind(x.contiguous(), rows)(out)

    def bind(self, x: torch.Tensor, rows: int) -> Callable[[torch.Tensor], None]:
        """`argmax(x, out)` for the same x (bf16 [rows, hidden], contiguous) again and again, its arguments made
        once: fn(out) with out int64 [rows] contiguous."""
        if x.dtype is not torch.bfloat16 or x.shape != (rows, self.hidden) or not x.is_contiguous() or rows < 1:
            raise ValueError("ScreenedHead.bind: x bf16 [rows, hidden], contiguous")
        need = rows * -(-self.vocab // 16) * 16
        if self._hi.numel() < need:
            self._hi = torch.empty(need, dtype=torch.float32)
        args = (x.data_ptr(), rows, self.hidden, self.w.data_ptr(), self.wq.data_ptr(), self.stats.data_ptr(),
                self.sumq.data_ptr(), self.vocab, self._hi.data_ptr(), torch.get_num_threads())
        call = self.lib.screen_argmax

        def argmax(out: torch.Tensor) -> None:
            status = call(*args, out.data_ptr())
            if status != 0:  # an error, or rows it could not narrow (-1), all together through the panels
                self._finish(x, out, status)
            else:
                self.rows += rows

        return argmax

    def _finish(self, x: torch.Tensor, out: torch.Tensor, status: int) -> None:
        """screen_argmax's failures raised; its rows it could not narrow (-1 in out) through the panels."""
        if status == -2:
            raise MemoryError(f"ScreenedHead.argmax: no memory for {x.shape[0]} rows")
        if status < 0:
            raise RuntimeError("ScreenedHead.argmax: no screen kernel in this build")
        whole = (out < 0).nonzero().squeeze(1)
        tokens = torch.empty(whole.numel(), dtype=torch.int64)
        panel.linear(x.index_select(0, whole), self.panels, self.vocab, None, None, argmax=tokens)
        out[whole] = tokens
        self.rows += x.shape[0]
        self.whole_rows += status

    @property
    def pays(self) -> bool:
        """Whether screening still pays: past its first 256 rows, at most 1 in 8 computed whole. Where the bounds
        are too loose for the head's width or its rows' values, the caller goes back to the panels."""
        return self.rows < PROBE_ROWS or 8 * self.whole_rows <= self.rows
