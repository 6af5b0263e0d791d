"""The import rules of ../shared/design/ARCHITECTURE.md, checked on the source text."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tgi_backend"
CORE = ["engine/request.py", "engine/block_pool.py", "engine/kv_cache.py", "engine/scheduler.py",
        "engine/scheduler_output.py"]


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_engine_core_imports_no_torch():
    for rel in CORE:
        mods = imported_modules(ROOT / rel)
        assert not {m for m in mods if m.split(".")[0] in ("torch", "numpy")}, rel


def test_only_serving_knows_triton_python_backend():
    for path in ROOT.rglob("*.py"):
        if "serving" in path.relative_to(ROOT).parts:
            continue
        assert "triton_python_backend_utils" not in imported_modules(path), path


def test_layers_and_models_do_not_import_the_scheduler():
    for sub in ("layers", "models", "kernels"):
        for path in (ROOT / sub).rglob("*.py"):
            mods = imported_modules(path)
            bad = {m for m in mods if m.startswith("tgi_backend.engine") and not m.endswith("forward_context")}
            assert not bad, (path, bad)
