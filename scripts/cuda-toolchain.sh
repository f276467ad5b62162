#!/usr/bin/env bash
# Installs the CUDA build toolchain candle's `cuda` feature needs (nvcc, the CUDA runtime and
# CCCL headers) from NVIDIA's PyPI wheels into a venv, so `cargo check|build --features cuda`
# works on a machine without a GPU or a system CUDA toolkit. Pinned versions; running it again
# installs nothing and prints the same environment.
#
#   scripts/cuda-toolchain.sh            install (once), then print `export …` lines
#   eval "$(scripts/cuda-toolchain.sh)"  use them in this shell
#
# The toolkit lands in ${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps}/cuda-venv (~0.2 GB).
# No driver and no libcuda: candle's CUDA backend loads those at run time (cudarc's dynamic
# loading), so building needs only nvcc and headers. CUDA_COMPUTE_CAP picks the GPU generation
# the kernels are compiled for (default 90: H100/H200; T4 is 75, A100 80, L4 89).
set -euo pipefail

DEPS=${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps}
VENV=$DEPS/cuda-venv
# CUDA 13.0 (update 1 runtime): the toolchain of the 2026-11-27 H100 build in docs/benchmarks.md.
PACKAGES=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
)
STAMP=$VENV/.installed

log() { echo "cuda-toolchain: $*" >&2; }

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "${PACKAGES[*]}" ]; then
  command -v python3 >/dev/null || { log "python3 is needed to install the toolchain
hint: apt-get install python3 python3-venv"; exit 1; }
  log "installing ${PACKAGES[*]} into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PACKAGES[@]}"
  echo "${PACKAGES[*]}" > "$STAMP"
fi

# The wheels of CUDA 13 put the toolkit under nvidia/cu13 (bin/, include/, lib/, nvvm/).
ROOT=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
[ -x "$ROOT/bin/nvcc" ] || { log "no nvcc at $ROOT/bin/nvcc after installing ${PACKAGES[*]}
hint: remove $VENV and run this script again"; exit 1; }
# The libraries are shipped as libfoo.so.13; a link-time search for -lcudart wants libfoo.so.
for lib in "$ROOT"/lib/lib*.so.[0-9]*; do
  [ -e "$lib" ] || continue
  base=${lib%%.so.*}.so
  [ -e "$base" ] || ln -s "$(basename "$lib")" "$base"
done

cat <<ENV
export CUDA_ROOT=$ROOT
export CUDA_PATH=$ROOT
export CUDA_HOME=$ROOT
export PATH=$ROOT/bin:\$PATH
export CPATH=$ROOT/include\${CPATH:+:\$CPATH}
export LIBRARY_PATH=$ROOT/lib\${LIBRARY_PATH:+:\$LIBRARY_PATH}
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
ENV
