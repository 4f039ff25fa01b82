# Shared helpers for the end-to-end scripts: free ports, starting and stopping processes.
# Sourced, not run. Everything listens on 127.0.0.1 only.

E2E_PIDS=()

e2e_cleanup() {
  for pid in "${E2E_PIDS[@]:-}"; do
    [ -n "$pid" ] && kill "$pid" 2>/dev/null || true
  done
  for pid in "${E2E_PIDS[@]:-}"; do
    [ -n "$pid" ] && wait "$pid" 2>/dev/null || true
  done
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# start_mock LOGFILE [args...]: starts mock-provider, sets MOCK_URL.
start_mock() {
  local log=$1; shift
  "$BIN_DIR/mock-provider" "$@" >"$log" 2>&1 &
  E2E_PIDS+=($!)
  for _ in $(seq 1 100); do
    MOCK_URL=$(sed -n 's/^mock-provider listening on //p' "$log" | head -n1)
    [ -n "$MOCK_URL" ] && return 0
    sleep 0.05
  done
  echo "mock-provider did not start:"; cat "$log"; return 1
}

# start_balancer CONFIG LOGFILE: starts the balancer on a free port, sets BALANCER_URL.
start_balancer() {
  local config=$1 log=$2 port
  port=$(free_port)
  "$BIN_DIR/claude-balancer" --config "$config" --port "$port" >"$log" 2>&1 &
  E2E_PIDS+=($!)
  BALANCER_PID=$!
  BALANCER_URL="http://127.0.0.1:$port"
  for _ in $(seq 1 200); do
    if curl -fsS "$BALANCER_URL/health" >/dev/null 2>&1; then return 0; fi
    sleep 0.05
  done
  echo "balancer did not start:"; cat "$log"; return 1
}
