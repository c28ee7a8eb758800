# syntax=docker/dockerfile:1
#
# The CPU serving image: the `seqserve` wheel with ONNX Runtime and gRPC, no torch (torch is only
# in the `train` extra). Build from the repository root (BuildKit reads the build-context filter
# beside this file, cpu.Dockerfile.dockerignore):
#
#   docker build -f deploy/docker/cpu.Dockerfile -t seqserve:0.1.0 .
#
# Models are not in this image. The server reads a model repository at /models: mounted by
# compose (deploy/compose.yaml), copied into a pod volume by an init container running the
# models image (deploy/docker/models.Dockerfile), or downloaded by KServe's storage initializer
# (deploy/kubernetes/kserve/). A version published into the repository later is hot-reloaded.
#
# Another Python: --build-arg PYTHON_IMAGE=python:3.12-slim (the project needs >= 3.11).

ARG PYTHON_IMAGE=python:3.11-slim

# --- wheel: the source tree becomes one wheel, so the runtime image holds no source tree -------
FROM ${PYTHON_IMAGE} AS wheel
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY export/ export/
COPY models/ models/
COPY protos/ protos/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- server: the serving install, unprivileged -------------------------------------------------
FROM ${PYTHON_IMAGE} AS server
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="seqserve (CPU)" \
      org.opencontainers.image.description="gRPC text classification with ONNX Runtime" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# The serving install only, as `pip install .`: no extras. The wheel is bind-mounted from the
# wheel stage, so it is not left in a layer.
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install /wheels/*.whl

COPY deploy/healthcheck.py /opt/seqserve/healthcheck.py

# Unprivileged, with a fixed uid/gid so Kubernetes' runAsUser/fsGroup and volume permissions
# match (deploy/kubernetes/base/deployment.yaml).
RUN groupadd --system --gid 10001 seqserve \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin seqserve
USER 10001:10001
WORKDIR /srv

# Defaults of the container (pydantic-settings reads SEQSERVE_*; flags override them).
# 0.0.0.0: inside a container the server must listen beyond loopback to be reachable at all.
ENV SEQSERVE_REPOSITORY=/models \
    SEQSERVE_HOST=0.0.0.0 \
    SEQSERVE_PORT=50051 \
    SEQSERVE_METRICS_HOST=0.0.0.0 \
    SEQSERVE_METRICS_PORT=9400 \
    SEQSERVE_DEVICE=cpu
EXPOSE 50051 9400

# start-period: loading and warming up every model happens before the server reports SERVING.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "/opt/seqserve/healthcheck.py"]

# Exec form: the server is PID 1's direct child under compose's `init: true`, or PID 1 in
# Kubernetes, and receives SIGTERM itself to drain (SEQSERVE_DRAIN_GRACE_S).
ENTRYPOINT ["seqserve"]
CMD ["serve"]
