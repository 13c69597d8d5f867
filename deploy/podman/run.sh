#!/usr/bin/env bash
# The three images built and the dev overlay run with podman on one machine, no registry and no
# cluster (deploy/README.md, "Local run with podman", has a recorded run).
#
#   bash deploy/podman/run.sh base     # test base image (mmdebstrap: Debian 12 + python3) + a local Redis
#   bash deploy/podman/run.sh images   # gateway, worker (CPU torch) and edge-client images, FROM that base
#   bash deploy/podman/run.sh up       # render overlays/dev, convert (kube_play.py), podman kube play
#   bash deploy/podman/run.sh ask [IMAGE QUESTION]   # edge-client (its image) through the gateway
#   bash deploy/podman/run.sh chaos    # SIGKILL the worker with requests in flight and queued
#   bash deploy/podman/run.sh down     # pods, volumes, secret, network (images stay)
#   bash deploy/podman/run.sh all      # base images up ask chaos
#
# Needs root, podman, buildah, mmdebstrap (Debian 12: apt-get install podman buildah mmdebstrap
# runc), kubectl (or the repo's .venv for tests/deploy/kustomize.py) and pip. Settings:
#   BASE_IMAGE      base of all three images (default localhost/vqa-test/debian-python:3.11-bookworm);
#                   `base` builds it; any image with python3, python3-venv and `python` works
#   DEBIAN_MIRROR   for mmdebstrap (default http://deb.debian.org/debian)
#   TORCH_INDEX     where the worker build gets torch; default: a file:// index of the CPU wheel and
#                   its dependencies, made here with `pip download` from the host's pip
#                   configuration (a local wheel cache here) and mounted into the build. With
#                   internet access: TORCH_INDEX=https://download.pytorch.org/whl/cpu
#   HOST_CA_BUNDLE  mounted over the build containers' CA bundle, so that pip trusts what the host
#                   trusts (a TLS-intercepting proxy here); default /etc/ssl/certs/ca-certificates.crt
#   VQA_PODMAN_PORT the gateway on 127.0.0.1 (default 18000)
#   REV             build and render a commit (git archive into $STATE/src) instead of the work tree,
#                   so that gateway and worker come from the same code even while it is being edited
#   STATE           key, torch index, base tarball, source export (default /tmp/vqa-podman)
set -euo pipefail
cd "$(dirname "$0")/../.."

