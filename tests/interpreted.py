"""Runs a kernel-test script in a fresh interpreter with TRITON_INTERPRET=1 (it must be set before triton is
first imported, so never in the test process) and returns the JSON it printed on its `RESULT` line."""
from __future__ import annotations

import json
import os
import subprocess
import sys


def run_interpreted(script: str, timeout: float = 600) -> dict:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))
    return json.loads(line[len("RESULT"):])
