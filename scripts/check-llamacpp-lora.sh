#!/usr/bin/env bash
# Does llama.cpp apply `rlhf-bot export-model --to gguf-lora` over the base GGUF the way the
# merged export answers? (issue #16, serving hand-off.) In a scratch directory:
#   1. SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to an f32 HF directory: examples/gguf_to_hf);
#   2. a seeded random LoRA adapter on q/k/v/o (scripts/random-peft-adapter.py), laid out as a
#      `train policy` output over that base;
#   3. exports: the base as gguf-f16, the policy merged as gguf-f16, the adapter as gguf-lora;
#   4. llama.cpp (llama-cpp-python in the bench venv, scripts/llamacpp-greedy.py) continues the
#      prompts greedily with base + --lora and with the merged file; the texts are compared.
# Exit status 1 when a continuation differs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RLHF_BENCH_VENV:-$HOME/.cache/rlhf-bot/bench-venv}
MODELS=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
NEW_TOKENS=${NEW_TOKENS:-24}
"$VENV/bin/python" -c "import llama_cpp" 2>/dev/null || {
  echo "llama-cpp-python is not in $VENV: $VENV/bin/pip install llama-cpp-python (builds llama.cpp, ~10 min)" >&2
  exit 2
}
cargo build --quiet --bin rlhf-bot --example gguf_to_hf
BIN=target/debug/rlhf-bot
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

target/debug/examples/gguf_to_hf "$MODELS/SmolLM2-135M-Instruct/SmolLM2-135M-Instruct.Q4_1.gguf" "$work/base"
mkdir -p "$work/run/policy"
for f in config.json tokenizer.json tokenizer_config.json generation_config.json chat_template.jinja; do
  [ -f "$work/base/$f" ] && cp "$work/base/$f" "$work/run/policy/"
done
"$VENV/bin/python" scripts/random-peft-adapter.py "$work/base" "$work/run/policy/adapter"
"$BIN" -q export-model --model "$work/base" --to gguf-f16 --out "$work/base.gguf" >/dev/null
"$BIN" -q export-model --model "$work/run" --to gguf-f16 --out "$work/merged.gguf" >/dev/null
"$BIN" -q export-model --model "$work/run" --to gguf-lora --out "$work/adapter.gguf" >/dev/null

prompts=(
  "The main effect of a carbon tax on electricity prices is"
  "A carbon tax puts a price on"
  "Three ways a city can cut transport emissions are"
)
status=0
for p in "${prompts[@]}"; do
  merged=$("$VENV/bin/python" scripts/llamacpp-greedy.py "$work/merged.gguf" "$p" "$NEW_TOKENS" | tail -n1)
  lora=$("$VENV/bin/python" scripts/llamacpp-greedy.py "$work/base.gguf" "$p" "$NEW_TOKENS" "$work/adapter.gguf" | tail -n1)
  base=$("$VENV/bin/python" scripts/llamacpp-greedy.py "$work/base.gguf" "$p" "$NEW_TOKENS" | tail -n1)
  echo "prompt: $p"
  echo "  merged gguf-f16:     $merged"
  echo "  base + --lora:       $lora"
  echo "  base (no adapter):   $base"
  if [ "$merged" = "$lora" ]; then echo "  same continuation"; else echo "  DIFFERENT"; status=1; fi
done
exit $status
