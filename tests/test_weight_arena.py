"""Weights moved into the huge-page arena (kernels/cpu/weight_arena.py): same values, moved in place for every
holder, each from a page; tensors that share their storage stay."""
from __future__ import annotations

import torch
from torch import nn

from tgi_backend.kernels.cpu.weight_arena import ALIGN, move_to_huge_pages, movable


def test_tensors_move_in_place_with_their_values():
    linear = nn.Linear(300, 70, bias=False).to(torch.bfloat16)
    other = torch.randn(33, 17, dtype=torch.bfloat16)
    want = [linear.weight.detach().clone(), other.clone()]
    held = {"packed": linear.weight}  # another holder of the same tensor object
    before = [linear.weight.data_ptr(), other.data_ptr()]
    moved = move_to_huge_pages([linear.weight, other, linear.weight])  # listed twice: moved once
    assert moved == 11 * ALIGN + ALIGN  # each rounded up to whole pages: 42,000 bytes, then 1,122
    for t, w, old in zip((linear.weight, other), want, before):
        assert torch.equal(t, w) and t.data_ptr() != old and t.data_ptr() % ALIGN == 0
    assert held["packed"].data_ptr() == linear.weight.data_ptr()
    x = torch.randn(2, 300, dtype=torch.bfloat16)
    assert torch.equal(linear(x), x @ want[0].t())  # the module computes from the moved weight


def test_views_and_shared_storages_stay():
    base = torch.randn(8, 64, dtype=torch.bfloat16)
    view = base[2:4]
    strided = torch.randn(64, 8, dtype=torch.bfloat16).t()
    assert not movable(view) and not movable(strided) and movable(base)
    ptrs = [view.data_ptr(), strided.data_ptr()]
    assert move_to_huge_pages([view, strided]) == 0
    assert [view.data_ptr(), strided.data_ptr()] == ptrs
    assert move_to_huge_pages([]) == 0


def test_moved_tensors_do_not_move_again():
    t = torch.randn(128, 128, dtype=torch.bfloat16)
    assert move_to_huge_pages([t]) > 0
    ptr = t.data_ptr()
    assert not movable(t) and move_to_huge_pages([t]) == 0 and t.data_ptr() == ptr  # a slice of the arena now
