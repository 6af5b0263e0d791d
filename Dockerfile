# tgi-triton on NVIDIA's Triton container: its tritonserver (on PATH, backends in /opt/tritonserver/backends)
# runs our model repository with the Python backend, whose stub uses the image's python3 and the packages
# pip installs here.
#
#   docker build -t tgi-triton .
#   docker run --rm -p 8000:8000 -p 8001:8001 -p 8002:8002 -v $HOME/.cache/huggingface:/data \
#       tgi-triton --model-id Qwen/Qwen2.5-0.5B-Instruct
#
# Or only render the repository and run tritonserver yourself:
#   docker run --rm -v $PWD/repo:/repo --entrypoint tgi-triton tgi-triton build-repo --model-repository /repo
#   docker run --rm -v $PWD/repo:/repo ... --entrypoint tritonserver tgi-triton --model-repository /repo
#
# 24.10 ships tritonserver 2.51, the version the launcher and tests are checked against.
ARG TRITON_VERSION=24.10
FROM nvcr.io/nvidia/tritonserver:${TRITON_VERSION}-py3

ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    HF_HOME=/data \
    TGI_TRITON_CACHE=/data/tgi-triton

WORKDIR /opt/tgi-triton

# Dependencies first, so that code changes do not reinstall torch. The CUDA build of torch is right here
# (GPU image); the `serve` extra is skipped: the image has tritonserver, nvidia-pytriton is not needed.
COPY pyproject.toml README.md ./
# gcc: on a CPU-only host the engine builds its native kernels (tgi_backend/kernels/cpu) on first use
RUN apt-get update && apt-get install -y --no-install-recommends gcc && rm -rf /var/lib/apt/lists/*
RUN python3 -m pip install --upgrade pip \
 && python3 -m pip install "torch>=2.4" "numpy<2" safetensors tokenizers transformers huggingface_hub jinja2 \
        "tritonclient[grpc,http]>=2.40"

COPY tgi_backend ./tgi_backend
COPY client ./client
COPY model_repository ./model_repository
# Non-editable: the templates travel as data files (<prefix>/share/tgi-triton/model_repository).
RUN python3 -m pip install --no-deps . \
 && python3 -c "from tgi_backend.launcher.repository import templates_dir; print(templates_dir())" \
 && tgi-triton build-repo --model-repository /tmp/repo-check && rm -rf /tmp/repo-check

VOLUME /data
EXPOSE 8000 8001 8002
# Triton's own ports inside the container; every flag also reads its upper-case env var (MODEL_ID, ...).
ENTRYPOINT ["tgi-triton", "serve", "--model-repository", "/opt/tgi-triton/repository"]
CMD ["--model-id", "demo"]
