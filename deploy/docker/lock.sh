#!/usr/bin/env bash
# Regenerate deploy/docker/requirements/{gateway,edge,worker}.txt: fully pinned, hashed dependency
# sets for the three images (CPython 3.12, the public base images', and 3.11, Debian 12's, which the
# local test base of deploy/podman/ has; gateway and edge for linux/amd64 + linux/arm64, the worker
# for linux/amd64). Same pins for every target, one hash per wheel. Needs only pip and PyPI;
# nothing is installed. Behind a TLS-intercepting proxy, point PIP_CERT at its CA bundle.
#
#     bash deploy/docker/lock.sh
#
# The top-level lists below are the single source of what each image gets. Keep the versions in
# step with what `make test` ran against (pip freeze of .venv).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
out=requirements
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# What `gateway.api` imports (house style 9: never torch): edge_client's own dependencies minus the
# CLI (typer) plus the HTTP stack, with the extras pyproject.toml's serve extra names (uvloop, httptools,
# hiredis: the fast event loop, HTTP parser and Redis reply parser).
# async-timeout: redis imports it below CPython 3.11.3 (Debian 12 has 3.11.2), and pip evaluates
# markers against the interpreter running this script, not --python-version, so it is named here.
GATEWAY=(fastapi==0.165.0 starlette==1.10.0 "uvicorn[standard]==0.54.0" "redis[hiredis]==8.1.0"
  pydantic==2.14.4 pydantic-settings==2.16.3 prometheus-client msgpack==1.2.4 numpy==2.4.6
  pillow==13.0.0 httpx==0.28.1 anyio==4.16.0 safetensors==0.8.0 "async-timeout>=4.0.3"
  threadpoolctl==3.8.0)
# edge_client: numpy, pillow, httpx, msgpack, safetensors, typer, pydantic, threadpoolctl (BLAS
# threads per encode); constriction is declared by pyproject.toml but imported nowhere, so the image
# leaves it out.
EDGE=(numpy==2.4.6 pillow==13.0.0 httpx==0.28.1 anyio==4.16.0 msgpack==1.2.4 safetensors==0.8.0
  typer==0.29.2 pydantic==2.14.4 threadpoolctl==3.8.0)
# The worker: `.[serve]` without torch (installed first from the CUDA index, see worker.Dockerfile).
WORKER=("${GATEWAY[@]}" "transformers==5.24.0" "tokenizers==0.23.3" "easy-vqa==1.0" "tqdm==4.70.1"
  "matplotlib==3.11.2" "huggingface-hub==2.4.0" "constriction>=0.4" "typer==0.29.2" "threadpoolctl==3.8.0")

PYTHONS=(3.12 3.11)
cert=()
if [[ -n ${PIP_CERT:-} ]]; then cert=(--cert "$PIP_CERT"); fi

resolve() {  # name arch requirements...
  local name=$1 arch=$2 py
  shift 2
  for py in "${PYTHONS[@]}"; do
    pip --isolated "${cert[@]}" install --dry-run --ignore-installed --only-binary=:all: --python-version "$py" \
      --implementation cp --platform "manylinux_2_28_$arch" --platform "manylinux_2_27_$arch" \
      --platform "manylinux_2_17_$arch" --platform "manylinux2014_$arch" --target "$work/t" \
      --quiet --report "$work/$name-$arch-$py.json" "$@"
  done
}

resolve gateway x86_64 "${GATEWAY[@]}"
resolve gateway aarch64 "${GATEWAY[@]}"
resolve edge x86_64 "${EDGE[@]}"
resolve edge aarch64 "${EDGE[@]}"
resolve worker x86_64 "${WORKER[@]}"

"$PY" - "$work" "$out" <<'EOF'
import collections, json, sys
from pathlib import Path

work, out = Path(sys.argv[1]), Path(sys.argv[2])
HEADERS = {
    "gateway": "# vqa-gateway image: what the HTTP layer imports (edge_client + FastAPI/uvicorn/Redis/settings/metrics).\n"
    "# No torch, no transformers. CPython 3.12 + 3.11, linux/amd64 + linux/arm64. Regenerate: deploy/docker/lock.sh\n",
    "edge": "# edge-client image: numpy, pillow, httpx, msgpack, safetensors, typer, pydantic and their dependencies.\n"
    "# CPython 3.12 + 3.11, linux/amd64 + linux/arm64. Regenerate: deploy/docker/lock.sh\n",
    "worker": "# vqa-worker image: everything of `.[serve]` except torch, which comes first from the CUDA index\n"
    "# (TORCH_INDEX in worker.Dockerfile) together with its nvidia-* / triton / sympy dependencies.\n"
    "# CPython 3.12 + 3.11, linux/amd64. Regenerate: deploy/docker/lock.sh\n",
}
for name, header in HEADERS.items():
    pins, hashes = {}, collections.defaultdict(set)
    for report in sorted(work.glob(f"{name}-*.json")):
        for item in json.loads(report.read_text())["install"]:
            dist = item["metadata"]["name"].lower().replace("_", "-")
            version = item["metadata"]["version"]
            if pins.setdefault(dist, version) != version:
                sys.exit(f"{name}: {dist} resolves to {pins[dist]} on one target, {version} on another")
            hashes[dist].add(item["download_info"]["archive_info"]["hashes"]["sha256"])
    lines = [header, "# Installed with `pip install --no-deps --require-hashes -r`: this file is the whole dependency set.\n"]
    for dist in sorted(pins):
        lines.append(f"{dist}=={pins[dist]} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in sorted(hashes[dist])) + "\n")
    (out / f"{name}.txt").write_text("".join(lines))
    print(f"{out / name}.txt: {len(pins)} distributions")
EOF
