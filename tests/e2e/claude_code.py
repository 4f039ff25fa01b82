"""The real Claude Code CLI through the balancer, offline, against fake providers.

Every scenario runs `claude -p ... --output-format stream-json --verbose` once through an
anthropic-type route and once through an openai-type route, and checks the exit code, the final
text, that no retry was needed (no `api_retry` line), that the CLI never had to repeat a streaming
request without streaming, that the mapped model name reached the provider, and that the client's
credential never reached a provider that has its own.

Two scenarios check routing that knows the request, on the anthropic route only: a conversation
that outgrows a small-window route is refused with `prompt is too long` before any provider is
called, and Claude Code compacts it and succeeds; an image goes to the provider that takes images.

CLAUDE_E2E_ONLY=TEXT runs only the scenarios whose name contains TEXT.

Environment: BIN_DIR (the built binaries), CLAUDE_BIN (the CLI). Prints "claude-e2e: N passed, M failed".
"""
import json
import os
import re
import struct
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

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
    def __init__(self, workdir, mocks, primary_down=None, routes=None):
        """`routes`: the `model_routes:` entries as YAML lines, instead of those of ROUTES."""
        self.path = os.path.join(workdir, "balancer.yaml")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.mocks = mocks
        self.routes = routes
        self.write(primary_down=primary_down)
        self.log_path = os.path.join(workdir, "balancer.log")
        self.log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
        self.log = open(self.log_path, "ab")
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
        for route, (_, upstream, primary, secondary) in ({} if self.routes else ROUTES).items():
            first, second = (secondary, primary) if swap else (primary, secondary)
            pattern = "*claude*" if route == "anthropic" else "*gpt*"
            lines += [f'  "{pattern}":',
                      f'    - {{provider: "{first}", model: "{upstream}", priority: 1}}',
                      f'    - {{provider: "{second}", model: "{upstream}", priority: 2}}']
        lines += self.routes or []
        lines += ["settings:", "  failure_cooldown: 60", "  log_level: INFO"]
        with open(self.path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)

    def summaries(self):
        """The per-request summary lines this balancer logged (`request req_... STATUS ... attempts=[...]`)."""
        self.log.flush()
        with open(self.log_path, "rb") as f:
            f.seek(self.log_start)
            text = f.read().decode(errors="replace")
        return [l for l in text.splitlines() if re.search(r"\brequest req_\S+ \d{3} ", l)]

    def fits(self, body):
        """Whether the balancer, planning `body` by this configuration, would call a provider (the
        same estimate it routes by), and `explain`'s account of it."""
        path = os.path.join(os.path.dirname(self.path), "explain-request.json")
        with open(path, "w") as f:
            json.dump(body, f)
        p = subprocess.run([os.path.join(BIN_DIR, "claude-balancer"), "explain", "--config", self.path, path],
                           capture_output=True, text=True, timeout=60)
        out = p.stdout + p.stderr
        return re.search(r"^outcome: [1-9]\d* candidates? would be tried", out, re.M) is not None, out


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
    if os.environ.get("CLAUDE_E2E_ONLY", "") not in name:
        return
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


