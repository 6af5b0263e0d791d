from __future__ import annotations

import json

import numpy as np
import pytest

from tgi_backend.engine.request import SamplingParams
from tgi_backend.errors import ValidationError
from tgi_backend.sampling.params import (
    FIELDS,
    ValidationLimits,
    parse_request_parameters,
    parse_sampling_parameters,
)

P = "Input validation error: "


def rejects(message: str, raw=None, **kw) -> None:
    with pytest.raises(ValidationError) as info:
        parse_request_parameters(raw, **kw)
    assert str(info.value) == P + message


def test_defaults_are_greedy_without_limits() -> None:
    for raw in (None, "", "  ", "{}", {}):
        assert parse_sampling_parameters(raw) == SamplingParams()


def test_tgi_names() -> None:
    sp = parse_sampling_parameters(
        {"do_sample": True, "max_new_tokens": 20, "temperature": 0.5, "top_k": 10, "top_p": 0.9, "seed": 7}
    )
    assert sp == SamplingParams(do_sample=True, temperature=0.5, top_k=10, top_p=0.9, seed=7, max_new_tokens=20)


def test_vllm_names_as_json() -> None:
    raw = json.dumps({"max_tokens": 16, "ignore_eos": True, "top_k": -1, "top_p": 1.0, "n": 1, "temperature": 1})
    sp = parse_sampling_parameters(raw)
    assert sp == SamplingParams(max_new_tokens=16, ignore_eos=True)


@pytest.mark.parametrize(
    "given, sampling",
    [
        ({"do_sample": True}, True),
        ({"temperature": 0.7}, True),
        ({"temperature": 1.0}, False),
        ({"top_k": 5}, True),
        ({"top_k": -1}, False),
        ({"top_p": 0.5}, True),
        ({"top_p": 1.0}, False),
        ({"typical_p": 0.5}, True),
        ({"temperature": 0}, False),
        ({"temperature": 0.0, "do_sample": True, "top_p": 0.5}, False),  # OpenAI / vLLM: 0 is greedy
        ({"do_sample": False, "top_k": 3}, True),  # TGI: a warper switches sampling on
    ],
)
def test_when_sampling_is_on(given, sampling) -> None:
    sp = parse_sampling_parameters(given)
    assert sp.do_sample is sampling
    assert sp.temperature > 0


