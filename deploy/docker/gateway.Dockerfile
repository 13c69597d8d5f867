# syntax=docker/dockerfile:1
# vqa-gateway: the FastAPI HTTP layer. CPU only; torch, transformers and models/ are not in the image
# (house style 9: the HTTP layer never imports torch), so it runs only with VQA_QUEUE=redis.
#
#     docker build -f deploy/docker/gateway.Dockerfile -t REGISTRY/llava-alignedvq/gateway:0.1.0 .
#
# The build context is the repository root; gateway.Dockerfile.dockerignore (next to this file,
# BuildKit) keeps it to pyproject.toml, README.md, edge_client/, gateway/ and the lock file.
# Dependencies: requirements/gateway.txt, fully pinned and hashed (regenerate with lock.sh); the
# project itself is installed with --no-deps so the [serve] extra (which pulls torch) is never read.

# python:3.12.12-slim-bookworm, multi-arch index digest (verify: docker buildx imagetools inspect).
# Any image with `python` (3.11 or 3.12: the lock file has wheels for both) and its venv module
# will do, e.g. the Debian 12 base that deploy/podman/run.sh makes where no registry is reachable.
ARG PYTHON_BASE=python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c

FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY deploy/docker/requirements/gateway.txt /tmp/requirements.txt
RUN pip install --no-deps --require-hashes -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY edge_client /src/edge_client
COPY gateway /src/gateway
RUN pip install --no-deps /src

FROM ${PYTHON_BASE}
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VQA_QUEUE=redis \
    VQA_HOST=0.0.0.0 \
    VQA_PORT=8000
COPY --from=build /opt/venv /opt/venv
# Fail the build if the HTTP layer ever starts importing torch or the model code.
RUN python -c "import sys, gateway.api.main; bad = {'torch', 'models', 'transformers'} & set(sys.modules); sys.exit(f'gateway imports {bad}' if bad else 0)"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin app
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('VQA_PORT', '8000'), timeout=2).status != 200)"]
# uvicorn drains in-flight requests on SIGTERM for up to VQA_MAX_TIMEOUT_MS.
STOPSIGNAL SIGTERM
ENTRYPOINT ["vqa-gateway"]
