"""gRPC streaming against the real server: concurrent streams, cancellation, errors, KV stats."""
from __future__ import annotations

import queue
import time

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from client.grpc_client import TGITritonClient, build_inputs
from client.grpc_client import kv_stats

pytestmark = pytest.mark.e2e
WAIT = 120.0  # bound for a hung server, not a timing assertion


def _open_stream(url: str, prompt: str, **kwargs) -> tuple[grpcclient.InferenceServerClient, queue.SimpleQueue]:
    client = grpcclient.InferenceServerClient(url)
    responses: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer("tgi_llm", build_inputs(prompt, stream=True, **kwargs),
                              enable_empty_final_response=True)
    return client, responses


def _drain(responses: queue.SimpleQueue) -> tuple[str, list[int], str]:
    text, ids, reason = [], [], ""
    while True:
        result, error = responses.get(timeout=WAIT)
        assert error is None, error
        if result.as_numpy("text_output") is not None:
            text.append(result.as_numpy("text_output")[0].decode())
            ids.extend(int(i) for i in result.as_numpy("output_ids"))
            reason = result.as_numpy("finish_reason")[0].decode() or reason
        if result.get_response().parameters["triton_final_response"].bool_param:
            return "".join(text), ids, reason


def test_concurrent_streams_one_cancelled_and_blocks_come_back(server):
    free, total = kv_stats(server.grpc_url)
    assert free == total > 0
    params = {"ignore_eos": True}
    cancelled, cancelled_responses = _open_stream(server.grpc_url, "tell me a very long story",
                                                  max_tokens=400, sampling_parameters=params)
    others = [_open_stream(server.grpc_url, f"prompt number {i}", max_tokens=16, sampling_parameters=params)
              for i in range(3)]
    first, error = cancelled_responses.get(timeout=WAIT)  # it is running: cancel it mid-way
    assert error is None and len(first.as_numpy("output_ids")) >= 1
    cancelled.stop_stream(cancel_requests=True)
    cancelled.close()
    for client, responses in others:
        text, ids, reason = _drain(responses)
        assert len(ids) == 16 and reason == "length" and text
        client.stop_stream()
        client.close()
    deadline = time.monotonic() + WAIT  # cancellation is polled: wait for the pool to be whole
    while kv_stats(server.grpc_url)[0] != total:
        assert time.monotonic() < deadline, "KV blocks of the cancelled request never came back"
        time.sleep(0.1)


def test_stream_matches_whole_response_and_reports_counts(server):
    client = TGITritonClient(server.grpc_url)
    kwargs = dict(max_tokens=12, sampling_parameters={"ignore_eos": True, "temperature": 0},
                  extra_bools={"return_num_input_tokens": True, "return_num_output_tokens": True})
    streamed = client.generate("Hello world", **kwargs)
    assert streamed.finish_reason == "length" and len(streamed.token_ids) == 12
    assert streamed.num_output_tokens == 12 and streamed.num_input_tokens > 0

    whole = client.generate("Hello world", stream=False, max_tokens=12, sampling_parameters={"ignore_eos": True})
    assert whole.text == "Hello world" + streamed.text and whole.token_ids == streamed.token_ids

    # vLLM's stream_interval as a request parameter: the same tokens in responses of 5 (the first alone)
    deltas = list(client.generate_stream("Hello world", max_tokens=12,
                                         sampling_parameters={"ignore_eos": True, "stream_interval": 5}))
    assert [len(d.token_ids) for d in deltas] == [1, 5, 5, 1]
    assert "".join(d.text for d in deltas) == streamed.text


def test_leaving_the_client_loop_cancels(server):
    client = TGITritonClient(server.grpc_url)
    total = kv_stats(server.grpc_url)[1]
    for n, _ in enumerate(client.generate_stream("again and again", max_tokens=400,
                                                 sampling_parameters={"ignore_eos": True})):
        if n == 2:
            break
    deadline = time.monotonic() + WAIT
    while kv_stats(server.grpc_url)[0] != total:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_tokens=0), "`max_new_tokens` must be strictly positive"),
        (dict(max_tokens=511), "`inputs` tokens + `max_new_tokens` must be <="),
        (dict(sampling_parameters={"no_such_knob": 1}), "unknown parameter `no_such_knob`"),
        (dict(sampling_parameters={"temperature": -1}), "`temperature` must be strictly positive"),
    ],
)
def test_bad_requests_fail_clearly_and_the_server_keeps_serving(server, kwargs, message):
    client = TGITritonClient(server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        client.generate("hello", **kwargs)
    assert message in str(info.value) and "Input validation error" in str(info.value)
    assert len(client.generate("hello", max_tokens=2).token_ids) <= 2


def test_prompt_errors_and_wrong_types(server):
    client = TGITritonClient(server.grpc_url)
    with pytest.raises(InferenceServerException, match="cannot be empty"):
        client.generate("", max_tokens=2)
    with pytest.raises(InferenceServerException, match="must have less than"):
        client.generate("word " * 200, max_tokens=2)
    def infer(inputs):
        return list(client.responses(inputs))

    bad = grpcclient.InferInput("max_tokens", [1], "INT64")  # the model declares INT32
    bad.set_data_from_numpy(np.array([3], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="expects .INT32."):
        infer(build_inputs("hi", stream=False)[:1] + [bad])
    malformed = grpcclient.InferInput("sampling_parameters", [1], "BYTES")
    malformed.set_data_from_numpy(np.array([b"{not json"], dtype=np.object_))
    with pytest.raises(InferenceServerException, match="not valid JSON"):
        infer(build_inputs("hi", stream=False)[:1] + [malformed])
    with pytest.raises(InferenceServerException, match="give `text_input` or `input_ids`"):
        flag = grpcclient.InferInput("stream", [1], "BOOL")
        flag.set_data_from_numpy(np.array([False]))
        infer([flag])
    assert len(client.generate("still alive", max_tokens=3).token_ids) <= 3


def test_overload_is_refused_clearly_then_cancelled_requests_free_the_pool(server):
    total = kv_stats(server.grpc_url)[1]
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.SimpleQueue = queue.SimpleQueue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    for i in range(20):  # the server admits 16 (--max-concurrent-requests)
        client.async_stream_infer("tgi_llm", build_inputs(f"load {i}", stream=True, max_tokens=400,
                                                          sampling_parameters={"ignore_eos": True}),
                                  request_id=str(i), enable_empty_final_response=True)
    refused = set()
    while len(refused) < 4:
        result, error = responses.get(timeout=WAIT)
        if error is not None:
            assert "Model is overloaded" in str(error)
            refused.add(error)
    client.stop_stream(cancel_requests=True)
    client.close()
    deadline = time.monotonic() + WAIT
    while kv_stats(server.grpc_url)[0] != total:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert len(TGITritonClient(server.grpc_url).generate("after the storm", max_tokens=2).token_ids) <= 2
