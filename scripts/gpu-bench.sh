#!/usr/bin/env bash
# The GPU benchmark of issue #20 §4, in two halves: the GPU machine has no network and no Rust
# toolchain, and what travels to it is capped (64 MiB per call on the lent machines), so the
# binaries are built here and the models are made there.
#
#   scripts/gpu-bench.sh build   on a CPU machine: installs the pinned nvcc (cuda-toolchain.sh),
#                                builds the release benches with --features cuda and copies them,
#                                stripped, with SmolLM2's tokenizer files, into .gpu-bench/
#                                (in .gitignore; carry it to the GPU machine)
#   scripts/gpu-bench.sh run     on the GPU machine, from the repository root: makes a randomly
#                                initialised SmolLM2-135M-shaped HF directory (the 98 MB GGUF does
#                                not fit what travels; step time does not depend on the weights:
#                                generation runs a fixed number of tokens), then runs
#                                scripts/bench-compare.sh with DEVICE=cuda: the reward step (bert),
#                                the DPO step, generation, each beside PyTorch on the same GPU,
#                                and our PPO step, alternating, ROUNDS rounds (default 3), and
#                                prints the ratios. Results go to $OUT when it is set.
#
# The PyTorch side uses the machine's python3 (PYTHON) if it has torch and transformers; without
# them only our side runs, and the summary says so. Budget: the whole `run` takes ~6-8 minutes
# on an H100 (first CUDA step JIT-compiles candle's PTX, ~15 s per binary).
# Env: ROUNDS (3), PYTHON (python3), CUDA_COMPUTE_CAP (build: 90), CASES (run: bert dpo generate ppo).
set -euo pipefail
cd "$(dirname "$0")/.."

PACK=.gpu-bench
BENCHES=(bert_step dpo_step generate ppo_step)
log() { echo "gpu-bench: $*" >&2; }

build() {
  eval "$(scripts/cuda-toolchain.sh)"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda-release}
  log "cargo build --release --features cuda (target $CARGO_TARGET_DIR, compute cap $CUDA_COMPUTE_CAP)"
  cargo build --release --locked --features cuda "${BENCHES[@]/#/--bench=}"
  rm -rf "$PACK"
  mkdir -p "$PACK/bin" "$PACK/smollm2-shape"
  for b in "${BENCHES[@]}"; do
    src=$(find "$CARGO_TARGET_DIR/release/deps" -maxdepth 1 -type f -executable -name "$b-*" -printf '%T@ %p\n' | sort -n | tail -n1 | cut -d' ' -f2)
    [ -n "$src" ] || { log "no $b binary under $CARGO_TARGET_DIR/release/deps"; exit 1; }
    strip -o "$PACK/bin/$b" "$src"
  done
  # SmolLM2's tokenizer, config and chat template (not its weights) from the reference policy.
  local ref=${SMOLLM_REF:-../shared/reference/tiny-llama-policy}
  cp "$ref/tokenizer.json" "$ref/tokenizer_config.json" "$ref/chat_template.jinja" "$PACK/smollm2-shape/"
  du -sh "$PACK" >&2
  log "carry $PACK to the GPU machine, then run: scripts/gpu-bench.sh run"
}

# SmolLM2-135M-Instruct's shape (its config.json) with random weights, written by transformers.
make_model() {
  local dir=$1
  "$PY" - "$dir" <<'EOF'
import sys, torch, transformers
cfg = transformers.LlamaConfig(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
    tie_word_embeddings=True,
    bos_token_id=1, eos_token_id=2, pad_token_id=2, hidden_act="silu")
torch.manual_seed(0)
model = transformers.LlamaForCausalLM(cfg).to(torch.float32)
model.save_pretrained(sys.argv[1], safe_serialization=True)
print(f"random SmolLM2-135M-shaped model: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
EOF
}

run() {
  [ -d "$PACK/bin" ] || { log "no $PACK/bin: run 'scripts/gpu-bench.sh build' on a CPU machine and carry $PACK"; exit 1; }
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >&2 ||
    log "nvidia-smi found no GPU"
  PY=${PYTHON:-python3}
  local out=${OUT:-target/gpu-bench}
  mkdir -p "$out"
  local cases
  read -r -a cases <<< "${CASES:-bert dpo generate ppo}"
  if "$PY" -c 'import torch, transformers; assert torch.cuda.is_available()' 2>/dev/null; then
    local model=$PACK/smollm2-shape
    [ -f "$model/model.safetensors" ] || make_model "$model"
    export PYTHON=$PY MODEL_DIR=$PWD/$model
  else
    log "no python with CUDA torch and transformers here: our side only (bert, dpo)"
    cases=(bert dpo)
    export PYTHON=$PY REFERENCE=none
  fi
  DEVICE=cuda BENCH_BIN_DIR=$PWD/$PACK/bin BENCH_OUT=$out/logs ROUNDS=${ROUNDS:-3} \
    scripts/bench-compare.sh "${cases[@]}" | tee "$out/summary.md"
}

case "${1:-}" in
  build) build ;;
  run) run ;;
  *)
    echo "usage: scripts/gpu-bench.sh build|run
hint: 'build' on a CPU machine with Rust, then carry .gpu-bench and 'run' on the GPU machine" >&2
    exit 2
    ;;
esac
