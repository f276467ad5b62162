#!/usr/bin/env bash
# GRPO with and without dense step rewards (docs/policy-training.md, "Step rewards: what we saw"):
# on the bundled sample, a llama reward model with a step head (trained from scratch by
# `train reward`, SmolLM2 tokenizer), then GRPO with LoRA on SmolLM2-135M-Instruct twice — with
# policy.reward.step_weight 0 and STEP_WEIGHT, same seed — and prints for each run the held-out
# reward, the held-out step score (the step head's mean probability that the steps of the trained
# policy's held-out answers are right), the KL to the reference and the wall time.
#   scripts/compare-step-rewards.sh [STEPS] [STEP_WEIGHT]
# ALGO=rloo runs RLOO instead of GRPO (step rewards enter its per-token advantage the same way).
# RLHF_BOT picks the binary (default target/release/rlhf-bot, built here if missing: the debug
# build runs the policy ~20x slower). The scale: GENERATIONS completions for each of PROMPTS prompts a
# step (default 2 × 4), COMPLETION_LEN new tokens (48), EVAL_PROMPTS held-out prompts (8).
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_MODELS_DIR=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
steps=${1:-4}
weight=${2:-0.5}
bin=${RLHF_BOT:-target/release/rlhf-bot}
[ -x "$bin" ] || cargo build --release --quiet --bin rlhf-bot
gguf="$RLHF_MODELS_DIR/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
[ -f "$gguf" ] || { echo "missing $gguf; run scripts/fetch-models.sh" >&2; exit 1; }

work=.rlhf/step-rewards
rm -rf "$work" && mkdir -p "$work"
started=$(date -u +%H:%M)
# The SmolLM2 demo config with its store under $work, at the chosen scale.
sed -e "s#\.rlhf/smollm2-demo#$work#g" \
    -e "s/max_completion_length: [0-9]*/max_completion_length: ${COMPLETION_LEN:-48}/" \
    -e "s/eval_prompts: [0-9]*/eval_prompts: ${EVAL_PROMPTS:-8}/" \
    -e "/^policy:/a\\  grpo: {prompts_per_step: ${PROMPTS:-2}, num_generations: ${GENERATIONS:-4}}" \
    configs/smollm2-demo.yaml >"$work/base.yaml"
bot() { "$bin" --config "$1" "${@:2}"; }

bot "$work/base.yaml" pull >/dev/null
bot "$work/base.yaml" train reward --out "$work/reward" >"$work/reward.log" 2>&1
grep -q '"step_head": *true' "$work/reward/config.json" ||
    { echo "the reward model has no step head (does the sample still carry step thumbs?)" >&2; exit 1; }
python3 - "$work/reward/metrics.json" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
ev = m.get("eval", m)
acc = ev.get("step_accuracy", ev.get("eval_step_accuracy"))
print(f"reward model: step head accuracy on held-out step thumbs = {acc}")
EOF

printf '%-12s %14s %16s %12s %10s %10s\n' step_weight held_out_reward held_out_steps kl wall_s steps
for w in 0 "$weight"; do
    cfg="$work/w$w.yaml"
    sed "/^policy:/a\  reward: {step_weight: $w}" "$work/base.yaml" >"$cfg"
    start=$(date +%s.%N)
    bot "$cfg" train policy --algo "${ALGO:-grpo}" --model "$gguf" --reward-model "$work/reward" \
        --steps "$steps" --out "$work/grpo-w$w" >"$work/grpo-w$w.log" 2>&1 ||
        { tail -20 "$work/grpo-w$w.log" >&2; exit 1; }
    end=$(date +%s.%N)
    python3 - "$work/grpo-w$w/metrics.json" "$w" "$start" "$end" "$steps" <<'EOF'
import json, sys
m = json.load(open(sys.argv[1]))
ev = m["eval"]
wall = float(sys.argv[4]) - float(sys.argv[3])
fmt = lambda v: "n/a" if v is None else f"{v:.4f}"
print(f"{sys.argv[2]:<12} {fmt(ev['mean_reward']):>14} {fmt(ev.get('step_score')):>16} "
      f"{fmt(ev['kl']):>12} {wall:>10.1f} {sys.argv[5]:>10}")
print(f"{'':<12} base model: reward {fmt(ev.get('production_mean_reward'))}, "
      f"steps {fmt(ev.get('production_step_score'))}; win rate vs base {fmt(ev['win_rate'])} "
      f"({fmt(ev['win_rate_low'])}-{fmt(ev['win_rate_high'])})")
EOF
    rm -rf "$work/grpo-w$w-base" # the dequantised GGUF (0.5 GB); the run's policy/ stays
done
echo "started $started UTC, ended $(date -u +%H:%M) UTC"
echo "machine: $(lscpu | sed -n 's/^Model name: *//p'), $(nproc) cores; load: $(uptime | sed 's/.*load average/load average/')"
