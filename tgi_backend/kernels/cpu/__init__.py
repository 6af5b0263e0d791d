"""Native CPU kernels: C sources built with the system's C compiler on first use, loaded with ctypes.

Built for this machine (-march=native) into a cache keyed by source, flags, compiler and CPU, so each host
compiles once (~10 s with gcc 12 for all of them, most of it decode attention). No compiler, a failed build
or TGI_CPU_KERNELS=0: `library()` returns None and the callers keep the PyTorch path.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# library name (its .c file here) -> {function: argument types}; every function returns an int
FUNCTIONS = {
    "paged_decode": {"paged_decode": [_P, _I64, _P, _P, _P, _I64, _P, _P, _I32, _I32, _I32, _I32, _I32, _I32, _F32,
                                      _I32, _I32, _I32]},
    "rms_norm": {"rms_norm_residual": [_P, _P, _P, _P, _P, _I64, _I32, _F32, _I32, _I32]},
    "gemv": {"linear_bf16": [_P, _I64, _I64, _P, _I64, _P, _P, _I32, _I32], "avx2_tiles": []},
    "rope_store": {"rope_store": [_P, _I64, _I64, _P, _P, _P, _P, _P, _I64, _I32, _I32, _I32, _I32, _I32]},
    "act": {"act_mul": [_P, _P, _I64, _I64, _P, _I32]},
    "prefill_attn": {"prefill_ready": [],
                     "prefill_attention": [_P, _I64, _P, _I64, _P, _I64, _P, _P, _I64, _P, _I64, _P, _P, _I64, _I64,
                                           _I64, _I64, _F32, _I64, _I64]},
    "panel": {"panel_ready": [], "panel_pack_bf16": [_P, _I64, _I64, _P],
              "panel_linear": [_P, _I64, _I64, _P, _I64, _P, _P, _I32, _I32, _P]},
    "screen": {"screen_ready": [], "screen_pack": [_P, _I64, _I64, _P, _P, _P],
               "screen_argmax": [_P, _I64, _I64, _P, _P, _P, _P, _I64, _P, _I32, _P]},
    "decoder": {"decode_step": [_P, _P], "amx_ready": [],
                "amx_linear": [_P, _I64, _I64, _I64, _P, _I64, _P, _P, _I64, _I64, _P]},
}
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
BUILD_TIMEOUT_S = 120
# the compiler's output in any locale: Triton's stub runs Python with ASCII while gcc quotes in UTF-8
_TEXT = {"encoding": "utf-8", "errors": "replace"}


def enabled() -> bool:
    return os.environ.get("TGI_CPU_KERNELS", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """TGI_KERNEL_CACHE, else ~/.cache/tgi-triton/kernels; the temporary directory where that is not writable."""
    if os.environ.get("TGI_KERNEL_CACHE"):
        wanted = Path(os.environ["TGI_KERNEL_CACHE"])
    else:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        wanted = Path(base) / "tgi-triton" / "kernels"
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        if os.access(wanted, os.W_OK):
            return wanted
    except OSError:
        pass
    return Path(tempfile.gettempdir()) / f"tgi-triton-kernels-{os.getuid()}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="ignore") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def build(source: Path = SOURCE, directory: Path | None = None) -> Path:
    """The shared library of `source`, compiled unless the cache has it; raises OSError when it cannot."""
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    version = subprocess.run([cc, "--version"], capture_output=True, timeout=30, **_TEXT).stdout
    headers = [h.read_text() for h in sorted(source.parent.glob("*.h"))]  # the sources' shared includes
    key = hashlib.sha256("\0".join([source.read_text(), *headers, " ".join(FLAGS), version, _cpu_flags()]).encode()).hexdigest()
    directory = directory or cache_dir()
    target = directory / f"{source.stem}-{key[:16]}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=directory)  # then renamed: concurrent builders never clash
    os.close(fd)
    try:
        proc = subprocess.run([cc, *FLAGS, "-o", tmp, str(source)], capture_output=True, timeout=BUILD_TIMEOUT_S,
                              **_TEXT)
        if proc.returncode != 0:
            raise OSError(f"{cc} failed on {source.name}: {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


@functools.cache
def library(name: str = "paged_decode") -> ctypes.CDLL | None:
    """The loaded library built from `name`.c, or None (disabled, or the build failed: logged once)."""
    if not enabled():
        return None
    import torch  # noqa: F401  # first: the library's libgomp must resolve to the OpenMP runtime torch loaded

    try:
        return load(SOURCE.with_name(f"{name}.c"), name)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("native CPU kernel %s unavailable, keeping the PyTorch path: %s", name, exc)
        return None


def load(source: Path, name: str) -> ctypes.CDLL:
    """`source` built (or taken from the cache) and loaded, its functions given FUNCTIONS[name]'s signatures:
    `library(name)`'s, and the A/B scripts' for a copy of the kernel tree with changed files."""
    lib = ctypes.CDLL(str(build(source)))
    for function, argtypes in FUNCTIONS[name].items():
        fn = getattr(lib, function)
        fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return lib
