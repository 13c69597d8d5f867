#!/usr/bin/env bash
# `make demo`: start what is needed, answer questions about sample images end to end, stop.
#
# Uses the Redis on VQA_REDIS_URL if one answers; else starts redis-server if installed; else runs
# gateway + worker in one process with the in-memory queue. Everything listens on 127.0.0.1.
# With Redis there is a worker per bundled model: llava-mini-shapes answers one-word questions,
# llava-mini-scenes streams a sentence and answers a follow-up that names the features sent once.
set -euo pipefail
cd "$(dirname "$0")/.."

BIN=${VENV:-.venv}/bin
PORT=${VQA_DEMO_PORT:-8765}
REDIS_PORT=${VQA_DEMO_REDIS_PORT:-6379}
export VQA_REDIS_URL=${VQA_REDIS_URL:-redis://127.0.0.1:${REDIS_PORT}/0}
export VQA_ALLOW_ANONYMOUS=true VQA_KEY_PREFIX=vqa-demo-$$ VQA_DEVICE=cpu VQA_LOG_LEVEL=error
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
GATEWAY=http://127.0.0.1:${PORT}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # A Redis that was already running keeps nothing of the demo: drop its keys (own prefix).
  "$BIN/python" -c "
import redis
r = redis.Redis.from_url('$VQA_REDIS_URL', socket_timeout=1)
keys = list(r.scan_iter(match='$VQA_KEY_PREFIX:*', count=1000))
if keys:
    r.delete(*keys)" 2>/dev/null || true
}
trap cleanup EXIT

redis_up() { "$BIN/python" -c "import redis; redis.Redis.from_url('$VQA_REDIS_URL', socket_timeout=1).ping()" 2>/dev/null; }

if redis_up; then
  echo "demo: using the Redis at $VQA_REDIS_URL"
elif command -v redis-server >/dev/null; then
  echo "demo: starting redis-server on 127.0.0.1:${REDIS_PORT}"
  redis-server --bind 127.0.0.1 --port "$REDIS_PORT" --save "" --appendonly no --loglevel warning &
  pids+=($!)
  for _ in $(seq 50); do redis_up && break; sleep 0.1; done
fi

models=(llava-mini-shapes)
if redis_up; then
  export VQA_QUEUE=redis
  models+=(llava-mini-scenes)  # its default quantizer is named in its alignedvq.json
  for model in "${models[@]}"; do
    "$BIN/vqa-worker" --model "$model" &
    pids+=($!)
  done
else
  echo "demo: no Redis available, using the in-process memory queue (llava-mini-shapes only)"
  export VQA_QUEUE=memory
fi
"$BIN/vqa-gateway" --host 127.0.0.1 --port "$PORT" &
pids+=($!)

echo -n "demo: waiting for the gateway and a live worker of ${models[*]}"
for _ in $(seq 240); do
  if "$BIN/python" -c "
import httpx, sys
r = httpx.get('$GATEWAY/readyz', timeout=1)
sys.exit(r.status_code != 200 or not set(sys.argv[1:]) <= set(r.json()['live_workers']))" "${models[@]}" 2>/dev/null; then
    break
  fi
  echo -n .; sleep 0.5
done
echo

ask() {  # image question [extra edge-client flags]
  "$BIN/edge-client" ask "$1" "$2" --gateway "$GATEWAY" --json "${@:3}" | "$BIN/python" -c '
import json, sys
r = json.load(sys.stdin)
mode = "cloud-only JPEG-90" if r["cloud_only"] else "AlignedVQ %.1f bits/token" % r["bits_per_token"]
print("  Q: %-34r A: %-11r %5d bytes sent (%s), edge %.1f ms, round trip %.0f ms"
      % (sys.argv[1], r["answer"], r["request_bytes"], mode, r["edge_ms"], r["latency_ms"]))' "$2"
}

for image in samples/red_circle.png samples/blue_triangle.png samples/teal_rectangle.png; do
  echo "$image"
  ask "$image" "what color is the shape?"
  ask "$image" "what shape is in the image?"
  ask "$image" "is there a circle in the image?"
done
echo "baseline, same image sent as JPEG-90 (cloud-only mode):"
ask samples/red_circle.png "what color is the shape?" --cloud-only

converse() {  # image question... : one `edge-client chat` with llava-mini-scenes, questions fed one by one
  "$BIN/python" - "$BIN/edge-client" "$GATEWAY" "$@" <<'PY'
import subprocess
import sys

client, gateway, image, *questions = sys.argv[1:]
argv = [client, "chat", image, "--model", "llava-mini-scenes", "--gateway", gateway]
chat = subprocess.Popen(
    [*argv, "--max-new-tokens", "40"],
    stdin=subprocess.PIPE,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    bufsize=0,
)
out = sys.stdout.buffer
for question in questions:
    out.write(b"  Q: %r\n  A: " % question)
    out.flush()
    chat.stdin.write(question.encode() + b"\n")
    chat.stdin.flush()
    line = b""
    # Copy the answer byte by byte as its tokens arrive, through chat's "[N B sent (...)]" line or an error.
    while not (line.endswith(b"\n") and (b" B sent (" in line or b"edge-client: error" in line)):
        byte = chat.stdout.read(1)
        if not byte:
            break
        line = (b"" if line.endswith(b"\n") else line) + byte
        out.write(byte)
        out.flush()
chat.stdin.close()
out.write(chat.stdout.read())  # anything chat printed after the last answer
sys.exit(chat.wait())
PY
}

if [[ $VQA_QUEUE == redis ]]; then
  echo "samples/scene_test9.png, llava-mini-scenes, one edge-client chat (tokens print as they arrive;"
  echo "the follow-up names the features by image_ref and carries the first turn as history):"
  converse samples/scene_test9.png "describe the image" "how many squares are there?"
else
  echo "demo: llava-mini-scenes left out (its worker needs Redis: the memory queue serves one model)"
fi

if [[ ${VQA_DEMO_KEEP:-0} == 1 ]]; then
  echo "demo: the stack keeps running for the web page at $GATEWAY/ (Ctrl-C stops it)"
  wait
fi
