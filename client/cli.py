"""`tgi-triton generate "prompt" [--stream]`: one request over Triton's gRPC stream, tokens printed as they come."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

DEFAULT_URL = "127.0.0.1:8001"  # as client.grpc_client (not imported here: the CLI parser needs no tritonclient)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the prompt text")
    parser.add_argument("--url", default=DEFAULT_URL, help="Triton's gRPC endpoint")
    parser.add_argument("--model", default="tgi_llm", help="tgi_llm, or ensemble")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=None, help="a stop sequence (repeatable)")
    parser.add_argument("--parameters", default=None, help="more TGI parameters, as a JSON object")


def sampling_parameters(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = json.loads(args.parameters) if args.parameters else {}
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"):
        value = getattr(args, name)
        if value is not None:
            params[name] = value
    return params


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    from client.grpc_client import TGITritonClient

    client = TGITritonClient(args.url, args.model)
    params = sampling_parameters(args)
    reason = None
    try:
        for delta in client.generate_stream(args.prompt, stream=args.stream, sampling_parameters=params,
                                            exclude_input_in_output=True):
            out.write(delta.text)
            out.flush()
            reason = delta.finish_reason or reason
    except KeyboardInterrupt:  # leaving the loop cancelled the request
        out.write("\n")
        return 130
    except Exception as exc:  # noqa: BLE001 - a server error is printed, not a traceback
        print(f"\ntgi-triton generate: {exc}", file=sys.stderr)
        return 1
    out.write("\n")
    out.flush()
    if reason:
        print(f"[finish_reason: {reason}]", file=sys.stderr)
    return 0