@pytest.mark.parametrize(
    "given, message",
    [
        ({"temperature": -0.1}, "`temperature` must be strictly positive"),
        ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_p": 1.5}, "`top_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0}, "`top_k` must be strictly positive"),
        ({"top_k": -5}, "`top_k` must be strictly positive"),
        ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
        ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
        ({"presence_penalty": 3}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
        ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
        ({"max_tokens": -3}, "`max_new_tokens` must be strictly positive"),
        ({"truncate": 0}, "`truncate` must be strictly positive"),
        ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
        ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
        ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
        ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
        ({"top_n_tokens": -1}, "`top_n_tokens` must be >= 0 and <= 5. Given: -1"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "`stop` supports up to 4 stop sequences. Given: 5"),
        ({"grammar": {"type": "json", "value": {}}}, "grammar is not supported"),
        ({"n": 2}, "you must use sampling when `best_of` is > 1"),  # vLLM's n is best_of
        ({"n": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
        ({"min_p": 1.5}, "`min_p` must be >= 0.0 and <= 1.0"),
        ({"seed": -1}, "`seed` must be >= 0 and < 2^64"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "`min_new_tokens` must be <= `max_new_tokens`"),
    ],
)
def test_tgi_messages(given, message) -> None:
    rejects(message, given)


def test_limits_change_the_messages() -> None:
    limits = ValidationLimits(max_best_of=4, max_stop_sequences=1, max_top_n_tokens=10, max_input_tokens=100)
    rejects("`truncate` must be strictly positive and less than 100. Given: 101", {"truncate": 101}, limits=limits)
    rejects("`truncate` must be strictly positive and less than 100. Given: 0", {"truncate": 0}, limits=limits)
    rejects("`stop` supports up to 1 stop sequences. Given: 2", {"stop": ["a", "b"]}, limits=limits)
    rejects("`top_n_tokens` must be >= 0 and <= 10. Given: 11", {"top_n_tokens": 11}, limits=limits)
    ok = parse_request_parameters(
        {"truncate": 100, "top_n_tokens": 10, "best_of": 4, "do_sample": True}, limits=limits
    )
    assert (ok.sampling.truncate, ok.sampling.top_n_tokens, ok.sampling.best_of) == (100, 10, 4)


def test_limits_from_engine_config() -> None:
    from tgi_backend.config import EngineConfig

    config = EngineConfig.from_strings({"model_id": "m", "max_input_tokens": "99", "max-stop-sequences": "2"})
    assert ValidationLimits.from_config(config) == ValidationLimits(max_stop_sequences=2, max_input_tokens=99)
    assert ValidationLimits.from_config(EngineConfig(model_id="m")) == ValidationLimits()


def test_streaming_refusals() -> None:
    rejects("`best_of` != 1 is not supported when streaming tokens", {"best_of": 2, "do_sample": True}, stream=True)
    rejects("`decoder_input_details` == true is not supported when streaming tokens",
            {"decoder_input_details": True}, stream=True)
    rejects("`decoder_input_details` == true is not supported: prefill logprobs are disabled "
            "(start the server with --enable-prefill-logprobs)", {"decoder_input_details": True})
    limits = ValidationLimits(enable_prefill_logprobs=True)
    assert parse_sampling_parameters({"decoder_input_details": True}, limits=limits).decoder_input_details


def test_unknown_key_is_named() -> None:
    rejects("unknown parameter `temprature`", {"temprature": 0.5})


@pytest.mark.parametrize("raw", ["{not json", "[1, 2]", "3", b"\xff"])
def test_malformed_json(raw) -> None:
    with pytest.raises(ValidationError, match="^Input validation error: `sampling_parameters`"):
        parse_sampling_parameters(raw)


@pytest.mark.parametrize(
    "given, message",
    [
        ({"temperature": "0.5"}, "`temperature` must be a number, got '0.5'"),
        ({"max_new_tokens": "20"}, "`max_new_tokens` must be an integer, got '20'"),
        ({"max_new_tokens": 2.5}, "`max_new_tokens` must be an integer, got 2.5"),
        ({"top_k": True}, "`top_k` must be an integer, got True"),
        ({"do_sample": "yes"}, "`do_sample` must be a boolean, got 'yes'"),
        ({"stop": [1]}, "`stop` must be a list of strings, got [1]"),
        ({"adapter_id": 3}, "`adapter_id` must be a string, got 3"),
        ({"temperature": float("nan")}, "`temperature` must be a number, got nan"),
    ],
)
def test_type_errors(given, message) -> None:
    rejects(message, given)


def test_nulls_mean_not_given_and_integral_floats_are_ints() -> None:
    sp = parse_sampling_parameters({"temperature": None, "top_p": None, "max_new_tokens": 20.0, "seed": None})
    assert sp == SamplingParams(max_new_tokens=20)


def test_plain_inputs_override_json() -> None:
    sp = parse_sampling_parameters('{"max_tokens": 10, "max_new_tokens": 10}', max_tokens=np.int32(3))
    assert sp.max_new_tokens == 3
    assert parse_sampling_parameters({"max_new_tokens": 10}, max_tokens=None).max_new_tokens == 10
    sp = parse_sampling_parameters({}, temperature=np.float32(0.5), ignore_eos=np.bool_(True))
    assert (sp.do_sample, sp.temperature, sp.ignore_eos) == (True, 0.5, True)


def test_tensors_must_hold_one_value() -> None:
    assert parse_sampling_parameters({}, max_tokens=np.array([[7]], dtype=np.int64)).max_new_tokens == 7
    with pytest.raises(ValidationError, match="`max_tokens` must be an integer"):
        parse_sampling_parameters({}, max_tokens=np.array([1, 2]))


def test_disagreeing_aliases() -> None:
    rejects("`max_tokens` and `max_new_tokens` are the same parameter and disagree",
            {"max_tokens": 4, "max_new_tokens": 5})


def test_generation_parameters_reach_sampling_params() -> None:
    given = {
        "repetition_penalty": 1.1, "frequency_penalty": 0.5, "presence_penalty": -0.5, "typical_p": 0.9,
        "stop": "end", "truncate": 8, "watermark": True, "details": True, "return_full_text": False,
        "top_n_tokens": 2, "min_p": 0.1, "min_tokens": 1, "lora_name": "ad", "stop_token_ids": [5],
        "logprobs": 1, "skip_special_tokens": False,
    }
    result = parse_request_parameters(given)
    sp = result.sampling
    assert sp.do_sample  # typical_p < 1 switches sampling on, as in TGI
    assert sp.stop == ("end",) and sp.min_new_tokens == 1 and sp.stop_token_ids == (5,)
    assert (sp.repetition_penalty, sp.frequency_penalty, sp.presence_penalty) == (1.1, 0.5, -0.5)
    assert (sp.typical_p, sp.min_p, sp.truncate, sp.top_n_tokens) == (0.9, 0.1, 8, 2)
    assert sp.watermark and sp.details and sp.return_full_text is False and sp.wants_details
    # what SamplingParams has no field for stays in options
    assert sp.adapter_id == "ad"  # lora_name is TGI's adapter_id
    assert result.options == {"logprobs": 1, "skip_special_tokens": False}


def test_field_registry_is_consistent() -> None:
    for name, spec in FIELDS.items():
        assert spec.canonical is None or FIELDS[spec.canonical].canonical is None, name
