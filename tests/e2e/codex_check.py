"""The real Codex CLI through the balancer's /v1/responses, offline, against the fake provider.

Run by tests/e2e/codex.sh, which installs Codex and starts the mock provider and the balancer (one
anthropic-type and one openai-type provider, both pointing at the mock). Every scenario runs
`codex exec --json` once, with a fresh CODEX_HOME whose config.toml names the balancer as a custom
model provider, and checks:
- exit code 0 within `timeout 180`, every stdout line JSON, no `error` or `turn.failed` event, no
  `error` item (Codex reports falling back to default model metadata that way), no "Reconnecting"
  retry, one `turn.completed` whose usage adds up the fake model's tokens;
- exactly the expected number of requests reached the mock, all streaming, with the mapped model
  and the provider's own key (never the client's);
- for the tool scenarios: Codex's shell tool really ran the command (a command_execution item with
  the computed output, which the prompt does not contain), its output went back to the model as the
  tool result, and the last message (`-o`) quotes it;
- with `model_reasoning_effort = "high"` and a prompt that makes the fake model think first: the
  thinking reaches Codex as a reasoning item, on the anthropic route the signed thinking block comes
  back in the tool-loop request (carried by encrypted_content), and on the openai route the provider
  is asked for reasoning_effort "high";
- Codex tried to reach nothing but the balancer (an HTTP(S) proxy that records and refuses every
  request is set for it, with only the loopback address exempt), and the balancer logged no warning.

Environment: CODEX_BIN, WORK, MOCK_URL, BALANCER_URL, BALANCER_LOG.
Prints "codex-e2e: N passed, M failed" last.
"""
import json
import os
import socketserver
import subprocess
import sys
import threading
import urllib.request

CODEX_BIN = os.environ["CODEX_BIN"]
WORK = os.environ["WORK"]
MOCK_URL = os.environ["MOCK_URL"]
BALANCER_URL = os.environ["BALANCER_URL"]
BALANCER_LOG = os.environ["BALANCER_LOG"]

CLIENT_KEY = "sk-codex-e2e-client"  # settings.auth.api_keys in the balancer config
PROVIDER_KEY = "provider-own-key-codex"
MOCK_INPUT_TOKENS = 25  # INPUT_TOKENS in crates/mock-provider/src/brain.rs, per answer
RUN_TIMEOUT = 180

# Codex 0.171.0's shell tool for a model whose shell_type is unified_exec, which is also what an
# unknown model slug gets: a function tool {"cmd": "<command line>", ...} run as `bash -lc`.
SHELL_TOOL = "exec_command"

ROUTES = {
    # route: the model Codex asks for, the path the mock must see, the model the provider must receive
    "anthropic": ("claude-sonnet-4-6", "/v1/messages", "claude-sonnet-4-6"),
    "openai": ("gpt-mock", "/v1/chat/completions", "mock-model"),
}

passed = 0
failed = 0


class Proxy(socketserver.ThreadingTCPServer):
    """Stands in for the internet: records the first line of every request and refuses it."""

    allow_reuse_address = True
    daemon_threads = True

    def __init__(self):
        self.seen = []

        class Handler(socketserver.StreamRequestHandler):
            def handle(inner):
                line = inner.rfile.readline().decode("latin-1").strip()
                self.seen.append(line)
                inner.wfile.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"
        threading.Thread(target=self.serve_forever, daemon=True).start()


