# shellcheck shell=bash
# Sourced by the scripts that compare with PyTorch/transformers (bench-compare.sh,
# check-transformers-export.sh): `ensure_bench_venv DIR` creates the Python venv with torch,
# transformers and TRL once. torch comes from PyTorch's CPU wheel index, else from PyPI (whose
# default wheel pulls the CUDA libraries, several GB, and runs the same CPU kernels).
ensure_bench_venv() {
  local venv=$1
  if [ ! -x "$venv/bin/python" ]; then
    echo "creating the Python venv $venv (torch, transformers, TRL)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet --no-cache-dir torch --index-url https://download.pytorch.org/whl/cpu ||
      "$venv/bin/pip" install --quiet --no-cache-dir torch
    "$venv/bin/pip" install --quiet --no-cache-dir transformers trl datasets accelerate
  fi
}
