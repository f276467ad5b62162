#!/usr/bin/env bash
# Our benchmarks against PyTorch / transformers / TRL on the same machine, alternated, ROUNDS
# rounds (default 3), printing the ratio of the medians. Machines differ from one day to the next
# (AVX2-only one day, AVX-512 + AMX the next), so only these side-by-side ratios mean anything.
#
#   scripts/bench-compare.sh [bert] [bert-bf16] [dpo] [generate] [ppo] [reward-e2e] [pull]
#   (default: all but bert-bf16, which needs a CPU with AVX512_BF16, and ppo)
#
# Cases:
#   bert        MiniLM reward step, 16 x 128 (cargo bench --bench bert_step | bench-pytorch.py bert)
#   bert-bf16   the same step with bf16 matmul inputs and f32 accumulation (BENCH_PRECISION=bf16)
#               beside PyTorch in f32 and under torch.autocast("cpu", dtype=torch.bfloat16)
#   dpo         tiny-Llama DPO step, 8+8 x 256 (dpo_step | bench-pytorch.py dpo)
#   generate    SmolLM2-135M greedy generation, batch 1 and 8 (generate | transformers)
#   ppo         our PPO step on SmolLM2-135M + LoRA (ppo_step: rollouts, scoring, 4 epochs);
#               ours only: TRL 1.16 has no PPOTrainer any more
#   reward-e2e  `rlhf-bot train reward` vs TRL's RewardTrainer: all-MiniLM-L6-v2, 2,000 HH-RLHF
#               pairs (E2E_PAIRS), max length 256, batch 16, 1 epoch, lr 5e-5; wall time of the
#               whole command (load, train, evaluate the 312 held-out pairs once, as TRL
#               does here) and held-out accuracy. Only the pairs that fit 256 tokens are
#               trained on (TRL drops longer ones where we truncate), so both sides see the
#               same pairs.
#   pull        `rlhf-bot pull` of 1,000,000 records from a loopback API (ours only: target
#               <= 10 s and <= 200 MB)
# The Python side lives in its own venv ($RLHF_BENCH_VENV, default ~/.cache/rlhf-bot/bench-venv):
# torch from PyTorch's CPU wheel index (else PyPI), transformers and TRL from PyPI. Models come from
# scripts/fetch-models.sh; the HH data from $HH_DATA (a harmless-base .jsonl.gz).
# Env: ROUNDS, THREADS (2), RLHF_MODELS_DIR, RLHF_BENCH_VENV, HH_DATA, BENCH_OUT, E2E_PAIRS (2000).
# On a GPU (scripts/gpu-bench.sh sets these): DEVICE=cuda runs both sides there; BENCH_BIN_DIR,
# prebuilt bench binaries (nothing is built or fetched); PYTHON, an interpreter that already has
# torch and transformers (no venv is made); MODEL_DIR, an HF directory of SmolLM2's shape for
# generate and ppo when the GGUF is not there; REFERENCE=none, our side only (no torch there).
set -euo pipefail
cd "$(dirname "$0")/.."

