# syntax=docker/dockerfile:1
# edge-client: the numpy-only edge runtime and CLI (no torch). Multi-arch (linux/amd64, linux/arm64)
# for edge boxes; the edge bundle is downloaded from the gateway on first use and cached (by sha256,
# revalidated with ETag) in the volume below.
#
#     docker buildx build --platform linux/amd64,linux/arm64 -f deploy/docker/edge.Dockerfile \
#       -t REGISTRY/llava-alignedvq/edge-client:0.1.0 --push .
#     docker run --rm -v alignedvq-cache:/home/app/.cache/alignedvq -v "$PWD/samples:/in:ro" \
#       -e VQA_GATEWAY_URL=https://vqa.example.com -e VQA_API_KEY REGISTRY/llava-alignedvq/edge-client:0.1.0 \
#       ask /in/red_circle.png "what color is the shape?"
#
# Size: the 22 locked wheels are 30 MB compressed, 96 MB installed (numpy 57 MB, pillow 20 MB,
# pydantic-core 5 MB); with the python:3.12-slim base (~125 MB) the image is about 230 MB unpacked,
# about 80 MB compressed. Measured with podman on the Debian 12 test base of deploy/podman/ (171 MB,
# apt included): 321 MB.

# python:3.12.12-slim-bookworm, multi-arch index digest (verify: docker buildx imagetools inspect).
# Any image with `python` (3.11 or 3.12: the lock file has wheels for both) and its venv module
# will do, e.g. the Debian 12 base that deploy/podman/run.sh makes where no registry is reachable.
ARG PYTHON_BASE=python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c

FROM ${PYTHON_BASE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
COPY deploy/docker/requirements/edge.txt /tmp/requirements.txt
RUN pip install --no-deps --require-hashes -r /tmp/requirements.txt
COPY pyproject.toml README.md /src/
COPY edge_client /src/edge_client
RUN pip install --no-deps /src

FROM ${PYTHON_BASE}
ENV PATH=/opt/venv/bin:$PATH PYTHONUNBUFFERED=1
COPY --from=build /opt/venv /opt/venv
RUN python -c "import sys, edge_client.cli; bad = {'torch', 'fastapi', 'redis', 'models'} & set(sys.modules); sys.exit(f'edge client imports {bad}' if bad else 0)"
RUN groupadd --system --gid 10001 app && useradd --system --uid 10001 --gid 10001 --create-home --home-dir /home/app --shell /usr/sbin/nologin app \
    && mkdir -p /home/app/.cache/alignedvq && chown -R 10001:10001 /home/app/.cache
USER 10001:10001
WORKDIR /home/app
VOLUME /home/app/.cache/alignedvq
# A one-shot CLI: nothing stays up to probe.
HEALTHCHECK NONE
ENTRYPOINT ["edge-client"]
CMD ["--help"]
