#!/usr/bin/env bash
# End-to-end smoke run of the inference side, through the `mmoffload` command: offload the fixture
# Qwen-VL traces, serve a tiny random-weight Qwen2-VL with `mmoffload serve` (vLLM), complete each
# trace's last prompt with `mmoffload generate` (every image sent as a content_parts part: file:// URL
# and content-hash uuid; the server's expansion checked), then refs, pack
# and audit the result. 4 traces gain 1 sampled branch each: 8 samples, 24 image refs. Last, the
# same traces with every turn as context are completed once more, and `mmoffload parity` checks that
# the Hugging Face model gives every token the server sampled the log-prob the server reported.
#
# Usage: scripts/smoke_vllm.sh     (needs `mmoffload` and vLLM in the active venv; CPU is enough)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fixtures="$repo/fixtures"
work="$(mktemp -d "${TMPDIR:-/tmp}/mmoffload-smoke-vllm.XXXXXX")"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
  rm -rf "$work"
}
trap cleanup EXIT

run="$work/run"
unset VF_RENDERER_IMAGE_OFFLOAD_DIR
python="$(dirname "$(command -v mmoffload)")/python"

# Where no torchvision can be installed (CPU CI), the test tree's shims let vLLM's Qwen code import
# (tests/vllm_shims/sitecustomize.py explains them); a machine with torchvision needs none.
server_path="${PYTHONPATH:-}"
if ! "$python" -c "import torchvision" 2>/dev/null; then
  server_path="$repo/tests/vllm_shims${server_path:+:$server_path}"
fi

"$python" "$repo/scripts/make_tiny_vlm.py" "$work/model" >/dev/null
mmoffload offload "$fixtures/traces/qwen_vl.jsonl" --assets "$run/assets/images" -o "$work/offloaded.jsonl" -q

port="$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
mkdir -p "$work/tmp"
PYTHONPATH="$server_path" VLLM_CPU_KVCACHE_SPACE=1 TMPDIR="$work/tmp" \
  mmoffload serve --model "$work/model" --port "$port" --allow-root "$run/assets/images" -- \
  --dtype float32 --max-model-len 4096 --enforce-eager --limit-mm-per-prompt '{"image": 4, "video": 0}' \
  >"$work/server.log" 2>&1 &
server_pid=$!
for _ in $(seq 600); do
  if "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/health', timeout=5)" 2>/dev/null; then
    break
  fi
  if ! kill -0 "$server_pid" 2>/dev/null; then tail -50 "$work/server.log"; echo "smoke_vllm: server died" >&2; exit 1; fi
  sleep 1
done

mmoffload generate "$work/offloaded.jsonl" --server "http://127.0.0.1:$port" -o "$work/generated.jsonl" \
  --max-tokens 8 --temperature 0
mmoffload refs "$work/generated.jsonl" --run-dir "$run" --model "$work/model"
mmoffload pack "$run" --seq-len 4096
mmoffload audit "$run" --verify-hashes --expect examples=8 --expect micro_batches_with_mm_refs=8 \
  --expect eager_mm_kwargs=0 --expect descriptors=24 --expect file_uris=24 \
  --expect data_uris=0 --expect missing_files=0 --expect type_ids_present=true

# Parity: only turns the server sampled are trained (the fixture's own carry handwritten logprobs).
"$python" "$repo/scripts/as_context.py" "$work/offloaded.jsonl" "$work/context.jsonl"
mmoffload generate "$work/context.jsonl" --server "http://127.0.0.1:$port" -o "$work/sampled.jsonl" \
  --max-tokens 8 --temperature 0 -q
mmoffload refs "$work/sampled.jsonl" --run-dir "$work/parity_run" --model "$work/model" \
  --allow-root "$run/assets/images" -q
mmoffload pack "$work/parity_run" --seq-len 8192 -q
mmoffload parity "$work/parity_run" --model "$work/model" --dtype float32 --allow-root "$run/assets/images"

echo "smoke_vllm: ok"
