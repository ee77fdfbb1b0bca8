# syntax=docker/dockerfile:1
# COTS Search images, one Dockerfile, three targets:
#
#   serving   (the default target) the API (`cots serve`) and the re-index worker (`cots worker`):
#             ONNX Runtime, FAISS, FastAPI, Redis client. No torch: it stays small.
#   training  serving plus torch and open_clip: `cots train`, `cots export`, `cots demo`.
#   gateway   nginx spreading requests over the API replicas (docker-compose.yml).
#
#   docker build -t cots-search .                                   # serving, CPU
#   docker build --target training -t cots-search-training .
#   docker build --build-arg VARIANT=gpu \
#     --build-arg BASE_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu22.04 -t cots-search:gpu .
#
# Layers go from what changes least to what changes most: the OS, then the dependencies (they
# depend only on pyproject.toml and on the verified versions that deploy/docker/constraints.txt
# pins), then the project itself as a wheel (a code change rebuilds only that last, small
# layer). Every image runs as the unprivileged user `cots` (uid 10001)
# under tini, which forwards SIGTERM so that a stop is graceful and reaps zombie processes.

# VARIANT picks the runtime packages (cpu: onnxruntime, faiss-cpu; gpu: onnxruntime-gpu,
# faiss-gpu-cu12) and BASE_IMAGE the system under them: any Debian or Ubuntu image works, with
# Python 3.11 or without it (it is then installed from the distribution). For the GPU variant
# take a CUDA 13 runtime with cuDNN 9: PyPI's onnxruntime-gpu is built against them. EXTRAS adds
# pyproject extras to serving's, space-separated: EXTRAS=distributed is the Ray image of the
# compose file's `ray` profile and deploy/kuberay/ (empty, the default: the image as before).
ARG VARIANT=cpu
ARG EXTRAS=
ARG BASE_IMAGE=python:3.11-slim
ARG GATEWAY_IMAGE=debian:bookworm-slim

# ---- the operating system: Python 3.11, tini, the cots user ------------------------------------
FROM ${BASE_IMAGE} AS os
# Every image this file builds carries the label, so that superseded builds (untagged when a
# rebuild takes their tag) can be pruned without touching anyone else's images:
# `docker image prune --filter label=io.cots-search.build`.
LABEL io.cots-search.build="1"
RUN if command -v python3.11 >/dev/null; then extra=""; \
    else extra="python3.11 python3.11-venv ca-certificates"; fi \
 && apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends tini $extra \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --create-home --uid 10001 --user-group cots \
 && mkdir -p /data && chown cots:cots /data
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=60 \
    PIP_RETRIES=10

# ---- dependencies: rebuilt only when pyproject.toml or the pinned versions change --------------
FROM os AS serving-deps
ARG VARIANT
ARG EXTRAS
COPY pyproject.toml deploy/docker/requirements.py deploy/docker/constraints.txt /opt/build/
RUN python3.11 -m venv /opt/venv \
 && python /opt/build/requirements.py /opt/build/pyproject.toml serving $EXTRAS \
      --variant "$VARIANT" >/opt/build/serving.txt \
 && pip install --quiet -c /opt/build/constraints.txt -r /opt/build/serving.txt

FROM serving-deps AS training-deps
ARG VARIANT
RUN python /opt/build/requirements.py /opt/build/pyproject.toml training --variant "$VARIANT" \
      >/opt/build/training.txt \
 && pip install --quiet -c /opt/build/constraints.txt -r /opt/build/training.txt

# ---- the project, as a wheel (the only layer a code change rebuilds) ---------------------------
FROM serving-deps AS wheel
COPY . /opt/src
RUN pip wheel --quiet --no-deps --wheel-dir /opt/wheels /opt/src

# ---- training: torch, for cots train / export / demo -------------------------------------------
FROM training-deps AS training
COPY --from=wheel /opt/wheels /opt/wheels
RUN pip install --quiet --no-deps /opt/wheels/*.whl
USER cots
WORKDIR /data
ENTRYPOINT ["tini", "--"]
CMD ["cots", "--help"]

# ---- gateway: nginx in front of the API replicas -----------------------------------------------
FROM ${GATEWAY_IMAGE} AS gateway
LABEL io.cots-search.build="1"
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      nginx-light curl tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --uid 10001 --user-group --no-create-home cots
COPY deploy/gateway/nginx.conf.template deploy/gateway/start.sh /etc/cots-gateway/
USER cots
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
  CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/gateway/health"]
ENTRYPOINT ["tini", "--"]
CMD ["sh", "/etc/cots-gateway/start.sh"]

# ---- serving: the default target ---------------------------------------------------------------
FROM serving-deps AS serving
COPY --from=wheel /opt/wheels /opt/wheels
RUN pip install --quiet --no-deps /opt/wheels/*.whl
USER cots
WORKDIR /data
# Where docker-compose.yml's first start puts the demo; point these at your own bundle and
# collections (docs in deploy/README.md).
ENV COTS_BUNDLE=/data/demo/bundle \
    COTS_INDEX_ROOT=/data/demo/indices \
    COTS_DATA_ROOT=/data
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-m", "service.healthcheck"]
ENTRYPOINT ["tini", "--"]
CMD ["cots", "serve", "--host", "0.0.0.0", "--port", "8000"]
