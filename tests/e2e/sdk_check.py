"""The official anthropic SDK must accept the balancer's streams and rebuild, with
messages.stream(...).get_final_message(), the same message that messages.create(...) returns."""
import os
import sys

import anthropic

client = anthropic.Anthropic(base_url=os.environ["BALANCER_URL"], api_key="sk-client-test", max_retries=0)
passed = 0
failed = 0


def comparable(message):
    d = message.model_dump()
    d.pop("id", None)
    for block in d["content"]:
        if block.get("type") == "tool_use":
            block.pop("id", None)  # minted per answer when the upstream gives none
    return d


def check(name, model, prompt, thinking=False):
    global passed, failed
    kwargs = dict(model=model, max_tokens=1024, messages=[{"role": "user", "content": prompt}],
                  tools=[{"name": "Bash", "description": "Run a command",
                          "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}])
    if thinking:
        kwargs["thinking"] = {"type": "enabled", "budget_tokens": 2048}
    try:
        with client.messages.stream(**kwargs) as stream:
            streamed = stream.get_final_message()
        plain = client.messages.create(**kwargs)
        a, b = comparable(streamed), comparable(plain)
        assert a == b, f"stream and non-stream differ:\n{a}\n{b}"
        assert a["model"] == model, a["model"]
        assert a["content"], "empty content"
        assert a["usage"]["input_tokens"] > 0
        if "use the tool" in prompt:
            assert a["stop_reason"] == "tool_use", a["stop_reason"]
            assert a["content"][-1]["type"] == "tool_use" and a["content"][-1]["input"] == {"command": "echo hi"}, a
        if thinking:
            assert a["content"][0]["type"] == "thinking" and a["content"][0]["signature"], a
        passed += 1
        print(f"ok   {name}")
    except Exception as e:  # noqa: BLE001 - report every failure and go on
        failed += 1
        print(f"FAIL {name}: {e!r}")


for route, model in [("anthropic", "claude-sonnet-4-6"), ("openai", "gpt-4o")]:
    check(f"{route}: text", model, "say hello")
    check(f"{route}: tool call", model, 'use the tool Bash {"command":"echo hi"}')
    check(f"{route}: thinking", model, "think about it, then answer", thinking=True)

# Errors reach the SDK as typed exceptions with Anthropic bodies.
try:
    client.messages.create(model="unrouted-model", max_tokens=10, messages=[{"role": "user", "content": "x"}])
    failed += 1
    print("FAIL unrouted model: no error")
except anthropic.NotFoundError as e:
    if e.body and e.body.get("error", {}).get("type") == "not_found_error":
        passed += 1
        print("ok   unrouted model: NotFoundError")
    else:
        failed += 1
        print(f"FAIL unrouted model: body {e.body}")

# The models list: auto-pagination ends, and one model is found by its id.
try:
    listed = [m.id for m in client.models.list()]
    one = client.models.retrieve("claude-sonnet-4-6")
    if listed == ["claude-sonnet-4-6"] and one.id == "claude-sonnet-4-6" and one.display_name:
        passed += 1
        print("ok   models: list and retrieve")
    else:
        failed += 1
        print(f"FAIL models: {listed!r}, {one!r}")
except Exception as e:  # noqa: BLE001
    failed += 1
    print(f"FAIL models: {e!r}")

# A named client over its limit: a typed RateLimitError with retry-after and the client named.
limited = anthropic.Anthropic(base_url=os.environ["BALANCER_URL"], api_key="sk-limited-client", max_retries=0)
ask = dict(model="claude-sonnet-4-6", max_tokens=10, messages=[{"role": "user", "content": "x"}])
try:
    limited.messages.create(**ask)
    limited.messages.create(**ask)
    failed += 1
    print("FAIL client limit: no error")
except anthropic.RateLimitError as e:
    retry = e.response.headers.get("retry-after")
    if retry and 1 <= int(retry) <= 60 and "limited" in str(e) and "requests per minute" in str(e):
        passed += 1
        print(f"ok   client limit: 429 with retry-after {retry}")
    else:
        failed += 1
        print(f"FAIL client limit: retry-after {retry!r}, {e!r}")
except Exception as e:  # noqa: BLE001
    failed += 1
    print(f"FAIL client limit: {e!r}")

print(f"sdk-e2e: {passed} passed, {failed} failed")
sys.exit(1 if failed else 0)