ROUNDS=${ROUNDS:-3}
export THREADS=${THREADS:-2}
export DEVICE=${DEVICE:-cpu}
export RAYON_NUM_THREADS=$THREADS
MODELS=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
VENV=${RLHF_BENCH_VENV:-$HOME/.cache/rlhf-bot/bench-venv}
OUT=${BENCH_OUT:-target/bench-compare}
HH_DATA=${HH_DATA:-../shared/data/hh-rlhf-harmless-test/harmless-base-test.jsonl.gz}
E2E_PAIRS=${E2E_PAIRS:-2000}
CASES=("$@")
[ ${#CASES[@]} -gt 0 ] || CASES=(bert dpo generate reward-e2e pull)
mkdir -p "$OUT"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"

log() { echo "bench-compare: $*" >&2; }
# One measurement: case, side, value, unit ("s" lower is better, "tok/s" higher is better).
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >> "$RESULTS"; }
# The first number after a marker text in a file.
after() { grep -m1 -oE -- "$2 *[0-9]+(\.[0-9]+)?" "$1" | head -n1 | grep -oE '[0-9]+(\.[0-9]+)?$'; }

source scripts/lib/bench-venv.sh

if [ -n "${BENCH_BIN_DIR:-}" ]; then
  # Prebuilt (a GPU machine: no toolchain, no network): binaries named as the benches are.
  bench_bin() { echo "$BENCH_BIN_DIR/$1"; }
  BIN=$BENCH_BIN_DIR/rlhf-bot
else
  scripts/fetch-models.sh >/dev/null
  log "building the release benchmarks and binary"
  cargo build --release --quiet --benches --bins --examples
  bench_bin() { find target/release/deps -maxdepth 1 -type f -executable -name "$1-*" -printf '%T@ %p\n' | sort -n | tail -n1 | cut -d' ' -f2; }
  BIN=target/release/rlhf-bot
fi
if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
else
  ensure_bench_venv "$VENV"
  PY=$VENV/bin/python
fi

# One PyTorch case of scripts/bench-pytorch.py (nothing when REFERENCE=none).
pytorch() {
  if [ "${REFERENCE:-pytorch}" = none ]; then
    echo "skipped: REFERENCE=none"
  else
    "$PY" scripts/bench-pytorch.py "$@"
  fi
}

# SmolLM2 as an f32 Hugging Face directory, for transformers (converted once from the GGUF), or
# MODEL_DIR when given.
smollm_hf() {
  if [ -n "${MODEL_DIR:-}" ]; then
    echo "$MODEL_DIR"
    return
  fi
  local dir="$OUT/SmolLM2-135M-Instruct-f32"
  if [ ! -f "$dir/config.json" ]; then
    target/release/examples/gguf_to_hf "$MODELS/SmolLM2-135M-Instruct/"*.gguf "$dir" >&2
  fi
  echo "$dir"
}

# The end-to-end reward data: of the first E2E_PAIRS of the first 2,000 pairs, those whose two
# answers fit the max length as TRL counts it (its tokenisation plus the EOS it appends), so both
# sides train on the same pairs: TRL's RewardTrainer drops a longer pair where we would truncate
# it. The remaining 312 pairs are held out, untouched (both sides truncate them at 256).
reward_data() {
  if [ ! -f "$OUT/hh-train-fit-$E2E_PAIRS.jsonl" ]; then
    "$PY" - "$HH_DATA" "$OUT" "$E2E_PAIRS" "$MODELS/all-MiniLM-L6-v2" <<'EOF'
import gzip, json, sys
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[4])
fits = lambda text: len(tok(text)["input_ids"]) + 1 <= 256
rows = [json.loads(l) for l in gzip.open(sys.argv[1], "rt") if l.strip()]
train = [r for r in rows[:min(int(sys.argv[3]), 2000)] if fits(r["chosen"]) and fits(r["rejected"])]
with open(f"{sys.argv[2]}/hh-train-fit-{sys.argv[3]}.jsonl", "w") as f:
    for r in train:
        f.write(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
with open(f"{sys.argv[2]}/hh-eval.jsonl", "w") as f:
    for r in rows[2000:]:
        f.write(json.dumps({"chosen": r["chosen"], "rejected": r["rejected"]}) + "\n")
print(f"reward-e2e data: {len(train)} of {min(int(sys.argv[3]), 2000)} pairs fit 256 tokens", file=sys.stderr)
EOF
  fi
}

run_case() {
  local case=$1 round=$2 log="$OUT/$1-$2"
  case $case in
    bert)
      BENCH_STEPS=6 "$(bench_bin bert_step)" > "$log.ours" 2>&1
      record bert ours "$(after "$log.ours" 'median')" s
      pytorch bert > "$log.theirs" 2>&1
      record bert pytorch "$(after "$log.theirs" 'median')" s ;;
    bert-bf16)
      BENCH_STEPS=6 BENCH_PRECISION=bf16 "$(bench_bin bert_step)" > "$log.ours" 2>&1
      record bert-bf16 ours "$(after "$log.ours" 'median')" s
      pytorch bert > "$log.theirs" 2>&1
      record bert-bf16 pytorch-f32 "$(after "$log.theirs" 'median')" s
      pytorch bert-bf16 > "$log.autocast" 2>&1
      record bert-bf16 pytorch-bf16-autocast "$(after "$log.autocast" 'median')" s ;;
    dpo)
      STEPS=3 "$(bench_bin dpo_step)" > "$log.ours" 2>&1
      record dpo ours "$(after "$log.ours" 'median')" s
      pytorch dpo > "$log.theirs" 2>&1
      record dpo pytorch "$(after "$log.theirs" 'median')" s ;;
    generate)
      RUNS=3 "$(bench_bin generate)" > "$log.ours" 2>&1
      record generate-b1 ours "$(grep -E '^batch 1(:|, weights f32:)' "$log.ours" | grep -o '[0-9.]* tok/s' | grep -o '^[0-9.]*')" tok/s
      record generate-b8 ours "$(grep -E '^batch 8(:|, weights f32:)' "$log.ours" | grep -o '[0-9.]* tok/s' | grep -o '^[0-9.]*')" tok/s
      MODEL_DIR=$(smollm_hf) pytorch generate > "$log.theirs" 2>&1
      record generate-b1 transformers "$(after "$log.theirs" 'generate batch 1:')" tok/s
      record generate-b8 transformers "$(after "$log.theirs" 'generate batch 8:')" tok/s ;;
    ppo)
      STEPS=2 "$(bench_bin ppo_step)" > "$log.ours" 2>&1
      record ppo ours "$(sed -n '/^steady step/,$p' "$log.ours" | after /dev/stdin 'total')" s ;;
    reward-e2e)
      reward_data
      local ours_dir="$OUT/reward-e2e-ours-$round"
      rm -rf "$ours_dir"
      /usr/bin/time -f '%e s wall, %M KB peak' -o "$log.ours.time" "$BIN" --format json \
        --config configs/example.yaml train reward --model "$MODELS/all-MiniLM-L6-v2" \
        --dataset "$OUT/hh-train-fit-$E2E_PAIRS.jsonl" --eval "$OUT/hh-eval.jsonl" --max-length 256 \
        --batch-size 16 --epochs 1 --lr 5e-5 --eval-every 0 --out "$ours_dir" > "$log.ours" 2> "$log.ours.err"
      record reward-e2e ours "$(after "$log.ours.time" '')" s
      record reward-e2e-accuracy ours "$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["metrics"]["eval"]["accuracy"])' "$log.ours")" acc
      /usr/bin/time -f '%e s wall, %M KB peak' -o "$log.theirs.time" "$PY" \
        scripts/bench-trl-reward.py "$MODELS/all-MiniLM-L6-v2" "$OUT/hh-train-fit-$E2E_PAIRS.jsonl" \
        "$OUT/hh-eval.jsonl" > "$log.theirs" 2>&1
      record reward-e2e trl "$(after "$log.theirs.time" '')" s
      record reward-e2e-accuracy trl "$(after "$log.theirs" 'accuracy')" acc ;;
    pull)
      "$(bench_bin pull)" > "$log.ours" 2>&1
      record pull ours "$(after "$log.ours" '^pull')" s ;;
    *) log "unknown case $case"; exit 2 ;;
  esac
}

