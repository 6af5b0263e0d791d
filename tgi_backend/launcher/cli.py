"""`tgi-triton serve | build-repo`: TGI's launcher flags, rendered into a Triton model repository.

Every flag can also be given as the upper-case environment variable of the same name (TGI does that);
`read_env` is the one place that reads the environment.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

from tgi_backend.config import DTYPES, EngineConfig

if TYPE_CHECKING:
    from tgi_backend.frontend.state import FrontendSettings

# (flag, type, default, help); the env var is the flag upper-cased with dashes as underscores.
_ENGINE_FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("model-id", str, "demo", 'hub id or local folder; "demo" is the built-in random-weight demo model'),
    ("revision", str, None, "hub revision (branch, tag or commit)"),
    ("dtype", str, "auto", f"one of {', '.join(DTYPES)}"),
    ("max-input-tokens", int, 0, "0: max-total-tokens - 1"),
    ("max-total-tokens", int, 0, "0: min(max_position_embeddings, 4096)"),
    ("max-batch-prefill-tokens", int, 0, "per-step token budget; 0: derived"),
    ("max-batch-total-tokens", int, 0, "KV pool size in tokens; 0: derived"),
    ("max-concurrent-requests", int, 128, "requests in flight before 'Model is overloaded'"),
    ("block-size", int, 16, "tokens per KV block"),
    ("num-threads", int, 0, "torch intra-op threads; 0: torch's default"),
    ("max-stop-sequences", int, 4, "most `stop` strings in one request"),
    ("max-top-n-tokens", int, 5, "largest `top_n_tokens`"),
    ("max-best-of", int, 2, "largest `best_of`"),
    ("watermark-gamma", float, 0.5, "share of the vocabulary in each step's green list (watermark)"),
    ("watermark-delta", float, 2.0, "logit bias of green tokens (watermark)"),
    ("enable-prefill-logprobs", bool, False, "allow `decoder_input_details` (prompt logprobs)"),
    ("enable-prefix-caching", bool, True, "reuse the KV blocks of prompt prefixes served before"),
    ("stream-coalescing", bool, False, "under load, a stream's queued tokens leave as one response (the "
     "response thread also runs at nice 10); off: one response per token, as TGI"),
    ("stream-interval", int, 1, "a stream's tokens leave in responses of N (vLLM's --stream-interval; the first and "
     "the last at once); a request's `stream_interval` can raise it; 1: one response per token, as TGI"),
    ("stream-budget", int, -1, "streamed responses per second, all streams together; past it each stream sends "
     "at most one response per (streams / N) seconds, and at most 60 a second, its tokens grouped (the first and "
     "the last at once): each response is an IPC round trip through tritonserver and a gRPC message, 0.2-0.4 ms of "
     "CPU; 0: one response per token, as TGI; -1: 125 per CPU core"),
    ("inter-token-metrics", bool, False, "report tgi_request_inter_token_duration, one sample per generated "
     "token; each sample costs a round trip to tritonserver, as much as a streamed response"),
    ("speculate", int, 0, "n-gram speculation (TGI's flag): up to N tokens proposed from the request's own "
     "earlier tokens, verified in one step (same outputs); helps small batches on repetitive text; 0: off"),
    ("decode-steps", int, 4, "multi-step decoding: while no request waits, plain greedy decode steps of up to 8 "
     "rows run up to N at a time, each token fed back natively, at most 12 ms of steps (same tokens; a stream's "
     "tokens arrive together; a request arriving meanwhile waits for them); 1: one step at a time"),
    ("cuda-graphs", str, "1,2,4,8,16,32", "GPU only: decode batch sizes replayed as CUDA graphs (TGI's flag); "
     "0: none"),
    ("quantize", str, None, "gptq, awq, marlin, exllama (from the checkpoint), eetq / bitsandbytes (int8), "
     "bitsandbytes-nf4 / -fp4 (int4), fp8, compressed-tensors; default: the checkpoint's quantization_config"),
    ("lora-adapters", str, None, "LoRA adapters to preload: name=path or hub id, comma-separated (TGI's syntax)"),
    ("lora-root", str, None, "folder of PEFT adapters loaded on first use by `adapter_id` (its subfolder name)"),
    ("max-loras", int, 8, "LoRA adapters loaded at once; past it the least recently used idle one is unloaded"),
)
_SERVER_FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("http-port", int, 8000, "Triton HTTP port"),
    ("grpc-port", int, 8001, "Triton gRPC port"),
    ("metrics-port", int, 8002, "Triton metrics port"),
    ("log-verbose", int, 0, "tritonserver --log-verbose level"),
    ("exit-timeout-secs", int, 10, "tritonserver --exit-timeout-secs"),
    ("ready-timeout-secs", int, 600, "how long to wait for the models to load"),
)
# The TGI/OpenAI HTTP front (tgi_backend.frontend); `serve` starts it beside tritonserver.
_FRONT_FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("port", int, 3000, "the TGI/OpenAI HTTP front's port"),
    ("hostname", str, "0.0.0.0", "the front's listen address (not read from the environment)"),
    ("api-key", str, None, "generation routes need `Authorization: Bearer <key>`"),
    ("payload-limit", int, 2_000_000, "largest request body in bytes (413 beyond)"),
    ("max-client-batch-size", int, 4, "most prompts in one /v1/completions request"),
)
_FRONT_ONLY_FLAGS: tuple[tuple[str, type, object, str], ...] = (
    ("triton-url", str, "127.0.0.1:8001", "Triton's gRPC endpoint"),
    ("metrics-url", str, None, "Triton's metrics URL (default: the gRPC host, port 8002)"),
    ("tokenizer", str, None, "a local tokenizer folder, if the model's folder is not readable here"),
)
ENV_TRITONSERVER = "TGI_TRITON_SERVER"


@dataclass(frozen=True, slots=True)
class ServerOptions:
    http_port: int
    grpc_port: int
    metrics_port: int
    log_verbose: int
    exit_timeout_secs: int
    ready_timeout_secs: int
    tritonserver: str | None


def env_name(flag: str) -> str:
    return flag.replace("-", "_").upper()


def read_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The flags' values found in the environment, keyed by flag name (the only env read of the CLI)."""
    environ = os.environ if environ is None else environ
    found: dict[str, str] = {}
    for flag, *_ in _ENGINE_FLAGS + _SERVER_FLAGS + _FRONT_FLAGS + _FRONT_ONLY_FLAGS + (("model-repository",),):
        if flag == "hostname":  # shells and containers set HOSTNAME to the machine's name
            continue
        value = environ.get(env_name(flag))
        if value not in (None, ""):
            found[flag] = value
    if environ.get(ENV_TRITONSERVER):
        found["tritonserver"] = environ[ENV_TRITONSERVER]
    return found


