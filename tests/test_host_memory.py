"""engine/host_memory.py: large activations come from glibc's heap (kept after free), not a fresh mmap each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

# mallinfo2's hblkhd: bytes held in mmapped chunks (glibc >= 2.33). Page-fault counts are no signal here: the
# kernel's NUMA balancing re-faults resident pages too.
SCRIPT = textwrap.dedent('''
    import ctypes, json, torch
    from tgi_backend.engine.host_memory import keep_freed_memory

    class MallInfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                    "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    applied = keep_freed_memory()
    t = torch.ones(16 << 20)  # 64 MB: above glibc's largest mmap threshold
    mmapped = libc.mallinfo2().hblkhd
    print(json.dumps({"applied": applied, "mmapped_mb": mmapped / 2**20, "again": keep_freed_memory()}))
''')


def _run(env_extra: dict[str, str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env_extra})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_large_tensors_come_from_the_heap_once_applied():
    out = _run({})
    assert out["applied"] and out["again"]
    assert out["mmapped_mb"] < 64, out  # from the heap: freed, its pages stay for the next step


def test_opting_out_leaves_glibc_alone():
    out = _run({"TGI_TRITON_KEEP_FREED_MEMORY": "0"})
    assert not out["applied"] and out["mmapped_mb"] >= 64  # glibc's default: a fresh mmap, unmapped on free
