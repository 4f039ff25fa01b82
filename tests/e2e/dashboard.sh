#!/usr/bin/env bash
# The dashboard in a real headless browser (Debian's chromium, installed when missing): the page
# loads offline, lists the providers, and its numbers move after requests are made.
# Prints "dashboard-e2e: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
. tests/e2e/common.sh

if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium from Debian's packages"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq chromium >/dev/null
fi

WORK=$(mktemp -d)
trap 'e2e_cleanup; rm -rf "$WORK"' EXIT
start_mock "$WORK/mock.log"
cat >"$WORK/config.yaml" <<YAML
providers:
  - {name: "MockAnthropic", type: anthropic, base_url: "$MOCK_URL", auth_type: api_key, auth_value: "k"}
  - {name: "MockOpenAI", type: openai, base_url: "$MOCK_URL/v1", auth_type: api_key, auth_value: "k"}
model_routes:
  "*":
    - {provider: "MockAnthropic", model: passthrough}
settings:
  log_file_path: "$WORK/logs/logs.jsonl"
  usage:
    path: "$WORK/usage.db"
clients:
  - name: alice
    key: "sk-alice-dash"
    limits:
      requests_per_minute: 10
      budget_usd: { window: "1d", max: 1 }
YAML
start_balancer "$WORK/config.yaml" "$WORK/balancer.log"

dom() {
  # No network beyond loopback: the flags keep Chromium from calling home.
  timeout 60 chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$WORK/chromium-$1" --virtual-time-budget=4000 --dump-dom "$BALANCER_URL/dashboard?key=sk-alice-dash" 2>/dev/null
}

passed=0
failed=0
check() {
  if eval "$2"; then passed=$((passed + 1)); echo "ok   $1"; else failed=$((failed + 1)); echo "FAIL $1"; fi
}

before=$(dom 1)
check "the page renders the providers" 'grep -q "data-provider=\"MockAnthropic\"" <<<"$before" && grep -q "data-provider=\"MockOpenAI\"" <<<"$before"'
check "the page starts at zero requests" 'grep -q "data-requests=\"0\"" <<<"$before"'
check "the page loaded its data (no error shown)" '! grep -q "id=\"updated\">failed" <<<"$before" && ! grep -q "id=\"updated\">never" <<<"$before"'
for i in 1 2 3; do
  curl -fsS "$BALANCER_URL/v1/messages" -H 'content-type: application/json' -H 'x-api-key: sk-alice-dash' \
    -d "{\"model\":\"claude-x\",\"max_tokens\":5,\"messages\":[{\"role\":\"user\",\"content\":\"hello $i\"}]}" >/dev/null
done
after=$(dom 2)
check "the numbers move after requests" 'grep -q "data-requests=\"3\"" <<<"$after"'
check "the client panel shows today's requests" 'grep -q "data-client=\"alice\" data-requests=\"3\"" <<<"$after"'
check "the client panel shows each limit as a bar" 'grep -q "data-limit=\"requests_per_minute\" data-used=\"3\" data-max=\"10\"" <<<"$after" && grep -q "data-limit=\"budget_usd\"" <<<"$after"'
check "the provider row shows its requests" 'grep -A3 "data-provider=\"MockAnthropic\"" <<<"$after" | tr -d "\n " | grep -q "<td>3</td>"'
echo "dashboard-e2e: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
