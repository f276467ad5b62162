#!/usr/bin/env bash
# Installs one pinned rlhf-bot release binary and checks it against the sha256 the caller pinned,
# BEFORE anything is unpacked: a tag can be moved and a release asset replaced, the pinned hash
# cannot. Used by the composite actions (action.yml, install/action.yml) and by hand.
#
# Usage: scripts/install-rlhf-bot.sh --version vX.Y.Z --sha256 HEX [options]
#   --version TAG      release tag (env RLHF_BOT_VERSION); "latest" only with --allow-latest
#   --sha256 HEX       expected sha256 of the tarball (env RLHF_BOT_SHA256); always required
#   --flavour cpu|cuda which build (env RLHF_BOT_FLAVOUR, default cpu; cuda is x86_64 only)
#   --repo OWNER/NAME  repository publishing the releases (env RLHF_BOT_REPO, default rlhf-bot/rlhf-bot)
#   --server URL       (env RLHF_BOT_SERVER, else $GITHUB_SERVER_URL, else https://github.com)
#   --dir DIR          where to unpack (env RLHF_BOT_DIR, default $RUNNER_TEMP/rlhf-bot, else
#                      ${TMPDIR:-/tmp}/rlhf-bot)
#   --allow-latest     accept "latest" (env RLHF_BOT_ALLOW_LATEST=true): not reproducible, and the
#                      pinned sha256 stops matching at the next release
# It downloads ${server}/${repo}/releases/download/${version}/${asset}, where asset is
# rlhf-bot-[cuda-]<arch>-unknown-linux-gnu.tar.gz; in GitHub Actions it appends the directory to
# $GITHUB_PATH and writes the step outputs `path` and `version`.
# Public releases only: a private repository's assets need the API; use `gh release download`
# and check the sha256 the same way.
set -euo pipefail

prog=install-rlhf-bot

# One error path: a plain message on stderr for people, and in GitHub Actions also an `::error::`
# annotation (one line; the runner reads workflow commands from stdout) so it shows on the run page.
die() {
  local msg="$1"
  echo "$prog: error: $msg" >&2
  if [ "${GITHUB_ACTIONS:-}" = true ]; then
    local one_line=${msg//'%'/'%25'}
    one_line=${one_line//$'\n'/'%0A'}
    echo "::error title=rlhf-bot install::$one_line"
  fi
  exit 1
}

warn() {
  echo "$prog: warning: $1" >&2
  if [ "${GITHUB_ACTIONS:-}" = true ]; then
    echo "::warning title=rlhf-bot install::${1//$'\n'/'%0A'}"
  fi
}

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'
}

version=${RLHF_BOT_VERSION:-}
sha256=${RLHF_BOT_SHA256:-}
flavour=${RLHF_BOT_FLAVOUR:-cpu}
repo=${RLHF_BOT_REPO:-rlhf-bot/rlhf-bot}
server=${RLHF_BOT_SERVER:-${GITHUB_SERVER_URL:-https://github.com}}
dir=${RLHF_BOT_DIR:-}
allow_latest=${RLHF_BOT_ALLOW_LATEST:-false}

while [ $# -gt 0 ]; do
  case "$1" in
    --version) version=${2-}; shift 2 || die "--version needs a value" ;;
    --sha256) sha256=${2-}; shift 2 || die "--sha256 needs a value" ;;
    --flavour | --flavor) flavour=${2-}; shift 2 || die "--flavour needs a value" ;;
    --repo) repo=${2-}; shift 2 || die "--repo needs a value" ;;
    --server) server=${2-}; shift 2 || die "--server needs a value" ;;
    --dir) dir=${2-}; shift 2 || die "--dir needs a value" ;;
    --allow-latest) allow_latest=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument '$1'
hint: see $0 --help" ;;
  esac
done

# --- validate every input before touching the network ---------------------------------------
[ -n "$version" ] || die "no version given
hint: pass --version vX.Y.Z (or set RLHF_BOT_VERSION), the release tag to install"
case "$version" in
  latest)
    [ "$allow_latest" = true ] || die "version 'latest' refused: it installs whatever was released last, so runs are not reproducible
hint: pin a tag (e.g. --version v0.1.0) with its sha256, or pass --allow-latest (RLHF_BOT_ALLOW_LATEST=true) to accept it"
    warn "installing 'latest': not reproducible, and the pinned sha256 stops matching at the next release; pin a tag instead" ;;
  *[!A-Za-z0-9._+-]*) die "version '$version' is not a release tag
hint: tags look like v0.1.0" ;;
esac

sha256=$(printf '%s' "$sha256" | tr -d '[:space:]' | tr 'A-F' 'a-f')
sha256=${sha256#sha256:}
[ -n "$sha256" ] || die "no sha256 given for $version
hint: pass --sha256 (or set RLHF_BOT_SHA256) to the value in the release's <asset>.sha256 file; docs/install.md says where to read it"
case "$sha256" in
  *[!0-9a-f]*) die "sha256 '$sha256' is not hexadecimal