def build_parser(env: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tgi-triton", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="render the model repository and run tritonserver on it")
    build = sub.add_parser("build-repo", help="only write the model repository")
    front = sub.add_parser("frontend", help="run only the TGI/OpenAI HTTP front against a running Triton")
    _add_flags(front, _FRONT_FLAGS + _FRONT_ONLY_FLAGS, env)
    _add_flags(serve, _FRONT_FLAGS, env)
    serve.add_argument("--no-frontend", action="store_true", help="do not start the HTTP front")
    from client.cli import add_arguments

    add_arguments(sub.add_parser("generate", help="one request to a running server over gRPC, tokens printed"))
    for p, server in ((serve, True), (build, False)):
        flags = _ENGINE_FLAGS + (_SERVER_FLAGS if server else ())
        for flag, kind, default, text in flags:
            if kind is bool:  # --flag / --no-flag; its env var is true with 1/true/yes/on
                on = env[flag].lower() in ("1", "true", "yes", "on") if flag in env else default
                p.add_argument(
                    f"--{flag}", action=argparse.BooleanOptionalAction, default=on,
                    help=f"{text} [env {env_name(flag)}]",
                )
                continue
            value = kind(env[flag]) if flag in env else default
            p.add_argument(f"--{flag}", type=kind, default=value, help=f"{text} [env {env_name(flag)}]")
        repo = env.get("model-repository")
        p.add_argument(
            "--model-repository",
            default=repo,
            required=not server and repo is None,
            help="where to write the repository (serve: a temp dir by default) [env MODEL_REPOSITORY]",
        )
    serve.add_argument(
        "--tritonserver",
        default=env.get("tritonserver"),
        help=f"tritonserver binary [env {ENV_TRITONSERVER}; else PATH; else nvidia-pytriton's]",
    )
    return parser


def _add_flags(parser: argparse.ArgumentParser, flags: tuple[tuple[str, type, object, str], ...],
               env: Mapping[str, str]) -> None:
    for flag, kind, default, text in flags:
        value = kind(env[flag]) if flag in env else default
        parser.add_argument(f"--{flag}", type=kind, default=value, help=f"{text} [env {env_name(flag)}]")


def frontend_settings(args: argparse.Namespace, triton_url: str | None = None,
                      metrics_url: str | None = None) -> "FrontendSettings":
    from tgi_backend.frontend.state import FrontendSettings

    return FrontendSettings(
        triton_url=triton_url or args.triton_url,
        host=args.hostname,
        port=args.port,
        metrics_url=metrics_url or getattr(args, "metrics_url", None),
        api_key=args.api_key,
        payload_limit=args.payload_limit,
        max_client_batch_size=args.max_client_batch_size,
        tokenizer=getattr(args, "tokenizer", None),
    )


def parse_args(argv: Sequence[str] | None, environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    env = read_env(environ)
    try:
        return build_parser(env).parse_args(argv)
    except ValueError as exc:  # a malformed env value: say which one
        raise SystemExit(f"tgi-triton: bad environment value: {exc}") from exc


def engine_config(args: argparse.Namespace) -> EngineConfig:
    values = {flag.replace("-", "_"): getattr(args, flag.replace("-", "_")) for flag, *_ in _ENGINE_FLAGS}
    config = EngineConfig(**values)
    if config.dtype not in DTYPES:
        raise SystemExit(f"tgi-triton: --dtype must be one of {', '.join(DTYPES)}, got {config.dtype!r}")
    _check_quantize_and_lora(config)
    if config.lora_root:  # the model's process may run elsewhere: absolute path
        config = EngineConfig(**{**values, "lora_root": os.path.abspath(config.lora_root)})
    return config


def _check_quantize_and_lora(config: EngineConfig) -> None:
    """Flag syntax errors before tritonserver starts (the model loads the files later)."""
    if config.quantize:
        from tgi_backend.layers.quantization.base import TGI_QUANTIZE

        if config.quantize not in TGI_QUANTIZE:
            raise SystemExit(f"tgi-triton: --quantize must be one of {', '.join(sorted(TGI_QUANTIZE))}, "
                             f"got {config.quantize!r}")
    if config.lora_adapters:
        from tgi_backend.weights.adapters import parse_lora_adapters

        try:
            parse_lora_adapters(config.lora_adapters)
        except ValueError as exc:
            raise SystemExit(f"tgi-triton: {exc}") from exc
    if config.lora_root and not os.path.isdir(config.lora_root):
        raise SystemExit(f"tgi-triton: --lora-root {config.lora_root!r} is not a folder")


def server_options(args: argparse.Namespace) -> ServerOptions:
    return ServerOptions(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        log_verbose=args.log_verbose,
        exit_timeout_secs=args.exit_timeout_secs,
        ready_timeout_secs=args.ready_timeout_secs,
        tritonserver=args.tritonserver,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "generate":
        from client.cli import run as run_generate

        return run_generate(args)
    if args.command == "frontend":
        from tgi_backend.frontend.app import run

        return run(frontend_settings(args))
    config = engine_config(args)
    if args.command == "build-repo":
        return _build_repo(config, args.model_repository)
    front = None
    if not args.no_frontend:
        options = server_options(args)
        front = frontend_settings(args, f"127.0.0.1:{options.grpc_port}",
                                  f"http://127.0.0.1:{options.metrics_port}/metrics")
    return _serve(config, server_options(args), args.model_repository, front)


def _build_repo(config: EngineConfig, repo_dir: str) -> int:
    from tgi_backend.launcher.repository import render_repository, resolve_model_for_render

    config = resolve_model_for_render(config, download=False)
    render_repository(repo_dir, config)
    print(f"model repository written to {repo_dir} (model_id={config.model_id})")
    print(f"run: tritonserver --model-repository {repo_dir}")
    return 0


def _serve(config: EngineConfig, options: ServerOptions, repo_dir: str | None,
           front: "FrontendSettings | None" = None) -> int:
    from tgi_backend.launcher.repository import render_repository, resolve_model_for_render
    from tgi_backend.frontend.process import FrontendProcess
    from tgi_backend.launcher.tritonserver import TritonServer, find_tritonserver

    binary = find_tritonserver(options.tritonserver)
    config = resolve_model_for_render(config, download=True)
    with tempfile.TemporaryDirectory(prefix="tgi-triton-") as workdir:
        repo_dir = repo_dir or os.path.join(workdir, "model_repository")
        render_repository(repo_dir, config)
        server = TritonServer(binary, repo_dir, options, workdir=workdir)
        stop = threading.Event()
        _on_signals(stop)
        server.start()
        front_process = FrontendProcess(front) if front is not None else None
        try:
            if not server.wait_ready(options.ready_timeout_secs, stop):
                if stop.is_set():  # asked to stop while loading: not a failure
                    return 0
                print("tgi-triton: tritonserver did not become ready (see its log above)", file=sys.stderr)
                return 1
            _print_endpoints(options)
            if front_process is not None:
                front_process.start()
            while not stop.wait(0.5):
                if server.poll() is not None:
                    print(f"tgi-triton: tritonserver exited with {server.poll()}", file=sys.stderr)
                    return 1
                if front_process is not None and front_process.poll() is not None:
                    print(f"tgi-triton: the HTTP front exited with {front_process.poll()}", file=sys.stderr)
                    return 1
            return 0
        finally:
            if front_process is not None:
                front_process.stop()
            server.stop()


def _on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def _print_endpoints(options: ServerOptions) -> None:
    print(
        "tgi-triton ready:\n"
        f"  HTTP    http://127.0.0.1:{options.http_port}/v2/models/tgi_llm/generate_stream\n"
        f"  gRPC    127.0.0.1:{options.grpc_port} (models: tgi_llm, ensemble)\n"
        f"  metrics http://127.0.0.1:{options.metrics_port}/metrics",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