def http(method, url, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null")


def write_catalog(path):
    """Model metadata for the routed slugs. Without it Codex 0.171.0 reports `Model metadata for
    `<slug>` not found. Defaulting to fallback metadata` as an error item on every run."""
    def entry(slug):
        return {"slug": slug, "display_name": slug, "description": "routed by claude-balancer",
                "shell_type": "unified_exec", "visibility": "list", "supported_in_api": True, "priority": 1,
                "supported_reasoning_levels": [{"effort": e, "description": e} for e in ("low", "medium", "high")],
                "support_verbosity": False, "truncation_policy": {"mode": "tokens", "limit": 10000},
                "experimental_supported_tools": [], "context_window": 200000,
                "base_instructions": "You are a coding agent running in the Codex CLI. Use the tools to run commands."}
    with open(path, "w") as f:
        json.dump({"models": [entry(m) for m, _, _ in ROUTES.values()]}, f, indent=1)


def write_config(home, model, extra=""):
    os.makedirs(home, exist_ok=True)
    catalog = os.path.join(WORK, "model_catalog.json")
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f"""model = {json.dumps(model)}
model_provider = "gw"
model_catalog_json = {json.dumps(catalog)}
web_search = "disabled"
check_for_update_on_startup = false
{extra}
[analytics]
enabled = false

[feedback]
enabled = false

[features]
# The curated plugin sync otherwise runs `git ls-remote https://github.com/openai/plugins.git`,
# then GET https://api.github.com/repos/openai/plugins, then chatgpt.com's export archive.
plugins = false

[model_providers.gw]
name = "claude-balancer"
base_url = "{BALANCER_URL}/v1"
env_key = "CB_E2E_GATEWAY_KEY"
wire_api = "responses"
request_max_retries = 0
stream_max_retries = 0
stream_idle_timeout_ms = 60000
""")


class Run:
    pass


runs = 0


