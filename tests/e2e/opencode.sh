#!/usr/bin/env bash
# The real OpenCode agent through the balancer's OpenAI-compatible front end (POST
# /v1/chat/completions), offline, against the fake model provider: a prompt makes the fake model
# call OpenCode's `bash` tool, OpenCode runs the command and sends its output back, and the fake
# model answers quoting it; through an anthropic-type and an openai-type route (see
# tests/e2e/opencode_check.py for the checks). Installs the pinned `opencode-ai` from npm into a
# cache folder when it is missing; builds the binaries when they are missing.
# Prints "opencode-e2e: N passed, M failed" last and exits non-zero on a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
export BIN_DIR=${BIN_DIR:-$ROOT/target/debug}
CACHE=${CB_E2E_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/claude-balancer-e2e}
export OPENCODE_VERSION=1.18.33

setup_failed() {
  echo "FAIL setup: $1"
  echo "opencode-e2e: 0 passed, 1 failed"
  exit 1
}

if [ ! -x "$BIN_DIR/claude-balancer" ] || [ ! -x "$BIN_DIR/mock-provider" ]; then
  cargo build --workspace --bins || setup_failed "cargo build --workspace --bins"
fi

# Any run of opencode, even `--version` (the package's postinstall runs it too), creates folders in
# the XDG folders and in $TMPDIR/opencode: give it throwaway ones.
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/tmp"
scratch_env() {
  env XDG_CONFIG_HOME="$SCRATCH/c" XDG_DATA_HOME="$SCRATCH/d" XDG_CACHE_HOME="$SCRATCH/k" \
    XDG_STATE_HOME="$SCRATCH/s" TMPDIR="$SCRATCH/tmp" OPENCODE_DISABLE_AUTOUPDATE=1 "$@"
}
opencode_version() {
  scratch_env HOME="$SCRATCH" timeout 60 "$OPENCODE_BIN" --version 2>/dev/null || true
}

DIR="$CACHE/opencode-$OPENCODE_VERSION"
export OPENCODE_BIN="$DIR/node_modules/.bin/opencode"
if [ ! -x "$OPENCODE_BIN" ] || [ "$(opencode_version)" != "$OPENCODE_VERSION" ]; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  # opencode-ai's postinstall links the native binary, from the platform package npm installs out
  # of optionalDependencies (opencode-linux-x64 and the like), into bin/: optional dependencies
  # and install scripts must both be allowed.
  (cd "$DIR" && scratch_env timeout 900 npm install --no-audit --no-fund --loglevel=error --include=optional \
    --ignore-scripts=false "opencode-ai@$OPENCODE_VERSION" >/dev/null) || setup_failed "npm install opencode-ai@$OPENCODE_VERSION"
fi
found=$(opencode_version)
[ "$found" = "$OPENCODE_VERSION" ] || setup_failed "$OPENCODE_BIN reports version '$found', want $OPENCODE_VERSION"
echo "OpenCode $found"
python3 tests/e2e/opencode_check.py
