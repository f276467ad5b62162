#!/usr/bin/env bash
# Type-checks the `cuda` feature on a machine without a GPU: installs the pinned nvcc toolchain
# (scripts/cuda-toolchain.sh), then `cargo check --features cuda --all-targets` in its own target
# directory (target/check-cuda), so it neither rebuilds nor invalidates the CPU build's.
# `check`, not `build`: candle-kernels still compiles its .cu files to PTX with nvcc (that is what
# proves the toolchain), but nothing is linked or optimised, which keeps it small.
#
#   scripts/check-cuda.sh [extra cargo args]
# Env: CUDA_COMPUTE_CAP (default 90), CARGO_BUILD_JOBS.
set -euo pipefail
cd "$(dirname "$0")/.."

eval "$(scripts/cuda-toolchain.sh)"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/check-cuda}
echo "check-cuda: nvcc $(nvcc --version | sed -n 's/.*release \([0-9.]*\).*/\1/p'), compute cap $CUDA_COMPUTE_CAP, target $CARGO_TARGET_DIR" >&2
cargo check --locked --features cuda --all-targets "$@"
