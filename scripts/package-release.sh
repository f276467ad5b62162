#!/usr/bin/env bash
# Packs one built rlhf-bot binary into the release tarball that scripts/install-rlhf-bot.sh
# installs, and writes its `<asset>.sha256` (sha256sum format) beside it. Run by
# .github/workflows/release.yml; runs anywhere the binary was built.
#
# Usage: scripts/package-release.sh cpu|cuda TARGET BINARY OUT_DIR
#   cpu:  OUT_DIR/rlhf-bot-TARGET.tar.gz holding the binary `rlhf-bot`
#   cuda: OUT_DIR/rlhf-bot-cuda-TARGET.tar.gz holding
#           rlhf-bot          a wrapper that puts lib/ on LD_LIBRARY_PATH and runs bin/rlhf-bot
#           bin/rlhf-bot      the binary
#           lib/              every CUDA toolkit library the binary links (cuBLAS, cuBLASLt,
#                             cuRAND, NVRTC and its builtins, the CUDA runtime: whatever this
#                             candle version links), found with ldd
#           NOTICE-CUDA.txt   where those libraries come from
#         so that a GPU machine needs only the NVIDIA driver (libcuda.so.1, never shipped: it
#         must match the driver's kernel module).
# Env (cuda): CUDA_LIB, the toolkit's library directory (default /usr/local/cuda/lib64), and
# CUDA_STUBS, its driver stubs (default $CUDA_LIB/stubs), used to start the packed binary once.
set -euo pipefail

die() {
  echo "package-release: error: $1" >&2
  exit 1
}

[ $# -eq 4 ] || die "expected 4 arguments, got $#
hint: scripts/package-release.sh cpu|cuda TARGET BINARY OUT_DIR"
flavour=$1 target=$2 bin=$3 out=$4
[ -x "$bin" ] || die "no executable at $bin
hint: build it first (cargo build --release --locked [--features cuda] --target $target)"
mkdir -p "$out"
out=$(cd "$out" && pwd)

# Writes the tarball of $1 (a directory) and its sha256 file.
pack() {
  local from=$1 asset=$2
  shift 2
  tar -czf "$out/$asset" -C "$from" "$@"
  (cd "$out" && sha256sum "$asset" >"$asset.sha256" && cat "$asset.sha256")
}

case "$flavour" in
  cpu)
    "$bin" --version
    pack "$(dirname "$bin")" "rlhf-bot-$target.tar.gz" "$(basename "$bin")"
    exit 0 ;;
  cuda) ;;
  *) die "flavour '$flavour' is neither cpu nor cuda" ;;
esac

cuda_lib=${CUDA_LIB:-/usr/local/cuda/lib64}
stubs=${CUDA_STUBS:-$cuda_lib/stubs}
[ -d "$cuda_lib" ] || die "no CUDA library directory at $cuda_lib
hint: set CUDA_LIB to the toolkit's lib64"
pkg=$(mktemp -d)
trap 'rm -rf "$pkg"' EXIT
mkdir -p "$pkg/bin" "$pkg/lib"
cp "$bin" "$pkg/bin/rlhf-bot"

# Every library the binary needs that resolves into the toolkit directory. libcuda.so.1 resolves
# nowhere on a build machine without a driver and is not shipped anyway.
links=$(LD_LIBRARY_PATH="$cuda_lib" ldd "$bin")
echo "$links"
cuda_real=$(readlink -f "$cuda_lib")
while read -r soname arrow path _; do
  [ "$arrow" = "=>" ] || continue
  case "$(readlink -f "$path" 2>/dev/null || true)" in
    "$cuda_real"/* | "$cuda_lib"/*) cp -L "$path" "$pkg/lib/$soname" ;;
  esac
done <<<"$links"
# NVRTC opens its builtins library at run time (dlopen), so ldd does not list it.
if compgen -G "$pkg/lib/libnvrtc.so.*" >/dev/null; then
  compgen -G "$cuda_lib/libnvrtc-builtins.so.*" >/dev/null ||
    die "the binary links NVRTC but $cuda_lib has no libnvrtc-builtins.so.*"
  cp -L "$cuda_lib"/libnvrtc-builtins.so.* "$pkg/lib/"
fi
compgen -G "$pkg/lib/libcublas.so*" >/dev/null ||
  die "the binary links no cuBLAS from $cuda_lib: is it a --features cuda build?
$links"
ls -l "$pkg/lib"

cat >"$pkg/rlhf-bot" <<'WRAPPER'
#!/bin/sh
# rlhf-bot, CUDA build: runs bin/rlhf-bot with the CUDA libraries shipped in lib/ (they come
# first, so another toolkit on the machine cannot shadow them). The machine needs only the
# NVIDIA driver (libcuda.so.1).
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$here/bin/rlhf-bot" "$@"
WRAPPER
chmod +x "$pkg/rlhf-bot"
cuda_version=$(nvcc --version 2>/dev/null | sed -n 's/.*release \([0-9.]*\).*/\1/p' || true)
cat >"$pkg/NOTICE-CUDA.txt" <<EOF
The files in lib/ are runtime libraries of the NVIDIA CUDA Toolkit ${cuda_version:-(version unknown)},
redistributed unmodified under the NVIDIA CUDA Toolkit EULA: https://docs.nvidia.com/cuda/eula/
EOF

# Self-contained: with only lib/ on the search path, everything but the driver must resolve
# there. Then the packed wrapper starts once, with the toolkit's driver stub as libcuda.so.1.
missing=$(LD_LIBRARY_PATH="$pkg/lib" ldd "$pkg/bin/rlhf-bot" | awk '/not found/ && $1 != "libcuda.so.1" {print $1}')
[ -z "$missing" ] || die "the CUDA tarball would miss: $missing"
stub_dir="$pkg.stub"
mkdir -p "$stub_dir"
trap 'rm -rf "$pkg" "$stub_dir"' EXIT
if [ -e "$stubs/libcuda.so" ]; then
  ln -sf "$stubs/libcuda.so" "$stub_dir/libcuda.so.1"
fi
LD_LIBRARY_PATH="$stub_dir" "$pkg/rlhf-bot" --version ||
  die "the packed CUDA build does not start"

pack "$pkg" "rlhf-bot-cuda-$target.tar.gz" rlhf-bot bin lib NOTICE-CUDA.txt
