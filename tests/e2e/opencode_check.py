"""The real OpenCode agent through the balancer's OpenAI-compatible front end, offline, against the
fake model provider (target/debug/mock-provider).

OpenCode is configured with the balancer as an `@ai-sdk/openai-compatible` provider (so it calls
POST /v1/chat/completions). Each scenario runs `opencode run --format json` once through an
anthropic-type route and once through an openai-type route with a prompt that makes the fake model
call OpenCode's shell tool (`bash`, parameters {command, timeout?, workdir?}) and then answer with
text quoting the tool's output. A scenario passes when:
  - opencode exits 0 within the time limit, prints only JSON events and no `error` event, and logs
    no ERROR line;
  - the `bash` tool really ran (a completed `tool_use` event whose output holds a marker that only
    the shell could compute: `oc-42-<random token read from a file>`);
  - the final text quotes that output ("The tool said: oc-42-...");
  - exactly two model requests reached the provider (tool call, then answer: no retry, no fallback
    to a non-streaming request), on the dialect of the route, with the mapped model name, the
    provider's own key and never the client's key;
  - the balancer logged exactly those two requests, each on the Chat Completions front
    (`front: openai_chat`), streamed, status 200, in one attempt on the expected provider, and no
    WARN or ERROR line;
  - with strace available, OpenCode connected to nothing but loopback.

Environment: BIN_DIR (the built binaries), OPENCODE_BIN (the pinned CLI), OPENCODE_VERSION,
OPENCODE_E2E_STRACE (auto | 0), OPENCODE_E2E_TIMEOUT (seconds per run, default 180).
Prints "opencode-e2e: N passed, M failed".
"""
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN_DIR = os.environ["BIN_DIR"]
OPENCODE_BIN = os.environ["OPENCODE_BIN"]
OPENCODE_VERSION = os.environ.get("OPENCODE_VERSION", "1.18.33")
RUN_TIMEOUT = int(os.environ.get("OPENCODE_E2E_TIMEOUT", "180"))
CLIENT_KEY = "sk-client-opencode-e2e-0123456789"
PROVIDER_KEY = "provider-own-key-opencode-e2e"
PROVIDER_ID = "gw"
ROUTES = {
    # route: (model OpenCode asks for, model the provider must receive, provider, path at the provider)
    "anthropic": ("claude-sonnet-4-6", "claude-upstream-mapped", "MockAnthropic", "/v1/messages"),
    "openai": ("gpt-mock", "mock-model-upstream", "MockOpenAI", "/v1/chat/completions"),
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


def http(method, url, body=None, timeout=10):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def start_mock():
    p = subprocess.Popen([os.path.join(BIN_DIR, "mock-provider")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    procs.append(p)
    line = p.stdout.readline()
    assert line.startswith("mock-provider listening on "), f"mock-provider did not start: {line!r}"
    return line.split()[-1]


class Balancer:
    def __init__(self, workdir, mock_url):
        self.workdir = workdir
        self.config = os.path.join(workdir, "balancer.yaml")
        self.console = os.path.join(workdir, "balancer.log")
        self.jsonl = os.path.join(workdir, "balancer.jsonl")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.config, "w") as f:
            f.write(f"""providers:
  - {{name: "MockAnthropic", type: anthropic, base_url: "{mock_url}", auth_type: api_key, auth_value: "{PROVIDER_KEY}"}}
  - {{name: "MockOpenAI", type: openai, base_url: "{mock_url}/v1", auth_type: api_key, auth_value: "{PROVIDER_KEY}"}}
model_routes:
  "{ROUTES['anthropic'][0]}":
    - {{provider: "MockAnthropic", model: "{ROUTES['anthropic'][1]}"}}
  "{ROUTES['openai'][0]}":
    - {{provider: "MockOpenAI", model: "{ROUTES['openai'][1]}"}}
settings:
  log_level: INFO
  log_color: false
  log_file_path: "{self.jsonl}"
  failure_cooldown: 60
  usage:
    path: ""
  auth:
    enabled: true
    api_keys: ["{CLIENT_KEY}"]
""")
        self.log = open(self.console, "ab")
        self.proc = subprocess.Popen([os.path.join(BIN_DIR, "claude-balancer"), "--config", self.config, "--port", str(self.port)],
                                     stdout=self.log, stderr=self.log, cwd=workdir)
        procs.append(self.proc)
        for _ in range(200):
            try:
                http("GET", self.url + "/health")
                return
            except Exception:  # noqa: BLE001 - not up yet
                if self.proc.poll() is not None:
                    break
                time.sleep(0.05)
        raise RuntimeError("balancer did not start:\n" + self.tail())

    def offset(self):
        return os.path.getsize(self.jsonl) if os.path.exists(self.jsonl) else 0

    def lines_since(self, offset):
        out = []
        with open(self.jsonl, "rb") as f:
            f.seek(offset)
            for raw in f.read().decode("utf-8", "replace").splitlines():
                try:
                    out.append(json.loads(raw))
                except json.JSONDecodeError:
                    out.append({"level": "UNPARSED", "message": raw})
        return out

    def tail(self, n=40):
        try:
            with open(self.console, "rb") as f:
                return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
        except OSError:
            return "(no balancer log)"


def opencode_config(balancer_url):
    models = {model: {"name": f"{model} via the balancer", "limit": {"context": 200000, "output": 64000}}
              for model, _, _, _ in ROUTES.values()}
    first = f"{PROVIDER_ID}/{ROUTES['anthropic'][0]}"
    return {
        "$schema": "https://opencode.ai/config.json",
        "autoupdate": False,
        "share": "disabled",
        "enabled_providers": [PROVIDER_ID],
        "model": first,
        "small_model": first,
        "permission": {"bash": "allow", "edit": "allow", "read": "allow", "webfetch": "deny"},
        "provider": {PROVIDER_ID: {
            "npm": "@ai-sdk/openai-compatible",
            "name": "claude-balancer",
            "options": {"baseURL": balancer_url + "/v1", "apiKey": CLIENT_KEY},
            "models": models,
        }},
    }


def isolated_home(root):
    """XDG folders of OpenCode's own, in a temp folder. The global config folder is seeded so that
    OpenCode does not install @opencode-ai/plugin into it from registry.npmjs.org in the background
    (1.18.33 runs `Npm.install(<config dir>, add @opencode-ai/plugin)` for every config folder unless
    node_modules exists and package-lock.json already lists the package)."""
    dirs = {name: os.path.join(root, name) for name in ("config", "data", "cache", "state", "home", "tmp")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    conf = os.path.join(dirs["config"], "opencode")
    os.makedirs(os.path.join(conf, "node_modules"), exist_ok=True)
    pin = {"@opencode-ai/plugin": OPENCODE_VERSION}
    with open(os.path.join(conf, "package.json"), "w") as f:
        json.dump({"dependencies": pin}, f)
    with open(os.path.join(conf, "package-lock.json"), "w") as f:
        json.dump({"lockfileVersion": 3, "requires": True, "packages": {"": {"dependencies": pin}}}, f)
    return dirs


def strace_usable():
    if os.environ.get("OPENCODE_E2E_STRACE", "auto") == "0" or not shutil.which("strace"):
        return False
    try:
        return subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


LOOPBACK = re.compile(r'inet_addr\("127\.|inet_pton\(AF_INET6, "(::1|::ffff:127\.)')


def outside_connections(trace_file):
    """connect() calls of OpenCode (and its children) to anything but loopback, from an strace log."""
    bad = []
    with open(trace_file, errors="replace") as f:
        for line in f:
            if "connect(" not in line or "AF_UNIX" in line or "AF_NETLINK" in line:
                continue
            if ("AF_INET" in line) and not LOOPBACK.search(line):
                bad.append(line.strip()[:200])
    return bad


def run_opencode(workdir, balancer_url, model, prompt, title, thinking=False, trace=None):
    project = os.path.join(workdir, "project")
    scratch = tempfile.mkdtemp(prefix="oc-", dir=workdir)
    dirs = isolated_home(scratch)
    config_path = os.path.join(scratch, "opencode.json")
    with open(config_path, "w") as f:
        json.dump(opencode_config(balancer_url), f)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("OPENCODE_", "XDG_", "ANTHROPIC_", "OPENAI_", "CLAUDE_", "TMP"))}
    env.update({
        "HOME": dirs["home"],
        "XDG_CONFIG_HOME": dirs["config"], "XDG_DATA_HOME": dirs["data"],
        "XDG_CACHE_HOME": dirs["cache"], "XDG_STATE_HOME": dirs["state"],
        "TMPDIR": dirs["tmp"],  # OpenCode's scratch folder is $TMPDIR/opencode
        "OPENCODE_CONFIG": config_path,
        "OPENCODE_DISABLE_AUTOUPDATE": "1",
        "OPENCODE_DISABLE_MODELS_FETCH": "1",
        "OPENCODE_DISABLE_DEFAULT_PLUGINS": "1",
        "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        "OPENCODE_DISABLE_CLAUDE_CODE": "1",
        "OPENCODE_DISABLE_PROJECT_CONFIG": "1",
        "OPENCODE_DISABLE_SHARE": "1",
        # OpenCode takes its project folder from $PWD before the working directory.
        "PWD": project,
    })
    # The prompt goes on stdin: `opencode run` wraps every argument that contains a space in quotes
    # and escapes its double quotes (`"` -> `\"`), which would spoil the JSON the fake model reads.
    # --title skips the title request to the small model, so each run makes a known number of requests.
    cmd = [OPENCODE_BIN, "run", "-m", f"{PROVIDER_ID}/{model}", "--format", "json", "--title", title,
           "--dir", project, "--print-logs", "--log-level", "WARN"]
    if thinking:
        cmd.append("--thinking")
    if trace:
        cmd = ["strace", "-f", "-qq", "-e", "trace=connect", "-e", "signal=none", "-o", trace] + cmd
    p = subprocess.Popen(cmd, cwd=project, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = p.communicate(prompt, timeout=RUN_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        stdout, stderr = p.communicate()
        raise AssertionError(f"opencode did not finish within {RUN_TIMEOUT}s; stdout {stdout[-800:]!r}; stderr {stderr[-800:]!r}")
    try:
        os.killpg(p.pid, signal.SIGKILL)  # whatever it left behind (shells of the bash tool)
    except (ProcessLookupError, PermissionError):
        pass
    events, junk = [], []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            events.append(json.loads(line))
        except json.JSONDecodeError:
            junk.append(line)
    return p.returncode, events, junk, stderr


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print(f"ok   {name}", flush=True)
    except Exception as e:  # noqa: BLE001 - report every scenario
        failed += 1
        print(f"FAIL {name}: {e}", flush=True)


def expect_agent(code, events, junk, stderr, marker, thinking):
    summary = [(e.get("type"), (e.get("part") or {}).get("text") or (e.get("part") or {}).get("reason")) for e in events]
    where = f"events {summary}; stderr {stderr[-1500:]!r}"
    assert code == 0, f"exit {code}; {where}"
    assert not junk, f"opencode printed lines that are not JSON events (a permission prompt, an error): {junk[:5]}; {where}"
    errors = [e for e in events if e.get("type") == "error"]
    assert not errors, f"opencode reported an error: {errors}"
    logged_errors = [l for l in stderr.splitlines() if "level=ERROR" in l]
    assert not logged_errors, f"opencode logged errors: {logged_errors[:5]}"
    tools = [e["part"] for e in events if e.get("type") == "tool_use"]
    assert len(tools) == 1, f"want one tool_use event, got {len(tools)}; {where}"
    tool = tools[0]
    state = tool.get("state") or {}
    assert tool.get("tool") == "bash", f"the tool was {tool.get('tool')!r}, not bash"
    assert state.get("status") == "completed", f"the bash tool did not complete: {state}"
    assert (state.get("metadata") or {}).get("exit") == 0, f"the command failed: {state}"
    assert marker in (state.get("output") or ""), f"the tool output {state.get('output')!r} lacks {marker!r}: the command did not run"
    texts = [e["part"].get("text") or "" for e in events if e.get("type") == "text"]
    assert texts, f"no text from the agent; {where}"
    final = texts[-1]
    assert f"The tool said: {marker}" in final, f"the final text {final!r} does not quote the tool output {marker!r}"
    reasons = [e["part"].get("reason") for e in events if e.get("type") == "step_finish"]
    assert reasons == ["tool-calls", "stop"], f"steps finished with {reasons}, want ['tool-calls', 'stop']"
    for e in events:
        if e.get("type") == "step_finish":
            tokens = e["part"].get("tokens") or {}
            assert tokens.get("input", 0) > 0 and tokens.get("output", 0) > 0, \
                f"no usage reached OpenCode (the final usage chunk): {tokens}"
    if thinking:
        reasoning = [e["part"].get("text") or "" for e in events if e.get("type") == "reasoning"]
        assert any("Thinking about:" in r for r in reasoning), f"no reasoning reached OpenCode: {summary}"


def expect_provider(mock_url, route, marker):
    _, upstream, _, path = ROUTES[route]
    reqs = [r for r in http("GET", mock_url + "/_mock/requests") if r["method"] == "POST"]
    shown = [(r["path"], (r.get("body") or {}).get("model")) for r in reqs]
    assert len(reqs) == 2, f"want exactly 2 model requests at the provider (tool call, answer), got {len(reqs)}: {shown}"
    for r in reqs:
        body = r.get("body") or {}
        assert r["path"].split("?")[0] == path, f"a request went to {r['path']}, want {path}: {shown}"
        assert body.get("stream") is True, f"a request without streaming reached the provider: {shown}"
        assert body.get("model") == upstream, f"model {body.get('model')!r} reached the provider, want {upstream!r}"
        headers = json.dumps(r.get("headers") or {})
        assert CLIENT_KEY not in headers, "the client's key reached the provider"
        assert PROVIDER_KEY in headers, "the provider's own key was not sent"
    last = json.dumps((reqs[1].get("body") or {}).get("messages", [])[-1:])
    assert marker in last, f"the second request does not carry the tool result {marker!r}: {last[:400]}"


def expect_balancer(lines, route):
    model, upstream, provider, _ = ROUTES[route]
    requests = [l for l in lines if l.get("message") == "request"]
    loud = [l for l in lines if l.get("level") not in ("INFO", "DEBUG", "TRACE")]
    assert not loud, f"the balancer logged warnings or errors: {loud[:5]}"
    assert len(requests) == 2, f"the balancer logged {len(requests)} requests, want 2: {requests}"
    for l in requests:
        assert l.get("front") == "openai_chat", f"a request came in by {l.get('front')!r}, not /v1/chat/completions: {l}"
        assert l.get("status") == 200 and l.get("stream") is True, f"request {l.get('request_id')}: status {l.get('status')}, stream {l.get('stream')}"
        assert l.get("model") == model and l.get("provider") == provider, f"request {l.get('request_id')}: {l.get('model')} -> {l.get('provider')}"
        attempts = json.loads(l.get("attempts") or "[]")
        assert len(attempts) == 1 and attempts[0].get("outcome") == "committed" and attempts[0].get("upstream_model") == upstream, \
            f"request {l.get('request_id')} needed a retry or a failover: {attempts}"


def main():
    workdir = tempfile.mkdtemp(prefix="cb-opencode-e2e-")
    project = os.path.join(workdir, "project")
    os.makedirs(project)
    mock_url = start_mock()
    balancer = Balancer(workdir, mock_url)
    traced = strace_usable()
    if not traced:
        print("note: strace is unavailable, the check that OpenCode connects to nothing but loopback is skipped", flush=True)

    def scenario(route, thinking=False):
        model = ROUTES[route][0]

        def run():
            http("POST", mock_url + "/_mock/reset")
            token = secrets.token_hex(6)
            with open(os.path.join(project, "token.txt"), "w") as f:
                f.write(token + "\n")
            # Only the shell can compute the marker: it appears in no prompt.
            marker = f"oc-42-{token}"
            command = "echo oc-$((6*7))-$(cat token.txt)"
            prompt = ("think first, then " if thinking else "") + "use the tool bash " + json.dumps({"command": command})
            offset = balancer.offset()
            trace = os.path.join(workdir, f"strace-{route}-{int(thinking)}.log") if traced else None
            code, events, junk, stderr = run_opencode(workdir, balancer.url, model, prompt, f"e2e-{route}", thinking, trace)
            expect_agent(code, events, junk, stderr, marker, thinking)
            expect_provider(mock_url, route, marker)
            # The summary line is written as each response ends: give the last one a moment.
            deadline = time.time() + 5
            while sum(l.get("message") == "request" for l in balancer.lines_since(offset)) < 2 and time.time() < deadline:
                time.sleep(0.1)
            time.sleep(0.2)
            expect_balancer(balancer.lines_since(offset), route)
            if trace:
                bad = outside_connections(trace)
                assert not bad, f"OpenCode tried to reach the network: {bad[:5]}"
        return run

    try:
        for route in ROUTES:
            check(f"{route} route: bash tool round trip", scenario(route))
            check(f"{route} route: reasoning, then bash tool round trip", scenario(route, thinking=True))
        if failed:
            print("--- balancer log (tail)", flush=True)
            print(balancer.tail(), flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"opencode-e2e: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    code = 1
    try:
        code = main()
    except Exception as e:  # noqa: BLE001 - setup failed: still print the closing line
        print(f"FAIL setup: {e}", flush=True)
        print(f"opencode-e2e: {passed} passed, {failed + 1} failed", flush=True)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    sys.exit(code)
