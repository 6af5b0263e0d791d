"""The HTTP front's pure parts: parameter mapping (TGI and OpenAI), error mapping, request tensors, metrics."""
from __future__ import annotations

import struct

import pytest

from tgi_backend.errors import GenerationError, OverloadedError, ValidationError
from tgi_backend.frontend import openai_mapping as oa
from tgi_backend.frontend.bridge import FRONT_OUTPUTS, TritonRequest, build_request, decode_outputs, error_from_message
from tgi_backend.frontend.errors import BatchSizeError, openai_body, tgi_body
from tgi_backend.frontend.generation import Outcome, Piece, Timing, forwarded_parameters
from tgi_backend.frontend.metrics import FrontMetrics
from tgi_backend.frontend.model import ServedModel
from tgi_backend.frontend.sse import frame


def served(lora: bool = False) -> ServedModel:
    return ServedModel("org/model", None, 48, 512, 16, 2, 4, 5, lora=lora)


def test_forwarded_parameters_keep_tgi_keys_drop_nulls_and_unknowns():
    given = {"max_new_tokens": 5, "temperature": None, "stop": [], "return_full_text": True,
             "decoder_input_details": False, "made_up": 1, "top_n_tokens": 2}
    assert forwarded_parameters(given) == {"max_new_tokens": 5, "decoder_input_details": False,
                                           "top_n_tokens": 2, "details": True}
    assert forwarded_parameters(None) == {"details": True}
    with pytest.raises(ValidationError, match="`parameters` must be an object"):
        forwarded_parameters([1])


def test_chat_parameters_follow_tgi():
    body = {"temperature": 0, "presence_penalty": 0.5, "frequency_penalty": 0.1, "max_completion_tokens": 7,
            "max_tokens": 99, "logprobs": True, "top_logprobs": 3, "seed": 4, "stop": "x", "model": "tgi"}
    params = oa.chat_parameters(body, served())
    assert params == {"do_sample": False, "max_new_tokens": 7, "frequency_penalty": 0.1, "seed": 4,
                      "stop": ["x"], "repetition_penalty": 2.5, "top_n_tokens": 3, "details": True}
    sampled = oa.chat_parameters({"temperature": 0.7, "max_tokens": 3}, served())
    assert sampled["do_sample"] is True and sampled["temperature"] == 0.7 and sampled["max_new_tokens"] == 3
    assert oa.chat_parameters({}, served())["do_sample"] is True  # TGI's chat samples by default
    assert "top_n_tokens" not in oa.chat_parameters({"top_logprobs": 3}, served())  # only with logprobs


def test_model_names_an_adapter_only_when_adapters_are_configured():
    assert "adapter_id" not in oa.chat_parameters({"model": "my-lora"}, served(lora=False))
    assert oa.chat_parameters({"model": "my-lora"}, served(lora=True))["adapter_id"] == "my-lora"
    for base in ("tgi", "dummy", "org/model", "model", ""):
        assert "adapter_id" not in oa.chat_parameters({"model": base}, served(lora=True))


def test_chat_refusals_and_messages():
    with pytest.raises(ValidationError, match="grammar is not supported"):
        oa.chat_parameters({"response_format": {"type": "json"}}, served())
    with pytest.raises(ValidationError, match="`temperature` must be a number"):
        oa.chat_parameters({"temperature": "hot"}, served())
    chunks = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert oa.messages(chunks) == [{"role": "user", "content": "ab"}]
    with pytest.raises(ValidationError):
        oa.messages({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]})
    with pytest.raises(ValidationError):
        oa.messages({"messages": []})
    assert oa.choices_count({"n": 3}) == 3
    with pytest.raises(ValidationError):
        oa.choices_count({"n": 0})


