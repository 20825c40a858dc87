# syntax=docker/dockerfile:1.7
# Production image of qoder-kafka-bridge.
#   docker build -t qoder-kafka-bridge --build-arg VERSION=$(python -c 'import bridge; print(bridge.__version__)') .
#   docker run --read-only --tmpfs /tmp -e QODER_ACCESS_TOKEN_FILE=... qoder-kafka-bridge
# Two stages: the first turns the project and its dependencies into wheels, the second installs
# only those wheels, so no build tool, compiler or pip cache reaches the image that runs.

ARG PYTHON_VERSION=3.12
ARG DEBIAN_RELEASE=trixie

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
# The dependencies first, from the lock: every version pinned and every download checked
# against its sha256 (deploy/lock/runtime.txt, the base dependencies at the versions `make test`
# tested). Only the base dependencies: the `simulator` extra (uvicorn, httptools) is for tests
# and demos and never ships. Wheels only (every dependency has manylinux ones): no compiler.
COPY deploy/lock/runtime.txt /wheels/runtime.txt
RUN pip wheel --wheel-dir /wheels --only-binary=:all: --require-hashes --no-deps -r /wheels/runtime.txt
# Then the project itself, without dependencies (the lock has them): hatchling reads README.md
# (the long description) and bridge/__init__.py (the version), nothing else.
COPY pyproject.toml README.md ./
COPY bridge ./bridge
RUN pip wheel --wheel-dir /wheels --no-deps .

FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime
ARG VERSION=0.0.0+unknown
ARG REVISION=unknown
LABEL org.opencontainers.image.title="qoder-kafka-bridge" \
      org.opencontainers.image.description="Republishes Qoder Cloud Agents thread events to Apache Kafka, in order, losing nothing." \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.base.name="python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE}"

# A numeric uid/gid so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --system --gid 10001 bridge \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /tmp \
        --shell /usr/sbin/nologin bridge

# The wheels are bind-mounted, not copied: they never become a layer of this image. The locked
# dependencies (hashes checked again), then the bridge on top with nothing left to resolve, and
# `pip check` proves the lock covers every requirement of the installed bridge.
# pip byte-compiles here, as root, so the read-only root filesystem never needs a .pyc write.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --require-hashes --no-deps \
        --disable-pip-version-check --root-user-action=ignore -r /wheels/runtime.txt \
    && pip install --no-cache-dir --no-index --no-deps \
        --disable-pip-version-check --root-user-action=ignore /wheels/qoder_kafka_bridge-*.whl \
    && pip check --disable-pip-version-check

# Read-only root filesystem: the only writable place is /tmp (an emptyDir or --tmpfs), so HOME
# points there and Python never tries to write bytecode next to the code.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    TMPDIR=/tmp
WORKDIR /tmp
USER 10001:10001
EXPOSE 8080
# No HEALTHCHECK: Kubernetes ignores it and uses the chart's /livez and /readyz probes instead;
# under plain Docker, probe http://localhost:8080/livez from outside.
# Exec form, no shell and no init: the bridge is PID 1 and receives SIGTERM itself (it installs
# handlers for SIGTERM and SIGINT at start: drain, then exit 0; a second signal exits at once).
# It starts no child processes, so there are no zombies for an init like tini to reap.
STOPSIGNAL SIGTERM
ENTRYPOINT ["qoder-bridge"]
CMD ["run"]
