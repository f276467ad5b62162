#!/usr/bin/env bash
# Does transformers load what `rlhf-bot export-model --to hf` writes, and continue a prompt the way
# rlhf-bot does? (issue: serving hand-off.) Steps, in a scratch directory:
#   1. a few LoRA DPO steps on SmolLM2-135M-Instruct: the example config's `run --force`;
#   2. `export-model --to hf --dtype bf16` of that policy (LoRA merged, config, tokenizer, template);
#   3. greedy continuations of the same prompts by `rlhf-bot generate` and by transformers'
#      `generate` on the export, compared token by token (transformers in f32 over the bf16
#      weights, as rlhf-bot computes, and in bf16 as a serving stack might).
# The Python side is the benchmark venv ($RLHF_BENCH_VENV, default ~/.cache/rlhf-bot/bench-venv),
# created on first use. Exit status 1 when an f32 continuation differs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_BENCH_VENV:-$HOME/.cache/rlhf-bot/bench-venv}
BIN=${RLHF_BOT_BIN:-target/release/rlhf-bot}
NEW_TOKENS=${NEW_TOKENS:-24}
source scripts/lib/bench-venv.sh

scripts/fetch-models.sh >/dev/null
ensure_bench_venv "$VENV"
[ -x "$BIN" ] || cargo build --release --quiet --bin rlhf-bot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

sed -e "s#\.rlhf/example#$work/store#g" -e "s#out/pr#$work/pr#" -e "s#^  dir: reports#  dir: $work/reports#" \
  configs/example.yaml > "$work/config.yaml"
echo "check-transformers-export: training (example config, run --force)" >&2
"$BIN" -q --config "$work/config.yaml" run --force >/dev/null
policy=$(find "$work/store/runs" -mindepth 2 -maxdepth 2 -type d -name policy | head -n1)
echo "check-transformers-export: exporting $policy as hf bf16" >&2
"$BIN" -q export-model --model "$policy" --to hf --dtype bf16 --out "$work/hf" >/dev/null

prompts=(
  "The main effect of a carbon tax on electricity prices is"
  "Question: What is carbon leakage? Answer:"
  "Three ways a city can cut transport emissions are"
)
: > "$work/ours.jsonl"
for p in "${prompts[@]}"; do
  "$BIN" -q --format json generate --model "$work/hf" --prompt "$p" --max-new-tokens "$NEW_TOKENS" \
    --temperature 0 >> "$work/ours.jsonl"
  echo >> "$work/ours.jsonl"
done
"$VENV/bin/python" scripts/transformers-greedy.py "$work/hf" "$work/ours.jsonl" "$NEW_TOKENS"
