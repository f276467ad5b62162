#!/usr/bin/env bash
# The policy demo of docs/policy-training.md: a MiniLM reward model on the bundled sample, then
# DPO and PPO with LoRA on SmolLM2-135M-Instruct, each evaluated against the base model on
# held-out prompts (win rate, mean reward, KL to the reference). CPU only; prints the metrics.
#   scripts/demo-smollm2.sh [DPO_STEPS] [PPO_STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_MODELS_DIR=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
scripts/fetch-models.sh >/dev/null
cargo build --release --quiet
bot() { target/release/rlhf-bot --config configs/smollm2-demo.yaml "$@"; }
out=.rlhf/smollm2-demo/demo
rm -rf "$out" && mkdir -p "$out"
bot pull
time bot train reward --model "$RLHF_MODELS_DIR/all-MiniLM-L6-v2" --out "$out/reward"
gguf="$RLHF_MODELS_DIR/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
for algo in dpo ppo; do
    steps=${1:-10}
    [ "$algo" = ppo ] && steps=${2:-4}
    time bot train policy --algo "$algo" --model "$gguf" --reward-model "$out/reward" \
        --steps "$steps" --out "$out/$algo"
    python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(json.dumps(m.get("eval", m), indent=1))' \
        "$out/$algo/metrics.json"
done