hint: a sha256 is 64 hexadecimal characters, as in the release's <asset>.sha256 file" ;;
esac
[ ${#sha256} -eq 64 ] || die "sha256 '$sha256' has ${#sha256} characters, not 64
hint: copy the whole first field of the release's <asset>.sha256 file"

case "$repo" in
  */*) ;;
  *) die "repo '$repo' is not OWNER/NAME
hint: e.g. --repo rlhf-bot/rlhf-bot" ;;
esac
server=${server%/}

case "$(uname -m)" in
  x86_64 | amd64) arch=x86_64 ;;
  aarch64 | arm64) arch=aarch64 ;;
  *) die "no rlhf-bot release for this machine ($(uname -m))
hint: build from source: cargo install --git $server/$repo --locked --tag <tag>" ;;
esac
case "$flavour" in
  cpu) asset="rlhf-bot-${arch}-unknown-linux-gnu.tar.gz" ;;
  cuda)
    [ "$arch" = x86_64 ] || die "the CUDA build exists for x86_64 only, this machine is $arch
hint: use --flavour cpu, or build with --features cuda on this machine"
    asset="rlhf-bot-cuda-${arch}-unknown-linux-gnu.tar.gz" ;;
  *) die "flavour '$flavour' is neither cpu nor cuda
hint: --flavour cpu (any runner) or --flavour cuda (NVIDIA GPU runner)" ;;
esac

if [ -z "$dir" ]; then
  dir="${RUNNER_TEMP:-${TMPDIR:-/tmp}}/rlhf-bot"
fi

if command -v sha256sum >/dev/null 2>&1; then
  hash_of() { sha256sum "$1" | cut -d' ' -f1; }
elif command -v shasum >/dev/null 2>&1; then
  hash_of() { shasum -a 256 "$1" | cut -d' ' -f1; }
else
  die "neither sha256sum nor shasum found
hint: install coreutils"
fi
command -v curl >/dev/null 2>&1 || die "curl not found
hint: install curl"

# --- download into a private scratch directory -------------------------------------------------
if [ "$version" = latest ]; then
  url="$server/$repo/releases/latest/download/$asset"
else
  url="$server/$repo/releases/download/$version/$asset"
fi
scratch=$(mktemp -d "${RUNNER_TEMP:-${TMPDIR:-/tmp}}/rlhf-bot-download.XXXXXX")
trap 'rm -rf "$scratch"' EXIT
tarball="$scratch/$asset"

echo "$prog: downloading $url" >&2
# --retry covers timeouts, refused connections and 408/429/5xx; a 404 is an answer, not a
# transient failure, so it is reported at once.
status=0
http_code=$(curl --silent --show-error --location --fail \
  --retry 5 --retry-delay 2 --retry-connrefused --connect-timeout 20 --max-time 900 \
  --output "$tarball" --write-out '%{http_code}' "$url") || status=$?
if [ "$status" -ne 0 ]; then
  case "$http_code" in
    404) die "$asset not found in release '$version' of $repo (HTTP 404 from $url)
hint: check that the tag exists and that its release lists $asset (the release workflow attaches it); a fork publishes its own releases: set the repo to yours" ;;
    000) die "could not download $url (curl exit $status, no HTTP answer)
hint: check the network and the server URL '$server'" ;;
    *) die "could not download $url (HTTP $http_code, curl exit $status)
hint: retry later; if it persists, check the release page of $repo" ;;
  esac
fi

# --- verify, then unpack ------------------------------------------------------------------------
actual=$(hash_of "$tarball")
if [ "$actual" != "$sha256" ]; then
  die "sha256 mismatch for $asset ($version from $url)
  expected: $sha256
  actual:   $actual
Nothing was unpacked or installed.
hint: if you just changed the version, set the sha256 to the one in $asset.sha256 of release $version; if the version did not change, the asset was replaced or altered in transit: do not use it, and tell the maintainers of $repo"
fi
echo "$prog: sha256 verified: $actual" >&2

mkdir -p "$dir"
tar -xzf "$tarball" -C "$dir" || die "could not unpack $asset into $dir
hint: check the disk space and that $dir is writable"
[ -x "$dir/rlhf-bot" ] || die "$asset holds no executable rlhf-bot at its top level (looked in $dir)
hint: the release was not built by this project's release workflow"

# --- make it usable ---------------------------------------------------------------------------
if ! installed=$("$dir/rlhf-bot" --version 2>&1); then
  if [ "$flavour" = cuda ]; then
    die "the CUDA build does not start here: $installed
hint: it needs the NVIDIA driver (libcuda.so.1) of a GPU machine; on a CPU runner use --flavour cpu"
  fi
  die "rlhf-bot --version failed: $installed
hint: the binary needs glibc 2.35 or newer (Ubuntu 22.04+)"
fi
case "$version" in
  v*) [ "$installed" = "rlhf-bot ${version#v}" ] || warn "tag $version installed a binary that says '$installed'" ;;
esac
if [ -n "${GITHUB_PATH:-}" ]; then
  echo "$dir" >>"$GITHUB_PATH"
fi
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  {
    echo "path=$dir"
    echo "version=$installed"
  } >>"$GITHUB_OUTPUT"
fi
echo "$prog: installed $installed ($flavour, $asset) in $dir"
