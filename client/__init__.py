"""A small synchronous client for tgi-triton over Triton's gRPC streaming API."""
from client.grpc_client import GenerateResult, StreamDelta, TGITritonClient, generate, generate_stream

__all__ = ["GenerateResult", "StreamDelta", "TGITritonClient", "generate", "generate_stream"]
