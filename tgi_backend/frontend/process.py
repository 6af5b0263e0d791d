"""The front as a child process of `tgi-triton serve` (its own interpreter: no GIL shared with the launcher)."""
from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass

from tgi_backend.frontend.state import FrontendSettings


def frontend_command(settings: FrontendSettings) -> list[str]:
    """`tgi-triton frontend ...` for these settings; the API key travels in the environment, not argv."""
    cmd = [
        sys.executable, "-m", "tgi_backend.launcher.cli", "frontend",
        "--triton-url", settings.triton_url, "--hostname", settings.host, "--port", str(settings.port),
        "--payload-limit", str(settings.payload_limit),
        "--max-client-batch-size", str(settings.max_client_batch_size),
    ]
    if settings.metrics_url:
        cmd += ["--metrics-url", settings.metrics_url]
    return cmd


@dataclass
class FrontendProcess:
    settings: FrontendSettings
    process: subprocess.Popen | None = None

    def start(self) -> None:
        import os

        env = dict(os.environ)
        if self.settings.api_key:
            env["API_KEY"] = self.settings.api_key
        self.process = subprocess.Popen(frontend_command(self.settings), env=env)

    def poll(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