def png(path, width=16, height=16):
    """A small valid RGB PNG (a red square)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def filler(label, size):
    """About `size` bytes of numbered lines (about 3 bytes a token), each line different."""
    out, i, n = [], 0, 0
    while n < size:
        line = f"{label} {i}: the quick brown fox jumps over the lazy dog, number {i * 7919 % 10007}\n"
        out.append(line)
        n += len(line)
        i += 1
    return "".join(out)


def has_image(body):
    """Whether an Anthropic request body carries an image block anywhere in its messages."""
    def walk(v):
        if isinstance(v, dict):
            return v.get("type") == "image" or any(walk(x) for x in v.values())
        if isinstance(v, list):
            return any(walk(x) for x in v)
        return False
    return walk(body.get("messages") or [])


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

    # Compaction. The route's only provider holds WINDOW tokens and is asked for at most 4000 out.
    # The prompt carries PAD of background text and makes the model Read a file of FILE: Claude
    # Code's first request (its ~21.5k-token system prompt and tools, plus PAD) fits; the next one,
    # which adds the file's content, does not, so the balancer answers 400 `prompt is too long: N
    # tokens > WINDOW maximum` without calling the provider. Claude Code then compacts: from the
    # numbers in that message it drops the oldest messages (the padded prompt) from its summary
    # request, which fits, and continues from the summary, which fits too. Measured with 2.1.332
    # (the balancer's counts, output included): first request ~37k, the one refused ~52k, the
    # summary requests ~39k, the request after compaction ~26k: each at least 6k from WINDOW.
    WINDOW, PAD, FILE = 46000, 40000, 44000
    big = os.path.join(workdir, "project", "big.txt")
    with open(big, "w") as f:
        f.write(filler("file line", FILE))
    pad_text = filler("background note", PAD)
    file_tail = filler("file line", FILE).splitlines()[-1]

    def compaction():
        reset()
        routes = ['  "*claude*":',
                  f'    - {{provider: "A1", model: "claude-upstream-mapped", priority: 1, context_window: {WINDOW}, max_output_tokens: 4000}}']
        bal = Balancer(workdir, mocks, routes=routes)
        try:
            prompt = f'use the tool Read {{"file_path":"{big}"}}\n\nBackground for later, no action needed:\n{pad_text}'
            code, result, lines, stderr = run_claude(workdir, bal.url, ROUTES["anthropic"][0], prompt)
            summaries = bal.summaries()
            refused = [l for l in summaries if re.search(r"request req_\S+ 400 ", l) and "skipped: needs" in l
                       and f"window {WINDOW // 1000}k" in l]
            assert refused, "the balancer never answered `prompt is too long`: " + "\n".join(summaries)[-1500:]
            expect_success(code, result, lines, stderr, "Hello from the mock provider")
            statuses = [l for l in lines if l.get("type") == "system" and l.get("subtype") in ("status", "compact_boundary")]
            assert any(l.get("compact_result") == "success" for l in statuses), f"no successful compaction: {statuses}"
            assert any(l.get("subtype") == "compact_boundary" for l in statuses), f"no compact_boundary: {statuses}"
            assert "continued from a previous conversation" in result.get("result", ""), f"not answered from the summary: {result.get('result')!r}"
            expect_clean_upstream([mocks["A1"]], "claude-upstream-mapped")
            reqs = message_requests(mocks["A1"])
            # The provider never got a request it cannot hold: by the balancer's own estimate ...
            for r in reqs:
                ok, why = bal.fits(r["body"])
                assert ok, f"A1 received a request larger than its window:\n{why}"
            # ... and, independently of it, never the padded prompt together with the file.
            for r in reqs:
                text = json.dumps(r["body"])
                assert not ("background note 1:" in text and file_tail in text), "A1 received the prompt and the file together"
            def last_text(r):
                return json.dumps(((r["body"] or {}).get("messages") or [{}])[-1])
            summary_reqs = [r for r in reqs if "create a detailed summary of the conversation" in last_text(r)]
            assert summary_reqs, "no summary request reached A1"
            assert any("continued from a previous conversation" in json.dumps(r["body"]) for r in reqs), "no request after compaction"
            print(f"     compaction: {len(reqs)} requests reached A1 ({len(summary_reqs)} summary requests), "
                  f"{len(refused)} refused; sizes {[len(json.dumps(r['body'])) for r in reqs]} bytes", flush=True)
        finally:
            bal.stop()
    check("anthropic: a conversation too long for the window is compacted by Claude Code, then served", compaction)

    # An image goes past the provider that takes none. The first request (text) goes to A1; after
    # the Read of a PNG the next one carries an image block and must go to A2.
    pic = os.path.join(workdir, "project", "pic.png")
    png(pic)

    def image():
        reset()
        routes = ['  "*claude*":',
                  '    - {provider: "A1", model: "claude-upstream-mapped", priority: 1, images: false}',
                  '    - {provider: "A2", model: "claude-upstream-mapped", priority: 2, images: true}']
        bal = Balancer(workdir, mocks, routes=routes)
        try:
            code, result, lines, stderr = run_claude(workdir, bal.url, ROUTES["anthropic"][0], f'use the tool Read {{"file_path":"{pic}"}}')
            expect_success(code, result, lines, stderr, "The tool said")
            expect_clean_upstream([mocks["A1"], mocks["A2"]], "claude-upstream-mapped")
            a1, a2 = message_requests(mocks["A1"]), message_requests(mocks["A2"])
            everything_a1 = http("GET", mocks["A1"] + "/_mock/requests")
            assert not any(has_image(r["body"] or {}) for r in everything_a1), "A1 (images: false) received an image"
            assert a1, "A1 served nothing: the first request (no image) should have gone to it"
            with_image = [r for r in a2 if has_image(r["body"] or {})]
            assert with_image, f"no request with an image reached A2 ({len(a2)} requests)"
            skipped = [l for l in bal.summaries() if "skipped: needs images" in l]
            assert skipped, "the balancer's log shows no candidate skipped for lacking images"
            print(f"     image: A1 got {len(a1)} requests, A2 got {len(a2)} ({len(with_image)} with an image)", flush=True)
        finally:
            bal.stop()
    check("anthropic: an image goes to the provider that takes images", image)

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
