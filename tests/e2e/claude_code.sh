#!/usr/bin/env bash
# The real Claude Code CLI through the balancer, offline, against fake providers (see
# tests/e2e/claude_code.py for the scenarios). Installs the pinned CLI from npm into a cache folder
# when it is missing. Prints "claude-e2e: N passed, M failed".
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
CACHE=${CB_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/claude-balancer-e2e}
CLAUDE_VERSION=2.1.332

DIR="$CACHE/claude-code-$CLAUDE_VERSION"
export CLAUDE_BIN="$DIR/node_modules/.bin/claude"
if [ ! -x "$CLAUDE_BIN" ] || ! "$CLAUDE_BIN" --version >/dev/null 2>&1; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  (cd "$DIR" && npm install --no-audit --no-fund --loglevel=error "@anthropic-ai/claude-code@$CLAUDE_VERSION" >/dev/null)
fi
echo "Claude Code $("$CLAUDE_BIN" --version)"
exec python3 tests/e2e/claude_code.py
