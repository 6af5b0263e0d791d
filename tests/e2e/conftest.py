"""One real `tgi-triton serve` (the launcher, as a subprocess) for the whole e2e session, on free ports."""
from __future__ import annotations

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

SHM_PREFIX = "triton_python_backend_shm_region_"
READY_TIMEOUT = 300.0  # a bound for a broken start, not a timing assertion
MAX_TOTAL_TOKENS = 512
MAX_INPUT_TOKENS = 48


@dataclass
class Server:
    process: subprocess.Popen
    http_url: str
    grpc_url: str
    metrics_url: str
    model_dir: str
    log_path: Path
    front_url: str = ""  # the TGI/OpenAI HTTP front (tgi_backend.frontend), started by `serve --port`

    @property
    def shm_prefix(self) -> str:
        # The launcher names this run's regions after its own pid (see launcher/tritonserver.py).
        return f"{SHM_PREFIX}tgi{self.process.pid}_"

    def shm_files(self) -> list[str]:
        return glob.glob(f"/dev/shm/{glob.escape(self.shm_prefix)}*")

    def stub_pids(self) -> list[int]:
        """triton_python_backend_stub processes of this run (their argv names the run's shm region)."""
        pids = []
        for cmdline in glob.glob("/proc/[0-9]*/cmdline"):
            try:
                args = Path(cmdline).read_bytes().split(b"\0")
            except OSError:
                continue
            if args and args[0].endswith(b"triton_python_backend_stub") and any(
                self.shm_prefix.encode() in a for a in args
            ):
                pids.append(int(cmdline.split("/")[2]))
        return pids

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def post(self, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        request = urllib.request.Request(self.http_url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def launcher_command() -> list[str]:
    script = Path(sys.executable).parent / "tgi-triton"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tgi_backend.launcher.cli"]


def _ready(http_url: str) -> bool:
    for model in ("tgi_llm", "ensemble"):
        try:
            with urllib.request.urlopen(f"{http_url}/v2/models/{model}/ready", timeout=2) as r:
                if r.status != 200:
                    return False
        except (urllib.error.URLError, OSError):
            return False
    return True


def _front_ready(front_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{front_url}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def stop_server(server: Server, timeout: float = 60.0) -> int:
    """SIGTERM the launcher by pid; SIGKILL its group after a timeout; remove the run's shm regions."""
    process = server.process
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    for pid in server.stub_pids():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for path in server.shm_files():
        os.unlink(path)
    return process.returncode


def start_server(model_dir: str, work: Path, extra_args: tuple[str, ...] = ()) -> Server:
    """Starts `tgi-triton serve` on free ports with model_dir (and extra launcher flags) and waits until it is
    ready (fails the test if not)."""
    http, grpc, metrics, front = free_ports(4)
    cmd = launcher_command() + [
        "serve", "--model-id", model_dir, "--dtype", "float32",
        "--max-total-tokens", str(MAX_TOTAL_TOKENS), "--max-input-tokens", str(MAX_INPUT_TOKENS),
        "--max-batch-total-tokens", "4096", "--max-batch-prefill-tokens", "512",
        "--max-concurrent-requests", "16", "--http-port", str(http), "--grpc-port", str(grpc),
        "--metrics-port", str(metrics), "--port", str(front), "--model-repository", str(work / "repo"), "--exit-timeout-secs", "5",
        *extra_args,
    ]
    log_path = work / "server.log"
    with open(log_path, "wb") as log:
        # Its own session, so a leftover can be killed as a group; the launcher's pid names the run.
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    srv = Server(process, f"http://127.0.0.1:{http}", f"127.0.0.1:{grpc}", f"http://127.0.0.1:{metrics}",
                 model_dir, log_path, "" if "--no-frontend" in extra_args else f"http://127.0.0.1:{front}")
    deadline = time.monotonic() + READY_TIMEOUT
    while not (_ready(srv.http_url) and (not srv.front_url or _front_ready(srv.front_url))):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_server(srv)
            pytest.fail(f"tgi-triton serve did not become ready:\n{srv.log_tail()}")
        time.sleep(0.25)
    return srv


@pytest.fixture(scope="session")
def server(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Server:
    # n-gram speculation on: every e2e answer below must come out as it would without it; the inter-token
    # histogram on (off by default), so the metrics test sees every metric; one response per token (the
    # default budget groups a tiny model's fast tokens; tests/test_engine_loop.py covers it), as the tests count
    srv = start_server(tiny_llama_dir, tmp_path_factory.mktemp("e2e"),
                       ("--speculate", "4", "--inter-token-metrics", "--stream-budget", "0"))
    yield srv
    stop_server(srv)


@pytest.fixture(scope="session")
def launch_server() -> Any:
    """(start_server, stop_server) for a module that serves another model on its own server."""
    return start_server, stop_server


@pytest.fixture(scope="session")
def tokenizer(tiny_llama_dir: str) -> Any:
    from tgi_backend.tokenizer.loader import load_tokenizer

    return load_tokenizer(tiny_llama_dir)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The shutdown test stops the shared server: it must run last.
    items.sort(key=lambda item: "test_shutdown" in item.nodeid)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Any:
    # A failed test prints the end of its servers' logs: pytest deletes their folders a few sessions later.
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    for value in getattr(item, "funcargs", {}).values():
        if isinstance(value, Server) and value.log_path.exists():
            report.sections.append((f"tgi-triton serve log, last lines ({value.log_path})", value.log_tail(80)))
