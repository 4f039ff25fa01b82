"""The real Claude Code CLI through the balancer, offline, against fake providers.

Every scenario runs `claude -p ... --output-format stream-json --verbose` once through an
anthropic-type route and once through an openai-type route, and checks the exit code, the final
text, that no retry was needed (no `api_retry` line), that the CLI never had to repeat a streaming
request without streaming, that the mapped model name reached the provider, and that the client's
credential never reached a provider that has its own.

Environment: BIN_DIR (the built binaries), CLAUDE_BIN (the CLI). Prints "claude-e2e: N passed, M failed".
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN_DIR = os.environ["BIN_DIR"]
CLAUDE_BIN = os.environ["CLAUDE_BIN"]
CLIENT_KEY = "sk-client-e2e-0123456789"
PROVIDER_KEY = "provider-own-key-e2e"
ROUTES = {
    # route name: (model Claude Code asks for, model the provider must receive, primary, secondary)
    "anthropic": ("claude-sonnet-4-6", "claude-upstream-mapped", "A1", "A2"),
    "openai": ("gpt-mock-large", "mock-model-upstream", "O1", "O2"),
}

procs = []
passed = 0
failed = 0


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_mock():
    p = subprocess.Popen([os.path.join(BIN_DIR, "mock-provider")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    line = p.stdout.readline()
    assert line.startswith("mock-provider listening on "), line
    return line.split()[-1]


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


class Balancer:
    def __init__(self, workdir, mocks, primary_down=None):
        self.path = os.path.join(workdir, "balancer.yaml")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mocks = mocks
        self.write(primary_down=primary_down)
        self.log = open(os.path.join(workdir, "balancer.log"), "ab")
        self.proc = subprocess.Popen([os.path.join(BIN_DIR, "claude-balancer"), "--config", self.path, "--port", str(self.port)],
                                     stdout=self.log, stderr=self.log)
        procs.append(self.proc)
        for _ in range(200):
            try:
                http("GET", self.url + "/")
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.05)
        raise RuntimeError("balancer did not start")

    def write(self, primary_down=None, swap=False):
        urls = dict(self.mocks)
        if primary_down:
            urls[primary_down] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        lines = ["providers:"]
        for name, url in urls.items():
            kind = "openai" if name.startswith("O") else "anthropic"
            base = url + "/v1" if kind == "openai" else url
            lines += [f'  - name: "{name}"', f"    type: {kind}", f'    base_url: "{base}"', "    auth_type: api_key",
                      f'    auth_value: "{PROVIDER_KEY}"']
        lines.append("model_routes:")
        for route, (_, upstream, primary, secondary) in ROUTES.items():
            first, second = (secondary, primary) if swap else (primary, secondary)
            pattern = "*claude*" if route == "anthropic" else "*gpt*"
            lines += [f'  "{pattern}":',
                      f'    - {{provider: "{first}", model: "{upstream}", priority: 1}}',
                      f'    - {{provider: "{second}", model: "{upstream}", priority: 2}}']
        lines += ["settings:", "  failure_cooldown: 60", "  log_level: INFO"]
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_claude(workdir, balancer_url, model, prompt, auth="api_key"):
    home = os.path.join(workdir, "home")
    os.makedirs(os.path.join(home, ".claude"), exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ANTHROPIC_", "CLAUDE_"))}
    env.update({
        "HOME": home, "CLAUDE_CONFIG_DIR": os.path.join(home, ".claude"), "ANTHROPIC_BASE_URL": balancer_url,
        "ANTHROPIC_MODEL": model, "ANTHROPIC_DEFAULT_HAIKU_MODEL": model, "ANTHROPIC_SMALL_FAST_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1", "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_AUTOUPDATER": "1", "CLAUDE_CODE_MAX_RETRIES": "2",
    })
    env["ANTHROPIC_API_KEY" if auth == "api_key" else "ANTHROPIC_AUTH_TOKEN"] = CLIENT_KEY
    cmd = [CLAUDE_BIN, "-p", prompt, "--output-format", "stream-json", "--verbose", "--allowedTools", "Bash,Read"]
    p = subprocess.run(cmd, cwd=os.path.join(workdir, "project"), env=env, capture_output=True, text=True, timeout=150)
    lines = []
    for line in p.stdout.splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass
    result = next((l for l in reversed(lines) if l.get("type") == "result"), None)
    return p.returncode, result, lines, p.stderr


def message_requests(mock_url):
    reqs = http("GET", mock_url + "/_mock/requests")
    return [r for r in reqs if r["method"] == "POST" and ("/v1/messages" in r["path"] or "/chat/completions" in r["path"])
            and "count_tokens" not in r["path"]]


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - report every scenario
        failed += 1
        print(f"FAIL {name}: {e}", flush=True)


def expect_success(code, result, lines, stderr, want_text):
    assert code == 0, f"exit {code}; result {result}; stderr {stderr[-800:]}"
    assert result and not result.get("is_error"), f"result {result}"
    assert want_text in (result.get("result") or ""), f"final text {result.get('result')!r} lacks {want_text!r}"
    retries = [l for l in lines if l.get("type") == "system" and l.get("subtype") == "api_retry"]
    assert not retries, f"Claude Code had to retry: {retries}"


def expect_clean_upstream(mock_urls, upstream_model):
    seen = 0
    for url in mock_urls:
        for r in message_requests(url):
            seen += 1
            body = r["body"] or {}
            assert body.get("stream") is True, f"a request without streaming reached {url}: Claude Code repeated a broken stream"
            assert body.get("model") == upstream_model, f"model {body.get('model')!r} reached the provider, want {upstream_model!r}"
            headers = json.dumps(r["headers"])
            assert CLIENT_KEY not in headers, "the client's credential reached a provider with its own"
            assert PROVIDER_KEY in headers, "the provider's own key was not sent"
    assert seen > 0, "no request reached a provider"


def main():
    workdir = tempfile.mkdtemp(prefix="cb-claude-e2e-")
    os.makedirs(os.path.join(workdir, "project"))
    notes = os.path.join(workdir, "project", "notes.txt")
    with open(notes, "w") as f:
        f.write("the secret word is pineapple\n")
    mocks = {name: start_mock() for name in ("A1", "A2", "O1", "O2")}

    def reset():
        for url in mocks.values():
            http("POST", url + "/_mock/reset")

    def scenario(route, prompt, want, fault=None, primary_down=False, auth="api_key", expect_served_by=None):
        model, upstream, primary, secondary = ROUTES[route]

        def run():
            reset()
            if fault:
                http("POST", mocks[primary] + "/_mock/push", fault)
            bal = Balancer(workdir, mocks, primary_down=primary if primary_down else None)
            try:
                code, result, lines, stderr = run_claude(workdir, bal.url, model, prompt, auth)
                expect_success(code, result, lines, stderr, want)
                expect_clean_upstream([mocks[primary], mocks[secondary]], upstream)
                if expect_served_by:
                    served = {n: len(message_requests(mocks[n])) for n in (primary, secondary)}
                    assert served[expect_served_by] > 0, f"{expect_served_by} served nothing: {served}"
                return lines
            finally:
                bal.stop()
        return run

    for route in ROUTES:
        _, _, primary, secondary = ROUTES[route]
        check(f"{route}: plain answer", scenario(route, "say hello", "Hello from the mock provider", expect_served_by=primary))
        check(f"{route}: Bash tool round trip",
              scenario(route, 'use the tool Bash {"command":"echo hi"}', "The tool said: hi"))
        check(f"{route}: Read tool round trip",
              scenario(route, f'use the tool Read {{"file_path":"{notes}"}}', "pineapple"))

        def thinking(route=route):
            lines = scenario(route, "think about it, then say hello", "Hello from the mock provider")()
            kinds = [b.get("type") for l in lines if l.get("type") == "assistant"
                     for b in (l.get("message", {}).get("content") or [])]
            assert "thinking" in kinds, f"no thinking block reached Claude Code: {kinds}"
        check(f"{route}: thinking", thinking)
        check(f"{route}: primary answers 529, the secondary serves",
              scenario(route, "say hello", "Hello from the mock provider", fault={"kind": "status", "status": 529, "retry_after": "1"},
                       expect_served_by=secondary))
        check(f"{route}: primary drops the connection before answering",
              scenario(route, "say hello", "Hello from the mock provider", fault={"kind": "drop_before_headers"}, expect_served_by=secondary))
        check(f"{route}: primary is down entirely",
              scenario(route, "say hello", "Hello from the mock provider", primary_down=True, expect_served_by=secondary))
        check(f"{route}: ANTHROPIC_AUTH_TOKEN is accepted",
              scenario(route, "say hello", "Hello from the mock provider", auth="token"))

    def hot_reload():
        reset()
        bal = Balancer(workdir, mocks)
        try:
            model = ROUTES["anthropic"][0]
            code, result, lines, stderr = run_claude(workdir, bal.url, model, "say hello")
            expect_success(code, result, lines, stderr, "Hello")
            assert message_requests(mocks["A1"]) and not message_requests(mocks["A2"]), "first run not on A1"
            reset()
            bal.write(swap=True)
            answer = http("POST", bal.url + "/providers/reload")
            assert answer.get("status") == "reloaded", answer
            code, result, lines, stderr = run_claude(workdir, bal.url, model, "say hello")
            expect_success(code, result, lines, stderr, "Hello")
            assert message_requests(mocks["A2"]) and not message_requests(mocks["A1"]), "after reload the route did not move to A2"
        finally:
            bal.stop()
    check("hot reload moves a route between two runs", hot_reload)

    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"claude-e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        code = main()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    sys.exit(code)
