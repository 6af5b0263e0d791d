#!/usr/bin/env bash
# Creates .venv in the checkout and installs the package with its test extras, CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -c constraints-cpu.txt torch==2.13.0 "numpy<2"
.venv/bin/python -m pip install -q -c constraints-cpu.txt -e ".[serve,test]"
# TGI's own client, for the compatibility tests; its huggingface-hub<1.0 pin is too strict (see pyproject.toml).
.venv/bin/python -m pip install -q --no-deps "text-generation>=0.7"