for round in $(seq 1 "$ROUNDS"); do
  for case in "${CASES[@]}"; do
    log "round $round/$ROUNDS: $case"
    run_case "$case" "$round"
  done
done

echo "## bench-compare ($(date -u +%Y-%m-%dT%H:%MZ), $ROUNDS rounds, $THREADS threads, device $DEVICE)"
echo
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p')"
echo "Flags: $(lscpu | sed -n 's/^Flags: *//p' | tr ' ' '\n' | grep -E '^(avx|avx2|fma|avx512[a-z_0-9]*|amx[a-z_0-9]*)$' | tr '\n' ' ')"
if [ "$DEVICE" = cuda ]; then
  echo "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo unknown)"
fi
echo
"$PY" - "$RESULTS" <<'EOF'
import collections, statistics, sys
rows = collections.defaultdict(list)
units = {}
for line in open(sys.argv[1]):
    case, side, value, unit = line.rstrip("\n").split("\t")
    if value:
        rows[(case, side)].append(float(value))
        units[case] = unit
print("| case | side | median | all rounds |")
print("|---|---|---:|---|")
medians = {}
for (case, side), values in sorted(rows.items()):
    medians[(case, side)] = statistics.median(values)
    print(f"| {case} | {side} | {medians[(case, side)]:.3f} {units[case]} | {', '.join(f'{v:.3f}' for v in values)} |")
print()
print("| case | reference | ratio (ours vs reference) |")
print("|---|---|---|")
for case in sorted({c for c, _ in medians}):
    ours = medians.get((case, "ours"))
    if ours is None:
        continue
    # One row per reference (bert-bf16 has two: PyTorch in f32 and under bf16 autocast).
    for (c, side), ref in sorted(medians.items()):
        if c != case or side == "ours":
            continue
        if units[case] == "s":
            print(f"| {case} | {side} | ours takes {ours / ref:.2f}x the reference's time |")
        elif units[case] == "tok/s":
            print(f"| {case} | {side} | ours is {ours / ref:.2f}x the reference's speed |")
        else:
            print(f"| {case} | {side} | ours {ours:.3f} vs {ref:.3f} |")
EOF
