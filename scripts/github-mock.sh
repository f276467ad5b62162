#!/usr/bin/env bash
# Starts a local mock of api.github.com for trying `rlhf-bot publish` by hand: Stoplight Prism
# serving GitHub's own OpenAPI description, so a request that breaks GitHub's contract gets 422
# with an `sl-violations` header naming the problem, and a valid one gets an example answer.
# The tools come from scripts/install-test-deps.sh (run it first).
#
# Usage: scripts/github-mock.sh [PORT]     (default 4010)
# Prints the PID on stdout once the mock answers; stop it with `kill PID`. Log: $RLHF_TEST_DEPS/prism-PORT.log
# Then point rlhf-bot at it (api_url: http://127.0.0.1:PORT) with any token.
# Limits (Prism's): no state between requests; path parameters holding `/` must be
# percent-encoded (rlhf-bot does); a request with `Accept: application/vnd.github+json` gets 406;
# no GraphQL; no rate-limit headers. Start-up takes ~20 s and ~400 MB.
set -euo pipefail
port=${1:-4010}
dir=${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps}
prism="$dir/node_modules/.bin/prism"
spec="$dir/node_modules/@octokit/openapi/generated/api.github.com.json"
if [ ! -x "$prism" ] || [ ! -f "$spec" ]; then
  echo "github-mock: Prism or GitHub's OpenAPI description missing in $dir; hint: run scripts/install-test-deps.sh" >&2
  exit 1
fi
log="$dir/prism-$port.log"
setsid "$prism" mock --host 127.0.0.1 -p "$port" "$spec" >"$log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
  if curl -s -o /dev/null "http://127.0.0.1:$port/repos/o/r/pulls"; then
    echo "$pid"
    exit 0
  fi
  if ! kill -0 "$pid" 2>/dev/null; then
    echo "github-mock: prism exited; see $log" >&2
    exit 1
  fi
  sleep 1
done
echo "github-mock: prism did not answer within 120 s; see $log" >&2
kill "$pid" 2>/dev/null || true
exit 1
