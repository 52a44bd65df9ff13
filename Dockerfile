# syntax=docker/dockerfile:1
# The reloop image: the stream processor (`reloop run | join | train`) and the scoring service
# (`reloop serve`), CPU-only torch, running as a non-root user.
#
#   docker build -t reloop:local .
#   docker run --rm reloop:local --version
#   docker run --rm -v "$PWD/deploy/config:/etc/reloop:ro" reloop:local run --config /etc/reloop/reloop.example.yaml
#
# deploy/compose.yaml and deploy/k8s/ use this image. Health: the HEALTHCHECK below probes
# $RELOOP_HEALTH_URL (default: the scoring service's /healthz on 8000); for the processor set it to
# http://127.0.0.1:9464/metrics (compose does). Kubernetes ignores HEALTHCHECK: deploy/k8s/*.yaml have
# their own probes (serve: /healthz and /readyz; processor: /metrics).
# Checked without a Docker engine by tests/unit/deploy/test_image.py (hadolint and its own rules).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# CPU-only torch from the PyTorch index (a few hundred MB instead of the CUDA build's gigabytes); set
# TORCH_INDEX_URL=https://pypi.org/simple to take PyPI's default wheel instead. TORCH_SPEC admits no torch
# that pyproject.toml's requirement refuses: the wheel's install would replace it with PyPI's CUDA build.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC="torch>=2.10"
# The extras in the image: the processor needs none, the scoring service [serve].
ARG RELOOP_EXTRAS=serve
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
# torch in a layer of its own: code changes do not download it again.
RUN python -m venv /opt/reloop \
    && /opt/reloop/bin/pip install --index-url "${TORCH_INDEX_URL}" "${TORCH_SPEC}"
COPY pyproject.toml setup.py MANIFEST.in README.md LICENSE ./
COPY deploy/config deploy/config
COPY deploy/kafka/pom.xml deploy/kafka/log4j2.xml deploy/kafka/
COPY reloop reloop
COPY engine engine
COPY connectors connectors
COPY bench bench
# A plain (non-editable) install: the wheel carries deploy/config and the Kafka pom as reloop.deploy_files.
RUN /opt/reloop/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/reloop/bin/pip install "$(find /wheels -name 'reloop-*.whl')[${RELOOP_EXTRAS}]" \
    && /opt/reloop/bin/python -m compileall -q /opt/reloop/lib \
    && /opt/reloop/bin/reloop --version

# -------------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="reloop" \
      org.opencontainers.image.description="Streaming continual learning for CTR models (ReLoop)" \
      org.opencontainers.image.licenses="Apache-2.0"
# uid/gid 10001: what deploy/k8s sets as runAsUser/fsGroup. /var/lib/reloop holds the snapshots (a
# volume); everything else is read-only at run time (k8s: readOnlyRootFilesystem, an emptyDir on /tmp).
RUN groupadd --system --gid 10001 reloop \
    && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/reloop --no-create-home \
       --shell /usr/sbin/nologin reloop \
    && mkdir -p /var/lib/reloop \
    && chown 10001:10001 /var/lib/reloop
COPY --from=build /opt/reloop /opt/reloop
ENV PATH=/opt/reloop/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/reloop \
    XDG_CACHE_HOME=/tmp/cache \
    XDG_STATE_HOME=/tmp/state \
    RELOOP_HEALTH_URL=http://127.0.0.1:8000/healthz
USER 10001:10001
WORKDIR /var/lib/reloop
# 8000: reloop serve; 9464/9465: the train and join stages' /metrics.
EXPOSE 8000 9464 9465
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen(os.environ['RELOOP_HEALTH_URL'], timeout=4)"]
ENTRYPOINT ["reloop"]
CMD ["--help"]
