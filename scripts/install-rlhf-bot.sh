#!/usr/bin/env bash
# Installs a released rlhf-bot binary (install/action.yml runs this on the runner):
#   ${GITHUB_SERVER_URL}/${RLHF_BOT_REPO}/releases/download/${RLHF_BOT_VERSION}/rlhf-bot-[cuda-]x86_64-unknown-linux-gnu.tar.gz
# is downloaded, checked against RLHF_BOT_SHA256 (a tarball that does not match is never
# unpacked), unpacked into $RUNNER_TEMP/rlhf-bot and that directory is appended to $GITHUB_PATH.
set -euo pipefail

fail() {
  echo "::error title=rlhf-bot install::$1"
  exit 1
}

version=${RLHF_BOT_VERSION:-}
want=${RLHF_BOT_SHA256:-}
flavour=${RLHF_BOT_FLAVOUR:-cpu}
repo=${RLHF_BOT_REPO:-rlhf-bot/rlhf-bot}
server=${GITHUB_SERVER_URL:-https://github.com}

[ -n "$version" ] || fail "no rlhf-bot version given; set the repository variable RLHF_BOT_VERSION (e.g. v0.1.0)"
[[ "$want" =~ ^[0-9a-f]{64}$ ]] || fail "sha256 '$want' is not 64 lowercase hex digits; set RLHF_BOT_SHA256 to the release's .sha256 value"
case "$flavour" in
  cpu) asset="rlhf-bot-x86_64-unknown-linux-gnu.tar.gz" ;;
  cuda) asset="rlhf-bot-cuda-x86_64-unknown-linux-gnu.tar.gz" ;;
  *) fail "flavour '$flavour' is neither cpu nor cuda" ;;
esac

dir="${RUNNER_TEMP:?RUNNER_TEMP is not set}/rlhf-bot"
mkdir -p "$dir"
url="$server/$repo/releases/download/$version/$asset"
echo "downloading $url"
curl --fail --silent --show-error --location --retry 3 --output "$dir/$asset" "$url" \
  || fail "could not download $url"
got=$(sha256sum "$dir/$asset" | cut -d' ' -f1)
if [ "$got" != "$want" ]; then
  rm -f "$dir/$asset"
  fail "$asset from $version has sha256 $got, expected $want; refusing to install it"
fi
tar -xzf "$dir/$asset" -C "$dir"
[ -x "$dir/rlhf-bot" ] || fail "$asset has no executable rlhf-bot at its top level"
echo "$dir" >>"${GITHUB_PATH:?GITHUB_PATH is not set}"
"$dir/rlhf-bot" --version