def test_completion_refusals():
    with pytest.raises(oa.SuffixError) as err:
        oa.completion_parameters({"prompt": "a", "suffix": "b"}, served())
    assert err.value.http_status == 422 and "Suffix is not supported" in str(err.value)
    with pytest.raises(BatchSizeError) as err:
        oa.prompts({"prompt": ["a"] * 5}, 4)
    assert tgi_body(err.value) == {"error": "Number of prompts exceeds the maximum allowed batch size of 4",
                                   "error_type": "batch size exceeded"}
    assert oa.prompts({"prompt": "a"}, 4) == ["a"]
    assert oa.completion_parameters({"repetition_penalty": 1.2}, served())["repetition_penalty"] == 1.2


def test_finish_reasons_and_objects():
    assert oa.finish_reason("eos_token") == "stop"
    assert oa.finish_reason("length") == "length"
    outcome = Outcome(text="hi", tokens=[{"id": 1, "text": "hi", "logprob": -0.5, "special": False}],
                      top_tokens=[[{"id": 1, "text": "hi", "logprob": -0.5, "special": False}]],
                      finish_reason="eos_token", input_length=3)
    body = oa.chat_completion("m", [outcome, outcome], want_logprobs=True)
    assert body["object"] == "chat.completion" and body["system_fingerprint"].endswith("-native")
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["logprobs"]["content"][0]["top_logprobs"] == [{"token": "hi", "logprob": -0.5}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    text = oa.completion("m", [outcome])
    assert text["object"] == "text_completion" and text["choices"][0]["text"] == "hi"


def test_details_omit_empty_top_tokens_and_best_of():
    outcome = Outcome()
    outcome.add(Piece("a", [{"id": 5, "text": "a", "logprob": -1.0, "special": False}], [[]], "", 4, 1))
    outcome.add(Piece("b", [{"id": 6, "text": "b", "logprob": -2.0, "special": False}], [[]], "length", 4, 2,
                      {"finish_reason": "length", "generated_tokens": 2, "seed": 9, "prefill": []}))
    details = outcome.details()
    assert outcome.text == "ab" and outcome.input_length == 4
    assert set(details) == {"finish_reason", "generated_tokens", "seed", "prefill", "tokens"}
    assert details["generated_tokens"] == 2 and details["seed"] == 9


def test_tgi_llm_errors_map_to_tgi_codes():
    v = error_from_message("in tgi_llm: Input validation error: `top_p` must be > 0.0 and < 1.0")
    assert isinstance(v, ValidationError) and str(v) == "Input validation error: `top_p` must be > 0.0 and < 1.0"
    assert v.http_status == 422
    o = error_from_message("Model is overloaded")
    assert isinstance(o, OverloadedError) and o.http_status == 429 and tgi_body(o)["error_type"] == "overloaded"
    g = error_from_message("boom")
    assert isinstance(g, GenerationError) and g.http_status == 424
    assert str(g) == "Request failed during generation: boom"
    assert openai_body(v)["error"]["message"] == str(v)


def test_request_tensors():
    req = TritonRequest("héllo", '{"details": true}', True, {"exclude_input_in_output": True})
    msg = build_request("tgi_llm", "7", req)
    names = [t.name for t in msg.inputs]
    assert names == ["text_input", "sampling_parameters", "stream", "exclude_input_in_output"]
    raw = msg.raw_input_contents[0]
    assert struct.unpack("<I", raw[:4])[0] == len("héllo".encode()) and raw[4:].decode() == "héllo"
    assert msg.raw_input_contents[2] == b"\x01"
    assert msg.parameters["triton_enable_empty_final_response"].bool_param
    assert not msg.outputs  # no outputs named: tgi_llm sends them all
    asked = build_request("tgi_llm", "8", TritonRequest("x", "{}", True, outputs=FRONT_OUTPUTS))
    assert [o.name for o in asked.outputs] == list(FRONT_OUTPUTS)


def test_decode_outputs_reads_raw_contents_as_tritonclient_does():
    import numpy as np
    from tritonclient.grpc import InferResult, service_pb2

    response = service_pb2.ModelInferResponse(model_name="tgi_llm")
    values = {"text_output": ("BYTES", "Ünï ✓".encode()), "details": ("BYTES", b'{"tokens":[]}'),
              "num_input_tokens": ("INT32", struct.pack("<i", 7)), "output_ids": ("INT32", struct.pack("<3i", 5, -1, 9))}
    for name, (datatype, raw) in values.items():
        response.outputs.add(name=name, datatype=datatype, shape=[len(raw) // 4 if datatype == "INT32" else 1])
        response.raw_output_contents.append(struct.pack("<I", len(raw)) + raw if datatype == "BYTES" else raw)
    out = decode_outputs(response)
    assert out == {"text_output": "Ünï ✓", "details": '{"tokens":[]}', "num_input_tokens": [7], "output_ids": [5, -1, 9]}
    reference = InferResult(response)
    assert reference.as_numpy("text_output")[0].decode() == out["text_output"]
    assert np.array_equal(reference.as_numpy("output_ids"), out["output_ids"])


def test_sse_frame_has_no_space_after_data():
    assert frame({"a": "é"}) == 'data:{"a":"é"}\n\n'.encode()


def test_timing_headers():
    timing = Timing(start=0.0, end=0.5)
    headers = timing.headers(11, 3, 5)
    assert headers["x-compute-time"] == "0.500000" and headers["x-time-per-token"] == "100"
    assert headers["x-prompt-tokens"] == "3" and headers["x-generated-tokens"] == "5"
    assert headers["x-compute-characters"] == "11" and headers["x-total-time"] == "500"


def test_metrics_merge_into_tritons_families():
    metrics = FrontMetrics()
    metrics.request_started(10)
    metrics.request_ended("success", Timing(start=0.0, end=0.2), 4, 10)
    metrics.request_started(None)
    metrics.request_ended("validation", Timing(start=0.0, end=0.1), 0, 0)
    triton = ("# HELP nv_inference_count x\n# TYPE nv_inference_count counter\nnv_inference_count{model=\"a\"} 1\n"
              "# HELP tgi_request_count y\n# TYPE tgi_request_count counter\ntgi_request_count{model=\"tgi_llm\"} 3\n")
    text = metrics.render(triton)
    assert text.count("# TYPE tgi_request_count") == 1  # one family block, samples merged
    assert 'tgi_request_count{source="http"} 2' in text
    assert 'tgi_request_failure{source="http",err="validation"} 1' in text
    assert 'tgi_request_generated_tokens_count{source="http"} 1' in text
    lines = text.splitlines()
    assert lines.index('tgi_request_count{source="http"} 2') == lines.index('tgi_request_count{model="tgi_llm"} 3') + 1
    types = [line.split()[2] for line in lines if line.startswith("# TYPE")]
    assert len(types) == len(set(types))


def test_cli_front_flags():
    from tgi_backend.frontend.process import frontend_command
    from tgi_backend.launcher.cli import frontend_settings, parse_args

    env = {"HOSTNAME": "box-123", "API_KEY": "k", "PAYLOAD_LIMIT": "10"}
    args = parse_args(["frontend", "--triton-url", "h:9", "--port", "3100"], env)
    settings = frontend_settings(args)
    assert (settings.triton_url, settings.port, settings.host) == ("h:9", 3100, "0.0.0.0")  # HOSTNAME ignored
    assert settings.api_key == "k" and settings.payload_limit == 10 and settings.max_client_batch_size == 4
    assert settings.triton_metrics_url() == "http://h:8002/metrics"
    cmd = frontend_command(settings)
    assert "k" not in cmd and cmd[cmd.index("--port") + 1] == "3100"  # the key travels in the environment
    serve = parse_args(["serve", "--no-frontend"], {})
    assert serve.no_frontend and serve.port == 3000
    generate = parse_args(["generate", "hi", "--stream", "--max-new-tokens", "3"], {})
    from client.cli import sampling_parameters

    assert generate.stream and sampling_parameters(generate) == {"max_new_tokens": 3}