def run_codex(proxy, route, prompt, extra_config=""):
    global runs
    runs += 1
    model = ROUTES[route][0]
    home = os.path.join(WORK, f"codex-home-{runs}")
    project = os.path.join(WORK, f"project-{runs}")
    os.makedirs(project)
    write_config(home, model, extra_config)
    last = os.path.join(WORK, f"last-{runs}.txt")
    env = {k: v for k, v in os.environ.items()
           if not k.upper().startswith(("OPENAI_", "CODEX_", "RUST_LOG", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"))}
    env.update({
        "HOME": os.path.join(WORK, "home"), "CODEX_HOME": home, "CB_E2E_GATEWAY_KEY": CLIENT_KEY,
        "HTTP_PROXY": proxy.url, "HTTPS_PROXY": proxy.url, "ALL_PROXY": proxy.url,
        "http_proxy": proxy.url, "https_proxy": proxy.url, "all_proxy": proxy.url,
        "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost",
    })
    os.makedirs(env["HOME"], exist_ok=True)
    http("POST", MOCK_URL + "/_mock/reset")
    proxy.seen.clear()
    log_start = os.path.getsize(BALANCER_LOG)
    cmd = ["timeout", "-k", "10", str(RUN_TIMEOUT), CODEX_BIN, "exec", "--strict-config", "--skip-git-repo-check",
           "--dangerously-bypass-approvals-and-sandbox", "--ephemeral", "--json", "--color", "never",
           "-m", model, "-o", last, prompt]
    p = subprocess.run(cmd, cwd=project, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=RUN_TIMEOUT + 30)
    r = Run()
    r.route, r.prompt, r.code, r.stdout, r.stderr = route, prompt, p.returncode, p.stdout, p.stderr
    r.events, r.bad_lines = [], []
    for line in p.stdout.splitlines():
        if not line.strip():
            continue
        try:
            r.events.append(json.loads(line))
        except json.JSONDecodeError:
            r.bad_lines.append(line)
    r.last = None
    if os.path.exists(last):
        with open(last) as f:
            r.last = f.read()
    r.requests = http("GET", MOCK_URL + "/_mock/requests")
    r.proxied = list(proxy.seen)
    with open(BALANCER_LOG, errors="replace") as f:
        f.seek(log_start)
        r.balancer_log = f.read()
    return r


def items(r, kind):
    return [e["item"] for e in r.events if e.get("type") == "item.completed" and e.get("item", {}).get("type") == kind]


def tail(text, n=1200):
    return text[-n:].strip()


def expect_clean(r, n_requests):
    """The run succeeded at the first try, with nothing reported as an error or retried."""
    assert r.code != 124, f"codex did not finish within {RUN_TIMEOUT} s; stderr: {tail(r.stderr)}"
    assert r.code == 0, f"exit {r.code}; stdout: {tail(r.stdout)}; stderr: {tail(r.stderr)}"
    assert not r.bad_lines, f"stdout lines that are not JSON: {r.bad_lines[:3]}"
    errors = [e for e in r.events if e.get("type") in ("error", "turn.failed")]
    assert not errors, f"codex reported: {errors}"
    error_items = [e["item"] for e in r.events if e.get("item", {}).get("type") == "error"]
    assert not error_items, f"codex reported error items: {error_items}"
    for text, where in ((r.stdout, "stdout"), (r.stderr, "stderr")):
        assert "Reconnecting" not in text, f"codex retried ({where}): {tail(text)}"
    for word in ("ERROR", "panicked"):
        assert word not in r.stderr, f"codex stderr has {word}: {tail(r.stderr)}"
    types = [e.get("type") for e in r.events]
    assert types[:2] == ["thread.started", "turn.started"], f"events start with {types[:2]}"
    done = [e for e in r.events if e.get("type") == "turn.completed"]
    assert len(done) == 1 and types[-1] == "turn.completed", f"want one turn.completed, last; events: {types}"
    usage = done[0].get("usage") or {}
    assert all(isinstance(usage.get(k), int) for k in ("input_tokens", "cached_input_tokens", "output_tokens")), usage
    assert usage["input_tokens"] == MOCK_INPUT_TOKENS * n_requests, \
        f"usage.input_tokens {usage['input_tokens']}, want {MOCK_INPUT_TOKENS} per answer x {n_requests}: {usage}"
    assert usage["cached_input_tokens"] == 0 and usage["output_tokens"] > 0, usage
    assert not r.proxied, f"codex tried to reach the internet: {r.proxied}"
    _, path, upstream = ROUTES[r.route]
    got = [(q["method"], q["path"]) for q in r.requests]
    # Codex retries a failed request silently (request_max_retries); only the count shows it.
    assert got == [("POST", path)] * n_requests, f"want {n_requests} x POST {path} at the mock, got {got}"
    complaints = [l for l in r.balancer_log.splitlines() if " WARN " in l or " ERROR " in l]
    assert not complaints, f"the balancer logged: {complaints[:3]}"
    for q in r.requests:
        body = q["body"] or {}
        assert body.get("stream") is True, f"a request without streaming reached the provider: {str(body)[:300]}"
        assert body.get("model") == upstream, f"model {body.get('model')!r} reached the provider, want {upstream!r}"
        headers = json.dumps(q["headers"])
        assert CLIENT_KEY not in headers, "the client's key reached the provider"
        assert PROVIDER_KEY in headers, "the provider's own key was not sent"


def expect_final_text(r, want):
    messages = items(r, "agent_message")
    assert messages, "no agent_message item"
    final = messages[-1].get("text") or ""
    assert want in final, f"last agent message {final!r} lacks {want!r}"
    assert r.last is not None, "-o wrote no file"
    assert r.last.strip() == final.strip(), f"-o file {r.last!r} differs from the last agent message {final!r}"
    return final


def tool_prompt(marker_prefix, think=False):
    # The shell computes the marker, so it appears only in the command's real output, not in the prompt.
    command = f"echo {marker_prefix}-$((6*7))-ok"
    prompt = f'use the tool {SHELL_TOOL} {json.dumps({"cmd": command})}'
    return (f"think first, then {prompt}" if think else prompt), f"{marker_prefix}-42-ok"


def expect_tool_round_trip(r, marker):
    assert marker not in r.prompt
    expect_clean(r, 2)
    commands = items(r, "command_execution")
    assert len(commands) == 1, f"want one command_execution item, got {commands}"
    c = commands[0]
    assert c.get("status") == "completed" and c.get("exit_code") == 0, f"command did not succeed: {c}"
    assert marker in (c.get("aggregated_output") or ""), f"command output lacks {marker!r}: {c}"
    final = expect_final_text(r, marker)
    assert final.startswith("The tool said:"), f"last agent message is not the model's quote of the result: {final!r}"
    first, second = (q["body"] for q in r.requests)
    assert SHELL_TOOL in json.dumps([t for t in first.get("tools", [])]), f"{SHELL_TOOL} was not offered to the model"
    msgs = second.get("messages") or []
    if r.route == "anthropic":
        calls = [b for b in msgs[-2]["content"] if b.get("type") == "tool_use"] if len(msgs) >= 2 else []
        results = [b for b in msgs[-1]["content"] if b.get("type") == "tool_result"] if msgs else []
        assert len(calls) == 1 and calls[0]["name"] == SHELL_TOOL, f"assistant turn before the result: {msgs[-2:]}"
        assert len(results) == 1 and results[0]["tool_use_id"] == calls[0]["id"], f"tool result: {msgs[-1:]}"
        assert marker in json.dumps(results[0].get("content")), f"tool result lacks {marker!r}: {results}"
    else:
        assert len(msgs) >= 2 and msgs[-1].get("role") == "tool", f"last messages: {msgs[-2:]}"
        calls = msgs[-2].get("tool_calls") or []
        assert len(calls) == 1 and calls[0]["function"]["name"] == SHELL_TOOL, f"assistant turn: {msgs[-2]}"
        assert msgs[-1].get("tool_call_id") == calls[0]["id"], f"tool message {msgs[-1]} does not answer {calls}"
        assert marker in json.dumps(msgs[-1].get("content")), f"tool message lacks {marker!r}: {msgs[-1]}"


def expect_reasoning(r):
    reasoning = items(r, "reasoning")
    assert reasoning and (reasoning[0].get("text") or "").startswith("Thinking about:"), \
        f"the model's reasoning did not reach Codex as a reasoning item: {reasoning}"
    second = r.requests[1]["body"]
    if r.route == "anthropic":
        for q in r.requests:
            assert (q["body"].get("thinking") or {}).get("type") == "enabled", \
                f"reasoning effort high did not turn thinking on: {q['body'].get('thinking')}"
        assistant = second["messages"][-2]
        head = assistant["content"][0]
        # Anthropic rejects a tool loop with thinking on whose last assistant turn lacks its signed thinking.
        assert head.get("type") == "thinking" and head.get("signature") == "mock-signature", \
            f"the signed thinking block did not come back through encrypted_content: {assistant['content'][:1]}"


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - report every scenario
        failed += 1
        why = str(e) if isinstance(e, AssertionError) else f"{type(e).__name__}: {e}"
        print(f"FAIL {name}: {why}", flush=True)


def main():
    global failed
    try:
        write_catalog(os.path.join(WORK, "model_catalog.json"))
        proxy = Proxy()
    except Exception as e:  # noqa: BLE001 - still print the summary line
        failed += 1
        print(f"FAIL setup: {type(e).__name__}: {e}", flush=True)
        print(f"codex-e2e: {passed} passed, {failed} failed", flush=True)
        return 1
    effort = 'model_reasoning_effort = "high"'
    for route in ROUTES:
        def plain(route=route):
            r = run_codex(proxy, route, "say hello")
            expect_clean(r, 1)
            expect_final_text(r, "Hello from the mock provider")
        check(f"{route}: plain answer", plain)

        def shell(route=route):
            prompt, marker = tool_prompt(f"codex-e2e-{route}")
            expect_tool_round_trip(run_codex(proxy, route, prompt), marker)
        check(f"{route}: shell tool ({SHELL_TOOL}) round trip", shell)

        thinking_run = {}

        def thinking(route=route):
            prompt, marker = tool_prompt(f"codex-e2e-{route}-think", think=True)
            r = thinking_run["r"] = run_codex(proxy, route, prompt, effort)
            expect_tool_round_trip(r, marker)
            expect_reasoning(r)
        check(f"{route}: reasoning effort high, thinking then shell tool round trip", thinking)

        if route == "openai":
            def effort_reaches_provider():
                r = thinking_run.get("r")
                assert r and r.requests, "the thinking run reached no provider"
                got = [q["body"].get("reasoning_effort") for q in r.requests]
                assert got == ["high"] * len(got), f"Codex asked for reasoning effort high; the provider got {got}"
            check("openai: reasoning effort high reaches the provider as high", effort_reaches_provider)

    proxy.shutdown()
    if failed:
        print("--- balancer log (last 40 lines)")
        with open(BALANCER_LOG, errors="replace") as f:
            print("".join(f.readlines()[-40:]).rstrip())
        print("---")
    print(f"codex-e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
