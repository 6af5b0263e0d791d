"""Finds, prepares, starts and stops tritonserver (see ../shared/design/PLATFORM-NOTES.md for the why)."""
from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from tgi_backend.launcher.cli import ServerOptions

SHM_DIR = "/dev/shm"
SHM_PREFIX = "triton_python_backend_shm_region_"
NGC_BACKENDS = "/opt/tritonserver/backends"
READY_MODELS = ("tgi_llm", "preprocessing", "postprocessing", "ensemble")


@dataclass(frozen=True, slots=True)
class TritonBinary:
    """A tritonserver executable, its backends folder, and whether it is nvidia-pytriton's bundle."""

    path: str
    backend_dir: str | None
    bundled: bool = False


def find_tritonserver(explicit: str | None = None, search_path: str | None = None) -> TritonBinary:
    """Explicit path (flag or TGI_TRITON_SERVER), else `tritonserver` on PATH, else nvidia-pytriton's."""
    if explicit:
        if not (os.path.isfile(explicit) and os.access(explicit, os.X_OK)):
            raise FileNotFoundError(f"tritonserver not found or not executable: {explicit}")
        return TritonBinary(os.path.abspath(explicit), _backends_near(explicit))
    on_path = shutil.which("tritonserver", path=search_path)
    if on_path:
        return TritonBinary(on_path, _backends_near(on_path))
    bundle = pytriton_bundle()
    if bundle is None:
        raise FileNotFoundError(
            "no tritonserver: pass --tritonserver PATH, set TGI_TRITON_SERVER, put it on PATH, "
            "or pip install nvidia-pytriton"
        )
    return TritonBinary(str(bundle / "bin" / "tritonserver"), str(bundle / "backends"), bundled=True)


def _backends_near(binary: str) -> str | None:
    """`<prefix>/backends` beside `<prefix>/bin/tritonserver` (NGC: /opt/tritonserver/backends)."""
    beside = Path(binary).resolve().parent.parent / "backends"
    if beside.is_dir():
        return str(beside)
    return NGC_BACKENDS if os.path.isdir(NGC_BACKENDS) else None


def pytriton_bundle() -> Path | None:
    try:
        import pytriton
    except ImportError:
        return None
    folder = Path(pytriton.__file__).resolve().parent / "tritonserver"
    return folder if (folder / "bin" / "tritonserver").is_file() else None


def prepare_bundle(bundle: Path, workdir: str) -> TritonBinary:
    """Copies the read-only bundle into `workdir` with the stub that matches this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = bundle / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise FileNotFoundError(f"nvidia-pytriton has no Python backend stub for Python {version}")
    target = Path(workdir) / "tritonserver"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"))
    shutil.copy2(stub, target / "backends" / "python" / "triton_python_backend_stub")
    return TritonBinary(str(target / "bin" / "tritonserver"), str(target / "backends"), bundled=True)


def server_env(bundled: bool, environ: Mapping[str, str]) -> dict[str, str]:
    """The stub finds its Python by PATH; the bundled one also needs the bundle's libs and our libpython."""
    env = dict(environ)
    env["PATH"] = os.pathsep.join(p for p in (os.path.dirname(sys.executable), env.get("PATH")) if p)
    if bundled:
        import pytriton

        # Without the interpreter's LIBDIR the stub loads the system libpython of the same minor version.
        libs = [
            str(Path(pytriton.__file__).resolve().parent.parent / "nvidia_pytriton.libs"),
            sysconfig.get_config_var("LIBDIR") or "",
            env.get("LD_LIBRARY_PATH", ""),
        ]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
    return env


def server_command(binary: TritonBinary, repo_dir: str, options: "ServerOptions", shm_prefix: str) -> list[str]:
    cmd = [
        binary.path,
        f"--model-repository={repo_dir}",
        f"--http-port={options.http_port}",
        f"--grpc-port={options.grpc_port}",
        f"--metrics-port={options.metrics_port}",
        f"--exit-timeout-secs={options.exit_timeout_secs}",
        f"--log-verbose={options.log_verbose}",
        # A per-run prefix: this run's shm regions and stubs can be told apart from other servers'.
        f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
    ]
    if binary.backend_dir:
        cmd.append(f"--backend-directory={binary.backend_dir}")
    return cmd


class TritonServer:
    """One tritonserver process in its own process group, stopped by pid, its shm regions removed."""

    def __init__(self, binary: TritonBinary, repo_dir: str, options: "ServerOptions", *, workdir: str) -> None:
        self.options = options
        self.repo_dir = repo_dir
        self.workdir = workdir
        self.binary = binary
        self.shm_prefix = f"{SHM_PREFIX}tgi{os.getpid()}_{time.monotonic_ns() % 10**9}_"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        binary = self.binary
        if binary.bundled:
            bundle = pytriton_bundle()
            assert bundle is not None
            binary = prepare_bundle(bundle, self.workdir)
        cmd = server_command(binary, self.repo_dir, self.options, self.shm_prefix)
        env = server_env(binary.bundled, os.environ)
        # A new session: the stubs share the server's process group, so one killpg reaches them all.
        self.process = subprocess.Popen(cmd, env=env, start_new_session=True)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.poll() is not None or (stop is not None and stop.is_set()):
                return False
            if all(self._model_ready(name) for name in READY_MODELS):
                return True
            time.sleep(0.25)
        return False

    def _model_ready(self, name: str) -> bool:
        url = f"http://127.0.0.1:{self.options.http_port}/v2/models/{name}/ready"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> int | None:
        """SIGTERM, wait past Triton's exit timeout, then SIGKILL the group; always clean the shm regions."""
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=self.options.exit_timeout_secs + 5)
            except subprocess.TimeoutExpired:
                pass
        _kill_group(process.pid)
        code = process.wait()
        remove_shm_regions(self.shm_prefix)
        return code


def _kill_group(pgid: int) -> None:
    """Ends whatever is left of the group (stubs outliving the server), waiting briefly for SIGTERM."""
    for sig, pause in ((signal.SIGTERM, 2.0), (signal.SIGKILL, 0.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + pause
        while time.monotonic() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)


def remove_shm_regions(prefix: str) -> list[str]:
    removed = []
    for path in glob.glob(os.path.join(SHM_DIR, glob.escape(prefix) + "*")):
        try:
            os.unlink(path)
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
