#!/usr/bin/env bash
# Can a team score with the BERT reward model that `rlhf-bot export-model --to hf` writes, without
# rlhf-bot? (issue #16, serving hand-off.) Steps, in a scratch directory:
#   1. a reward model on all-MiniLM-L6-v2 with seeded score, aspect and step heads
#      (examples/score_reward.rs init: the numerics are what matter, not training);
#   2. `export-model --to hf --dtype f32` and the default bf16 (sentence-transformers layout);
#   3. the same texts and (prompt, answer) pairs scored by rlhf-bot's loader on the original and by
#      transformers (AutoModel + pooling + Dense) and sentence-transformers (when installed) on
#      the export; the max abs difference is printed.
# The Python side is the benchmark venv ($RLHF_BENCH_VENV, default ~/.cache/rlhf-bot/bench-venv).
# Exit status 1 when the f32 export differs by more than 1e-4 (bf16 weights: 0.1, on rewards of a
# few units).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_BENCH_VENV:-$HOME/.cache/rlhf-bot/bench-venv}
MODELS=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
source scripts/lib/bench-venv.sh

scripts/fetch-models.sh >/dev/null
ensure_bench_venv "$VENV"
cargo build --quiet --bin rlhf-bot --example score_reward
BIN=target/debug/rlhf-bot
SCORE=target/debug/examples/score_reward
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

texts=(
  "A carbon tax puts a price on each tonne of emissions."
  "Carbon leakage is when production moves to places with weaker climate rules."
  $'What is a carbon tax?\tA price on emissions that makes polluting cost more.'
  $'What is a carbon tax?\tI do not know.'
)
"$SCORE" init --from "$MODELS/all-MiniLM-L6-v2" --out "$work/rm" --aspects helpfulness,accuracy \
  --step-head --seed 5
"$SCORE" score --model "$work/rm" "${texts[@]}" > "$work/ours.json"
for dtype in f32 bf16; do
  "$BIN" -q export-model --model "$work/rm" --to hf --dtype "$dtype" --out "$work/st-$dtype" >/dev/null
  tol=$([ "$dtype" = f32 ] && echo 1e-4 || echo 0.1)
  echo "check-reward-export: --dtype $dtype (tolerance $tol)"
  "$VENV/bin/python" scripts/reward-st-scores.py "$work/st-$dtype" "$work/ours.json" "$tol" "${texts[@]}"
done
