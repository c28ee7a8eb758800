# syntax=docker/dockerfile:1
#
# The GPU serving image: the `seqserve` wheel with its `gpu` extra, i.e. onnxruntime-gpu with
# the CUDA 13 and cuDNN 9 runtime libraries from NVIDIA's wheels, on a slim Python base; no
# torch. The host needs only the NVIDIA driver (R580 or newer, for CUDA 13) and the NVIDIA
# container toolkit (Docker) or device plugin (Kubernetes), which mount libcuda into the
# container. Build from the repository root:
#
#   docker build -f deploy/docker/gpu.Dockerfile -t seqserve:0.1.0-gpu .
#
# Everything else (models at /models, ports, user, health check, signals) is as in
# cpu.Dockerfile; tests/deploy/test_images.py keeps the two in step.

ARG PYTHON_IMAGE=python:3.11-slim

# --- wheel -------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY export/ export/
COPY models/ models/
COPY protos/ protos/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- server ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS server
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="seqserve (GPU)" \
      org.opencontainers.image.description="gRPC text classification with ONNX Runtime on CUDA" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The wheel with the `gpu` extra (pyproject.toml: onnxruntime-gpu[cuda,cudnn]).
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/seqserve-*.whl)[gpu]"

# NVIDIA's wheels put the CUDA and cuDNN libraries under site-packages/nvidia/, where the
# dynamic loader does not look. The server finds and loads them itself
# (service/server/cuda_libraries.py); registering the directories with ldconfig as well lets
# this build prove them complete: it fails if ONNX Runtime's CUDA provider has an unresolved
# library other than libcuda, which the driver mounts at run time. On a GPU node,
# `seqserve doctor --device cuda` (this image's entry point) says whether CUDA really starts.
RUN python - <<'EOF'
import pathlib, site
dirs = sorted({str(lib.parent) for root in site.getsitepackages()
               for lib in pathlib.Path(root, "nvidia").glob("**/lib/*.so*")})
assert dirs, "no NVIDIA libraries under site-packages/nvidia: is the gpu extra installed?"
pathlib.Path("/etc/ld.so.conf.d/seqserve-nvidia.conf").write_text("\n".join(dirs) + "\n")
EOF
RUN <<'EOF'
set -eu
ldconfig
provider="$(python -c 'import onnxruntime, pathlib; print(pathlib.Path(onnxruntime.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so")')"
missing="$(ldd "$provider" | grep 'not found' | grep -v 'libcuda\.so' || true)"
if [ -n "$missing" ]; then echo "unresolved: $missing" >&2; exit 1; fi
# cuDNN is opened lazily, so ldd cannot see it: ask the loader's cache.
if ! ldconfig -p | grep -q 'libcudnn\.so\.9'; then echo "cuDNN 9 is missing" >&2; exit 1; fi
EOF

COPY deploy/healthcheck.py /opt/seqserve/healthcheck.py

RUN groupadd --system --gid 10001 seqserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin seqserve
USER 10001:10001
WORKDIR /srv

# SEQSERVE_DEVICE=cuda: a pod without a working GPU fails its start-up loudly instead of
# serving on CPU at a fraction of the speed (`auto` would fall back silently).
# NVIDIA_*: what the container toolkit mounts (compute = CUDA, utility = nvidia-smi).
ENV SEQSERVE_REPOSITORY=/models \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_HOST=0.0.0.0 \
    SEQSERVE_METRICS_PORT=9400 \
    SEQSERVE_DEVICE=cuda \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
EXPOSE 50051 9400

HEALTHCHECK --interval=10s --timeout=5s --start-period=180s --retries=3 \
    CMD ["python", "/opt/seqserve/healthcheck.py"]

ENTRYPOINT ["seqserve"]
CMD ["serve"]
