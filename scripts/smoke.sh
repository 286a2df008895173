#!/usr/bin/env bash
# End-to-end smoke run, as CI and users' smoke scripts use the tool: each stage through the
# `mmoffload` command on the fixture Qwen-VL traces, then the audit with the reference figures
# (audit.md: 4 rollouts with 3 screenshots each). Exits non-zero on the first failing stage.
#
# Usage: scripts/smoke.sh     (needs `mmoffload` on PATH, e.g. an activated venv)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fixtures="$repo/fixtures"
work="$(mktemp -d "${TMPDIR:-/tmp}/mmoffload-smoke.XXXXXX")"
trap 'rm -rf "$work"' EXIT

run="$work/run"
# The asset directory is the run's own, whatever the caller's environment says.
unset VF_RENDERER_IMAGE_OFFLOAD_DIR

mmoffload offload "$fixtures/traces/qwen_vl.jsonl" --assets "$run/assets/images" -o "$work/qwen_vl.offloaded.jsonl"
mmoffload refs "$work/qwen_vl.offloaded.jsonl" --run-dir "$run" --model "$fixtures/models/qwen3_vl"
mmoffload pack "$run" --seq-len 4096
mmoffload audit "$run" --expect examples=4 --expect micro_batches_with_mm_refs=4 \
  --expect eager_mm_kwargs=0 --expect descriptors=12 --expect file_uris=12 \
  --expect data_uris=0 --expect missing_files=0 --expect type_ids_present=true

# The chat-rollout path: the same rollouts as chat messages, rendered with a tiny tokenizer
# (byte-level, the family's chat template) for each family, then refs, pack and audit.
python="$(dirname "$(command -v mmoffload)")/python"  # the interpreter mmoffload runs on
for config in qwen3_vl kimi_k25; do
  chat="$work/chat_$config"
  "$python" -c "import sys; from mmoffload.render.tiny import write_tiny_model; write_tiny_model(sys.argv[1], sys.argv[2])" \
    "$chat/model" "$config"
  mmoffload offload "$fixtures/rollouts/mini_browse.jsonl" --assets "$chat/run/assets/images" -o "$chat/offloaded.jsonl" -q
  mmoffload render "$chat/offloaded.jsonl" --model "$chat/model" -o "$chat/episodes.jsonl" -q
  mmoffload refs "$chat/episodes.jsonl" --run-dir "$chat/run" --model "$chat/model" -q
  mmoffload pack "$chat/run" --seq-len 4096 -q
  mmoffload audit "$chat/run" --verify-hashes --expect examples=4 --expect descriptors=12 \
    --expect file_uris=12 --expect data_uris=0 --expect missing_files=0 -q
done

echo "smoke: ok"
