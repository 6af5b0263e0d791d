"""OpenAI request bodies -> TGI parameters, and tokens -> OpenAI's objects, as TGI maps them."""
from __future__ import annotations

import time
from typing import Any, Mapping

from tgi_backend.errors import TGIError
from tgi_backend.frontend.errors import BatchSizeError, validation
from tgi_backend.frontend.generation import Outcome
from tgi_backend.frontend.model import VERSION, ServedModel

FINGERPRINT = f"{VERSION}-native"


class SuffixError(TGIError):
    error_type = "suffix not supported"
    http_status = 422


def finish_reason(reason: str) -> str:
    """TGI's FinishReason.format(use_stop=true): eos_token is reported as "stop"."""
    return "stop" if reason == "eos_token" else reason


def _number(body: Mapping[str, Any], name: str, kind: type = float) -> Any:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not float(value).is_integer()):
        raise validation(f"`{name}` must be a number, got {value!r}")
    return kind(value)


def _stop(body: Mapping[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise validation("`stop` must be a string or a list of strings")
    return stop or None


def sampling(body: Mapping[str, Any], served: ServedModel) -> dict[str, Any]:
    """What chat and completions share: temperature 0 is greedy, else TGI's chat samples."""
    temperature = _number(body, "temperature")
    do_sample = temperature != 0
    max_tokens = _number(body, "max_completion_tokens", int)
    if max_tokens is None:
        max_tokens = _number(body, "max_tokens", int)
    params: dict[str, Any] = {
        "do_sample": do_sample,
        "temperature": temperature if do_sample else None,
        "max_new_tokens": max_tokens,
        "frequency_penalty": _number(body, "frequency_penalty"),
        "top_p": _number(body, "top_p"),
        "seed": _number(body, "seed", int),
        "stop": _stop(body),
        "adapter_id": adapter_id(body.get("model"), served),
        "details": True,
    }
    return {k: v for k, v in params.items() if v is not None}


def adapter_id(model: Any, served: ServedModel) -> str | None:
    """With adapters configured, a `model` other than the served model's names is a LoRA adapter (TGI)."""
    if not served.lora or not isinstance(model, str) or model in served.names():
        return None
    return model


def chat_parameters(body: Mapping[str, Any], served: ServedModel) -> dict[str, Any]:
    params = sampling(body, served)
    presence = _number(body, "presence_penalty")
    if presence is not None:
        params["repetition_penalty"] = presence + 2.0  # TGI's mapping
    if body.get("logprobs"):
        top = _number(body, "top_logprobs", int)
        if top:
            params["top_n_tokens"] = top
    if body.get("response_format") is not None:
        raise validation("grammar is not supported")
    if body.get("tools") and body.get("tool_choice") != "none":
        raise validation("tools are not supported")
    return params


def completion_parameters(body: Mapping[str, Any], served: ServedModel) -> dict[str, Any]:
    if body.get("suffix") is not None:
        raise SuffixError("Suffix is not supported and can be achieved by preprocessing the prompt.")
    params = sampling(body, served)
    penalty = _number(body, "repetition_penalty")
    if penalty is not None:
        params["repetition_penalty"] = penalty
    return params


def choices_count(body: Mapping[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise validation("`n` must be a positive integer")
    return n


def prompts(body: Mapping[str, Any], max_batch: int) -> list[str]:
    prompt = body.get("prompt")
    items = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(items, list) or not items or not all(isinstance(p, str) for p in items):
        raise validation("`prompt` must be a string or a non-empty list of strings")
    if len(items) > max_batch:
        raise BatchSizeError(f"Number of prompts exceeds the maximum allowed batch size of {max_batch}")
    return items


def messages(body: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Messages for the chat template: content chunks joined into text; images refused."""
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise validation("`messages` must be a non-empty list")
    out = []
    for message in raw:
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise validation("each message needs a `role`")
        item = dict(message)
        item["content"] = _content(message.get("content"))
        out.append(item)
    return out


def _content(content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for chunk in content:
            if not isinstance(chunk, Mapping) or chunk.get("type") != "text" or not isinstance(chunk.get("text"), str):
                raise validation("only text content chunks are supported")
            parts.append(chunk["text"])
        return "".join(parts)
    raise validation("`content` must be a string or a list of chunks")


def envelope(kind: str, model: str) -> dict[str, Any]:
    return {"object": kind, "id": "", "created": int(time.time()), "model": model, "system_fingerprint": FINGERPRINT}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_logprobs(tokens: list[dict[str, Any]], top_tokens: list[list[dict[str, Any]]]) -> dict[str, Any]:
    content = []
    for token, top in zip(tokens, top_tokens or [[]] * len(tokens)):
        content.append({
            "token": token["text"],
            "logprob": token.get("logprob") or 0.0,
            "top_logprobs": [{"token": t["text"], "logprob": t.get("logprob") or 0.0} for t in top or []],
        })
    return {"content": content}


def chat_completion(model: str, outcomes: list[Outcome], want_logprobs: bool) -> dict[str, Any]:
    body = envelope("chat.completion", model)
    body["choices"] = [
        {
            "index": i,
            "message": {"role": "assistant", "content": o.text},
            "logprobs": chat_logprobs(o.tokens, o.top_tokens) if want_logprobs else None,
            "finish_reason": finish_reason(o.finish_reason),
        }
        for i, o in enumerate(outcomes)
    ]
    body["usage"] = usage(outcomes[0].input_length, sum(o.generated_tokens for o in outcomes))
    return body


def completion(model: str, outcomes: list[Outcome]) -> dict[str, Any]:
    body = envelope("text_completion", model)
    body["choices"] = [
        {"index": i, "text": o.text, "logprobs": None, "finish_reason": finish_reason(o.finish_reason)}
        for i, o in enumerate(outcomes)
    ]
    body["usage"] = usage(sum(o.input_length for o in outcomes), sum(o.generated_tokens for o in outcomes))
    return body
