#!/usr/bin/env bash
# The real Codex CLI (`codex exec`) through the balancer's /v1/responses, offline, against the fake
# model provider: a prompt makes the fake model call Codex's shell tool, Codex runs the command and
# sends its output back, and the fake model answers quoting it; once through an anthropic-type route
# and once through an openai-type route (see tests/e2e/codex_check.py for the checks). Installs the
# pinned CLI from npm into a cache folder when it is missing. Needs the binaries built first
# (cargo build --workspace --bins). Prints "codex-e2e: N passed, M failed" last.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
CACHE=${CB_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/claude-balancer-e2e}
CODEX_VERSION=0.171.0
. tests/e2e/common.sh

setup_failed() {
  echo "codex-e2e: 0 passed, 1 failed"
  exit 1
}

for bin in mock-provider claude-balancer; do
  if [ ! -x "$BIN_DIR/$bin" ]; then
    echo "missing $BIN_DIR/$bin: run cargo build --workspace --bins first"
    setup_failed
  fi
done

# @openai/codex is only a node launcher; the native binary is in the platform package that npm
# installs from its optionalDependencies (npm:@openai/codex@<version>-linux-x64 and so on), so
# optional dependencies must not be omitted.
DIR="$CACHE/codex-$CODEX_VERSION"
export CODEX_BIN="$DIR/node_modules/.bin/codex"
if [ "$("$CODEX_BIN" --version 2>/dev/null)" != "codex-cli $CODEX_VERSION" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  if ! (cd "$DIR" && npm install --no-audit --no-fund --loglevel=error --include=optional \
      "@openai/codex@$CODEX_VERSION" >/dev/null); then
    echo "npm install @openai/codex@$CODEX_VERSION failed"
    rm -rf "$DIR"
    setup_failed
  fi
  if [ "$("$CODEX_BIN" --version 2>&1)" != "codex-cli $CODEX_VERSION" ]; then
    echo "the installed Codex does not run: $("$CODEX_BIN" --version 2>&1 | tail -n 3)"
    rm -rf "$DIR"
    setup_failed
  fi
fi
echo "Codex $("$CODEX_BIN" --version)"

# Not under /tmp: Codex refuses to create its helper-binary aliases when CODEX_HOME is in a
# temporary directory and warns about it.
mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/codex-run.XXXXXX")
trap 'e2e_cleanup; rm -rf "$WORK"' EXIT
export WORK

start_mock "$WORK/mock.log" || setup_failed
cat >"$WORK/balancer.yaml" <<YAML
providers:
  - name: "MockAnthropic"
    type: anthropic
    base_url: "$MOCK_URL"
    auth_type: api_key
    auth_value: "provider-own-key-codex"
  - name: "MockOpenAI"
    type: openai
    base_url: "$MOCK_URL/v1"
    auth_type: api_key
    auth_value: "provider-own-key-codex"
model_routes:
  "claude-sonnet-4-6":
    - provider: "MockAnthropic"
      model: passthrough
  "gpt-mock":
    - provider: "MockOpenAI"
      model: "mock-model"
settings:
  log_level: INFO
  auth:
    api_keys: ["sk-codex-e2e-client"]
YAML
start_balancer "$WORK/balancer.yaml" "$WORK/balancer.log" || setup_failed
export MOCK_URL BALANCER_URL BALANCER_LOG="$WORK/balancer.log"

status=0
python3 tests/e2e/codex_check.py || status=$?
exit "$status"
