"""The engine's custom metrics on Triton's metrics port: gauges move under load and return to idle values,
counters and histograms count the requests."""
from __future__ import annotations

import queue
import re
import threading
import time
import urllib.request

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.grpc_client import TGITritonClient, build_inputs

pytestmark = pytest.mark.e2e
WAIT = 120.0  # bound for a hung server, not a timing assertion
LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{([^}]*)\} (\S+)$')


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Our model's series: (name, labels other than model/version) -> value."""
    with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[tuple[str, frozenset], float] = {}
    for line in text.splitlines():
        m = LINE.match(line)
        if not m or not m.group(1).startswith("tgi_"):
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2)))
        if labels.pop("model", None) != "tgi_llm" or labels.pop("version", None) != "1":
            continue
        out[(m.group(1), frozenset(labels.items()))] = float(m.group(3))
    return out


def value(series: dict, name: str, **labels: str) -> float:
    return series.get((name, frozenset(labels.items())), 0.0)


def is_idle(s: dict) -> bool:
    return (value(s, "tgi_queue_size"), value(s, "tgi_batch_current_size"),
            value(s, "tgi_kv_cache_blocks_used")) == (0, 0, 0)


def wait_idle(url: str) -> dict:
    deadline = time.monotonic() + WAIT
    while not is_idle(series := scrape(url)):
        assert time.monotonic() < deadline, f"metrics never came back to idle: {series}"
        time.sleep(0.1)
    return series


def test_gauges_move_under_load_and_return_to_idle(server):
    before = wait_idle(server.metrics_url)
    total = value(before, "tgi_kv_cache_blocks_total")
    assert total > 0 and value(before, "tgi_kv_cache_blocks_free") == total  # cached free blocks count as free

    # a watcher scrapes throughout: the gauges go out at most every 0.1 s while the engine runs, and a fast
    # machine ends the whole load within a few of those, so a scrape between responses can miss it
    samples: list[dict] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            samples.append(scrape(server.metrics_url))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch, daemon=True)  # a failed assertion must not leave it running
    watcher.start()
    try:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        responses: queue.SimpleQueue = queue.SimpleQueue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("tgi_llm", build_inputs("a long story about metrics", stream=True, max_tokens=400,
                                                          sampling_parameters={"ignore_eos": True}),
                                  enable_empty_final_response=True)
        result, error = responses.get(timeout=WAIT)  # the long request is running
        assert error is None
        short = [threading.Thread(target=TGITritonClient(server.grpc_url).generate, args=(f"short {i}",),
                                  kwargs=dict(max_tokens=8, sampling_parameters={"ignore_eos": True}))
                 for i in range(3)]
        for t in short:
            t.start()
        while not result.get_response().parameters["triton_final_response"].bool_param:
            result, error = responses.get(timeout=WAIT)
            assert error is None
        client.stop_stream()
        client.close()
        for t in short:
            t.join(WAIT)
    finally:
        stop.set()
        watcher.join(WAIT)
    busy = [s for s in samples
            if value(s, "tgi_batch_current_size") >= 1 and value(s, "tgi_kv_cache_blocks_used") >= 1]
    assert busy, f"batch size and KV blocks used never moved in {len(samples)} scrapes while requests ran"
    # each gauge is set on its own, so a scrape can fall between two of them; most cannot
    sums = [value(s, "tgi_kv_cache_blocks_free") + value(s, "tgi_kv_cache_blocks_used") for s in busy]
    assert total in sums, f"free + used never {total} in {len(busy)} busy scrapes: {sums}"
    with pytest.raises(InferenceServerException, match="must have less than"):
        TGITritonClient(server.grpc_url).generate("word " * 200, max_tokens=2)

    after = wait_idle(server.metrics_url)
    assert value(after, "tgi_kv_cache_blocks_free") == total

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("tgi_request_success") == 4
    assert grew("tgi_request_failure", err="validation") == 1
    assert grew("tgi_request_count") == 5
    for histogram in ("tgi_request_duration", "tgi_request_queue_duration", "tgi_request_inference_duration",
                      "tgi_request_time_to_first_token_duration", "tgi_request_input_length"):
        assert grew(f"{histogram}_count") == 4, histogram
    assert grew("tgi_request_generated_tokens_sum") == 400 + 3 * 8
    assert grew("tgi_generated_tokens_total") == 400 + 3 * 8
    assert grew("tgi_request_inter_token_duration_count") == 399 + 3 * 7
    assert grew("tgi_prompt_tokens_total") > 0
    # the shared server speculates (--speculate 4): a 400-token greedy run of the tiny model repeats itself
    assert 0 < grew("tgi_spec_decode_accepted_tokens_total") <= grew("tgi_spec_decode_draft_tokens_total")
    assert grew("tgi_request_duration_sum") > 0
    assert 0 <= value(after, "tgi_prefix_cache_hit_rate") <= 1
