# syntax=docker/dockerfile:1
#
# The models image: a model repository baked into a tiny image whose only job is to copy it into
# a pod volume (the init container of deploy/kubernetes/base/deployment.yaml). The server images
# stay model-free, so a new model is a new models image tag, not a new server build.
#
# Two ways to fill it, from the repository root:
#
#   # a repository built and gated beforehand (what the release pipeline does): it replaces the
#   # `model_repository` stage below, so nothing is trained here
#   docker build -f deploy/docker/models.Dockerfile \
#       --build-context model_repository=./model_repository -t seqserve-models:1 .
#
#   # or train and export right here with `seqserve build` (CPU torch; minutes)
#   docker build -f deploy/docker/models.Dockerfile -t seqserve-models:1 .
#
# PIP_EXTRA_INDEX_URL (build arg) can point pip at a CPU-only torch index to keep the trainer
# stage small; the result does not depend on it.

ARG PYTHON_IMAGE=python:3.11-slim
ARG COPY_IMAGE=busybox:1.37.0

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

# --- trainer: `seqserve build` behind the export gates (a failed gate fails the build) -------
FROM ${PYTHON_IMAGE} AS trainer
ARG PIP_EXTRA_INDEX_URL=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_EXTRA_INDEX_URL=${PIP_EXTRA_INDEX_URL}
RUN --mount=type=bind,from=wheel,source=/wheels,target=/wheels \
    pip install "$(ls /wheels/seqserve-*.whl)[train]"
WORKDIR /work
RUN seqserve build --repository /work/model_repository --runs /work/runs --json

# --- model_repository: the repository at the root of a stage; `--build-context
# model_repository=DIR` replaces this stage with DIR -------------------------------------------
FROM scratch AS model_repository
COPY --from=trainer /work/model_repository/ /

# --- models: the repository at /models, and `cp` to hand it over -------------------------------
FROM ${COPY_IMAGE} AS models
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="seqserve model repository" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=model_repository / /models/
USER 10001:10001
# The init container mounts the pod's volume at /model-repository; `cp -R` (not -a): the copy
# belongs to the pod's user, which need not be the image's.
CMD ["cp", "-R", "/models/.", "/model-repository/"]
