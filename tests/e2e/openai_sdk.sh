#!/usr/bin/env bash
# The official `openai` Python SDK against the balancer's OpenAI front end, for an anthropic-type
# and an openai-type route: chat completions (plain, streamed with the SDK's accumulator, tools
# over two turns, structured output with `parse`, an image, usage), the Responses API (create and
# stream with function calls) and errors. Installs the pinned SDK into a cache folder when
# missing. Prints "openai-e2e: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
CACHE=${CB_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/claude-balancer-e2e}
SDK_VERSION=3.57.0
. tests/e2e/common.sh

mkdir -p "$CACHE"
VENV="$CACHE/venv-openai-$SDK_VERSION"
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$SDK_VERSION"
fi

WORK=$(mktemp -d)
trap 'e2e_cleanup; rm -rf "$WORK"' EXIT
start_mock "$WORK/mock.log"
cat >"$WORK/config.yaml" <<YAML
providers:
  - name: "MockAnthropic"
    type: anthropic
    base_url: "$MOCK_URL"
    auth_type: api_key
    auth_value: "provider-key"
    models: ["claude-sonnet-4-6"]
  - name: "MockOpenAI"
    type: openai
    base_url: "$MOCK_URL/v1"
    auth_type: api_key
    auth_value: "provider-key"
model_routes:
  "*claude*":
    - provider: "MockAnthropic"
      model: passthrough
  "*gpt*":
    - provider: "MockOpenAI"
      model: "mock-model"
settings:
  log_level: WARNING
  usage:
    path: "$WORK/usage.db"
  auth:
    api_keys: ["sk-client-test"]
YAML
start_balancer "$WORK/config.yaml" "$WORK/balancer.log"
BALANCER_URL="$BALANCER_URL" MOCK_URL="$MOCK_URL" "$VENV/bin/python" tests/e2e/openai_sdk_check.py \
  || { echo "--- balancer log"; tail -n 50 "$WORK/balancer.log"; exit 1; }
