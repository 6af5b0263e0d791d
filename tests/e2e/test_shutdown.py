"""SIGTERM to `tgi-triton serve` (runs last; see conftest): it exits, no stub and no shm region is left."""
from __future__ import annotations

import signal
import subprocess

import pytest

from client.grpc_client import TGITritonClient

pytestmark = pytest.mark.e2e
EXIT_BOUND = 90.0  # generous: Triton's exit timeout is 5 s here, plus the launcher's kill fallback


def test_sigterm_stops_everything_cleanly(server):
    assert server.stub_pids(), "this run's stubs should be found while serving"
    assert server.shm_files(), "this run's shm regions should exist while serving"
    stream = TGITritonClient(server.grpc_url).generate_stream("in flight", max_tokens=400,
                                                             sampling_parameters={"ignore_eos": True})
    next(stream)  # a request is running when the signal arrives
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher did not exit after SIGTERM")
    finally:
        stream.close()
    assert code == 0, server.log_tail()
    assert server.stub_pids() == []
    assert server.shm_files() == []