export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/podman/containers.conf}
BASE_IMAGE=${BASE_IMAGE:-localhost/vqa-test/debian-python:3.11-bookworm}
REDIS_IMAGE=${REDIS_IMAGE:-localhost/vqa-test/redis:7.0-bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_CA_BUNDLE=${HOST_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
PORT=${VQA_PODMAN_PORT:-18000}
STATE=${STATE:-/tmp/vqa-podman}
REGISTRY=registry.example.com/llava-alignedvq
GATEWAY_IMAGE=$REGISTRY/gateway:0.1.0
WORKER_IMAGE=$REGISTRY/worker:0.1.0-cpu
EDGE_IMAGE=$REGISTRY/edge-client:0.1.0
NETWORK=vqa
WORKER=worker-pod-0-worker # podman kube play names: <deployment>-pod-0-<container>
PLAYED=$STATE/dev.yaml
STREAM=vqa:stream:llava-mini-shapes
mkdir -p "$STATE"
SRC=$PWD
source_tree() {  # SRC: the work tree, or with REV the export of that commit
  [[ -n ${REV:-} ]] || return 0
  local commit
  commit=$(git rev-parse --verify "$REV^{commit}")
  if [[ $(cat "$STATE/src/.commit" 2>/dev/null) != "$commit" ]]; then
    rm -rf "$STATE/src" && mkdir -p "$STATE/src"
    git archive "$commit" | tar -x -C "$STATE/src"
    echo "$commit" >"$STATE/src/.commit"
    echo "source: $(git log -1 --format='%h %s' "$commit" | cut -c1-90)"
  fi
  SRC=$STATE/src
}

say() { printf '\n$ %s\n' "$*"; }
# podman 4.3 without systemd logs that it cannot schedule healthcheck timers on every container
# start; the probes are run by hand below instead.
quiet() { "$@" 2> >(grep -v 'systemd connection' >&2); }

base() {
  say mmdebstrap bookworm "(python3 python3-venv python-is-python3 ca-certificates passwd)"
  mmdebstrap --variant=apt --include=python3,python3-venv,python-is-python3,ca-certificates,passwd \
    --aptopt='Apt::Install-Recommends "false"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    bookworm "$STATE/base.tar" "$DEBIAN_MIRROR" 2>&1 | tail -1
  podman import -q --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["python3"]' "$STATE/base.tar" "$BASE_IMAGE" >/dev/null
  podman run --rm "$BASE_IMAGE" python -c 'import sys; print("base:", sys.version.split()[0])'
  say podman build -f deploy/podman/redis.Containerfile -t "$REDIS_IMAGE"
  podman build -q --format docker --build-arg BASE="$BASE_IMAGE" -f "$SRC/deploy/podman/redis.Containerfile" \
    -t "$REDIS_IMAGE" "$SRC/deploy/podman" >"$STATE/build-redis.log" 2>&1 || { tail -30 "$STATE/build-redis.log"; exit 1; }
  podman run --rm "$REDIS_IMAGE" --version
}

torch_index() {  # a PEP 503 index of the CPU torch wheel + its dependencies, for the worker build
  local py index=$STATE/torch-index
  py=$(podman run --rm "$BASE_IMAGE" python -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  rm -rf "$index" && mkdir -p "$index/files"
  pip download -q --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$index/files" "torch==2.13.0" 2> >(grep -v 'is ignored: it is neither a file nor a directory' >&2)
  if ! ls "$index/files" | grep -q '^torch-2.13.0+cpu-'; then
    echo "run.sh: pip found no CPU build of torch 2.13.0 for CPython $py; set TORCH_INDEX" >&2
    exit 1
  fi
  python3 - "$index" <<'EOF'
import hashlib, html, re, sys
from pathlib import Path
root = Path(sys.argv[1])
projects = {}
for wheel in sorted((root / "files").glob("*.whl")):
    projects.setdefault(re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower(), []).append(wheel)
for name, wheels in projects.items():
    (root / "simple" / name).mkdir(parents=True)
    links = "".join(
        f'<a href="../../files/{html.escape(w.name)}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
        f"{html.escape(w.name)}</a><br>\n"
        for w in wheels
    )
    (root / "simple" / name / "index.html").write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
print("torch index:", ", ".join(w.name for ws in projects.values() for w in ws if w.name.startswith("torch-")))
EOF
}

build() {  # image dockerfile build-args...
  local image=$1 name=$2 dockerfile=deploy/docker/$2.Dockerfile
  shift 2
  say podman build -f "$dockerfile" --ignorefile "$dockerfile.dockerignore" "$@" -t "$image" .
  local start=$SECONDS
  # --format docker keeps HEALTHCHECK (OCI image configs have none); the CA bundle is a build-time
  # mount only, never part of a layer.
  podman build -q --format docker -f "$SRC/$dockerfile" --ignorefile "$SRC/$dockerfile.dockerignore" \
    -v "$HOST_CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro" "$@" -t "$image" "$SRC" >"$STATE/build-$name.log" 2>&1 \
    || { tail -30 "$STATE/build-$name.log"; exit 1; }
  echo "built $image in $((SECONDS - start)) s"
}

images() {
  build "$GATEWAY_IMAGE" gateway --build-arg PYTHON_BASE="$BASE_IMAGE"
  build "$EDGE_IMAGE" edge --build-arg PYTHON_BASE="$BASE_IMAGE"
  if [[ -n ${TORCH_INDEX:-} ]]; then
    build "$WORKER_IMAGE" worker --build-arg CUDA_BASE="$BASE_IMAGE" --build-arg TORCH_INDEX="$TORCH_INDEX"
  else
    torch_index
    build "$WORKER_IMAGE" worker --build-arg CUDA_BASE="$BASE_IMAGE" \
      --build-arg TORCH_INDEX=file:///wheels/simple -v "$STATE/torch-index:/wheels:ro"
  fi
  say podman images
  podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "llava-alignedvq|vqa-test"
}

render() {
  if command -v kubectl >/dev/null; then
    kubectl kustomize "$SRC/deploy/k8s/overlays/dev"
  else
    .venv/bin/python -c 'import sys, yaml; from tests.deploy.kustomize import render
yaml.safe_dump_all(render(sys.argv[1]), sys.stdout)' "$SRC/deploy/k8s/overlays/dev"
  fi
}

up() {
  [[ -s $STATE/api-key ]] || (umask 077 && python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$STATE/api-key")
  say "kubectl kustomize deploy/k8s/overlays/dev | python3 deploy/podman/kube_play.py ... > $PLAYED"
  render | python3 "$SRC/deploy/podman/kube_play.py" --image "redis=$REDIS_IMAGE" --publish "gateway=$PORT" \
    --config VQA_ALLOW_ANONYMOUS=false >"$PLAYED"
  # The Secret as `kubectl create secret` makes it, holding only the key's digest. podman 4.3 reads
  # a secret that envFrom names as a JSON map of base64 values (it cannot read a Secret object).
  say podman secret create vqa-api-keys "(VQA_API_KEYS=sha256:<digest of the key>)"
  podman secret rm vqa-api-keys >/dev/null 2>&1 || true
  python3 - "$STATE/api-key" <<'EOF' | podman secret create vqa-api-keys - >/dev/null
import base64, hashlib, json, sys
key = open(sys.argv[1]).read().strip()
digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
print(json.dumps({"VQA_API_KEYS": base64.b64encode(digest.encode()).decode()}))
EOF
  podman network exists "$NETWORK" || podman network create "$NETWORK" >/dev/null
  say podman kube play --network "$NETWORK" "$PLAYED"
  quiet podman kube play --network "$NETWORK" "$PLAYED" | grep -v '^$' | paste -sd' ' | fold -w 100
  # The probes' own commands, as kubelet would run them (podman runs healthchecks only from systemd
  # timers, absent here): readiness of Redis, then of the worker (vqa-worker --check: model loaded,
  # warmed up, heartbeat published), then of the gateway (/readyz/gateway).
  local start=$SECONDS
  until podman exec redis-redis sh -c 'redis-cli ping | grep -q PONG' 2>/dev/null; do sleep 1; done
  until podman exec "$WORKER" vqa-worker --check >/dev/null 2>&1; do
    ((SECONDS - start < 300)) || { podman logs --tail 20 "$WORKER"; exit 1; }
    sleep 2
  done
  until curl -sf "http://127.0.0.1:$PORT/readyz/gateway" >/dev/null; do sleep 1; done
  echo "ready after $((SECONDS - start)) s"
  say podman ps
  podman ps --format '{{.Names}}\t{{.Image}}\t{{.Status}}' | grep -v infra
  say curl -s "http://127.0.0.1:$PORT/readyz"
  curl -s "http://127.0.0.1:$PORT/readyz"
  echo
}

edge() {  # edge-client in its own container, as an edge box would run it (README: the docker run)
  quiet podman run --rm --network host -v "$PWD/samples:/in:ro" -v alignedvq-cache:/home/app/.cache/alignedvq \
    -e VQA_GATEWAY_URL="http://127.0.0.1:$PORT" -e VQA_API_KEY "$EDGE_IMAGE" "$@"
}

ask() {
  local image=${1:-red_circle.png} question=${2:-what color is the shape?}
  say edge-client ask "/in/$image" "\"$question\"" "# no API key"
  VQA_API_KEY='' edge "ask" "/in/$image" "$question" || echo "(exit $?)"
  say edge-client ask "/in/$image" "\"$question\"" "# VQA_API_KEY=<the key>"
  VQA_API_KEY=$(cat "$STATE/api-key") edge ask "/in/$image" "$question"
}

redis() { podman exec redis-redis redis-cli "$@"; }

chaos() {
  local out=$STATE/chaos.jsonl first=24 later=8
  rm -f "$out" && touch "$out" && chmod 666 "$out"
  local key
  key=$(cat "$STATE/api-key")
  # Each ask is one `edge-client ask --json` process, as many edge boxes would send them.
  local asks='for i in $(seq "$1"); do (edge-client ask --json "/in/$2" "$3" >>/out/chaos.jsonl 2>&1) & done; wait'
  podman rm -f -t 0 vqa-edge >/dev/null 2>&1 || true
  quiet podman run -d --name vqa-edge --network host -v "$PWD/samples:/in:ro" -v "$STATE:/out" \
    -v alignedvq-cache:/home/app/.cache/alignedvq -e VQA_GATEWAY_URL="http://127.0.0.1:$PORT" \
    -e VQA_API_KEY="$key" --entrypoint sleep "$EDGE_IMAGE" 600 >/dev/null
  say "edge-client ask x $first (concurrent) ... then SIGKILL the worker once it holds unacknowledged entries"
  podman exec -d vqa-edge sh -c "$asks" sh "$first" blue_triangle.png "what shape is this?" >/dev/null
  local pending=0 t0=$SECONDS
  until ((pending > 0)); do
    pending=$(redis XPENDING "$STREAM" workers | head -1)
    ((SECONDS - t0 < 120)) || { echo "no entry was ever pending" >&2; exit 1; }
  done
  local pid restarts
  pid=$(podman inspect "$WORKER" --format '{{.State.Pid}}')
  restarts=$(podman inspect "$WORKER" --format '{{.RestartCount}}')
  # The container's main process gets SIGKILL from the host, as the OOM killer or a crash would
  # (exit 137): the pod's restartPolicy Always restarts it, as kubelet would. (`podman kill` counts
  # as a user stop, after which podman restarts nothing.)
  local killed_at
  killed_at=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  kill -KILL "$pid"
  echo "$killed_at: killed the worker (pid $pid) at +$((SECONDS - t0)) s, holding $pending unacknowledged entr$( ((pending == 1)) && echo y || echo ies)"
  say redis-cli XPENDING "$STREAM" workers "; XLEN"
  redis XPENDING "$STREAM" workers | paste -sd' '
  redis XLEN "$STREAM"
  say "edge-client ask x $later while the worker is down"
  podman exec -d vqa-edge sh -c "$asks" sh "$later" yellow_circle.png "what color is the shape?" >/dev/null
  local start=$SECONDS
  # Live again = the new process's first "serving" line (`vqa-worker --check` would pass at once:
  # the killed process's heartbeat lives on for VQA_HEARTBEAT_TTL_S under the same pod name).
  until podman logs --since "$killed_at" "$WORKER" 2>&1 | grep -q ' serving '; do
    ((SECONDS - start < 180)) || { echo "the worker did not come back" >&2; exit 1; }
    sleep 1
  done
  echo "$(date -u +%Y-%m-%dT%H:%M:%SZ): worker restarted by podman (RestartCount $restarts -> $(podman inspect "$WORKER" --format '{{.RestartCount}}')), serving again $((SECONDS - start)) s after the kill"
  until [[ $(grep -c . "$out") -ge $((first + later)) ]]; do
    ((SECONDS - t0 < 240)) || break
    sleep 2
  done
  podman rm -f -t 0 vqa-edge >/dev/null 2>&1
  say "summary of the $((first + later)) replies"
  python3 - "$out" "$((first + later))" <<'EOF'
import collections, json, sys
lines = [line for line in open(sys.argv[1]) if line.strip()]
replies = [json.loads(line) for line in lines]
answers = [r for r in replies if "answer" in r]
errors = [r for r in replies if "answer" not in r]
print(f"sent {sys.argv[2]}, answered {len(answers)}, errors {len(errors)}, missing {int(sys.argv[2]) - len(replies)}")
print("answers:", dict(collections.Counter(r["answer"] for r in answers)))
for r in sorted(answers, key=lambda r: -r["latency_ms"])[:4]:
    print(f"  slowest: {r['answer']!r} round trip {r['latency_ms'] / 1000:.1f} s (queue {r['queue_ms'] / 1000:.1f} s, batch compute {r['compute_ms']:.0f} ms), id {r['request_id']}")
for r in errors:
    print("  error:", r)
sys.exit(0 if len(answers) == int(sys.argv[2]) else 1)
EOF
  say redis-cli XPENDING "$STREAM" workers "; XLEN"
  redis XPENDING "$STREAM" workers | paste -sd' '
  redis XLEN "$STREAM"
  say "podman logs $WORKER | grep serving"
  podman logs "$WORKER" 2>&1 | grep ' serving ' | cut -c1-150
}

down() {
  [[ -f $PLAYED ]] && quiet podman kube down "$PLAYED" >/dev/null || true
  podman rm -f -t 0 vqa-edge >/dev/null 2>&1 || true
  for volume in data-redis-0 redis-config gateway-tmp worker-tmp redis-tmp; do
    podman volume rm -f "$volume" >/dev/null 2>&1 || true
  done
  podman secret rm vqa-api-keys >/dev/null 2>&1 || true
  podman network rm "$NETWORK" >/dev/null 2>&1 || true
  echo "down"
}

source_tree
case ${1:-} in
  base | images | up | chaos | down) "$1" ;;
  ask) shift && ask "$@" ;;
  all) base && images && up && ask && chaos ;;
  *) sed -n '2,12p' "$0" && exit 2 ;;
esac
