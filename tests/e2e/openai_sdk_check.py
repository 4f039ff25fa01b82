"""The official openai SDK must accept the balancer's OpenAI front end: what its stream
accumulators rebuild must equal the plain answer, for both provider types."""
import base64
import json
import os
import urllib.request

import openai
import pydantic

client = openai.OpenAI(base_url=os.environ["BALANCER_URL"] + "/v1", api_key="sk-client-test", max_retries=0)
MOCK = os.environ["MOCK_URL"]
passed = 0
failed = 0

SHELL = {"type": "function", "function": {"name": "shell", "description": "Run a command",
         "parameters": {"type": "object", "properties": {"command": {"type": "string"}}, "required": ["command"]}}}
# A 1x1 PNG.
PNG = base64.b64encode(bytes.fromhex(
    "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
    "0000000d49444154789c6360000002000001e221bc330000000049454e44ae426082")).decode()


def check(name):
    def wrap(fn):
        global passed, failed
        try:
            fn()
            passed += 1
            print(f"ok   {name}")
        except Exception as e:  # noqa: BLE001 - report every failure and go on
            failed += 1
            print(f"FAIL {name}: {e!r}")
        return fn
    return wrap


def mock_requests():
    with urllib.request.urlopen(MOCK + "/_mock/requests") as r:
        return json.load(r)


def message_of(completion):
    m = completion.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in (m.tool_calls or [])]
    return m.content, calls, completion.choices[0].finish_reason


for route, model in [("anthropic", "claude-sonnet-4-6"), ("openai", "gpt-4o")]:

    @check(f"{route}: chat streamed equals plain, with usage")
    def _():
        kwargs = dict(model=model, messages=[{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "say hello"}])
        plain = client.chat.completions.create(**kwargs)
        with client.chat.completions.stream(**kwargs, stream_options={"include_usage": True}) as s:
            streamed = s.get_final_completion()
        assert message_of(plain) == message_of(streamed), (plain, streamed)
        assert "say hello" in plain.choices[0].message.content
        # Converted answers echo the name asked for; the openai fast path relays the provider's own.
        assert plain.model == (model if route == "anthropic" else "mock-model"), plain.model
        assert plain.usage.prompt_tokens > 0 and plain.usage.completion_tokens > 0
        assert streamed.usage is not None and streamed.usage.total_tokens == plain.usage.total_tokens, streamed.usage

    @check(f"{route}: tool calling across two turns")
    def _():
        messages = [{"role": "user", "content": 'use the tool shell {"command":"ls"}'}]
        with client.chat.completions.stream(model=model, messages=messages, tools=[SHELL]) as s:
            first = s.get_final_completion()
        content, calls, finish = message_of(first)
        assert calls == [("shell", {"command": "ls"})] and finish == "tool_calls", (calls, finish)
        call = first.choices[0].message.tool_calls[0]
        messages.append({"role": "assistant", "content": content, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "shell", "arguments": call.function.arguments}}]})
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "a.txt b.txt"})
        second = client.chat.completions.create(model=model, messages=messages, tools=[SHELL])
        assert second.choices[0].message.content == "The tool said: a.txt b.txt", second
        assert second.choices[0].finish_reason == "stop"

    class Person(pydantic.BaseModel):
        name: str
        age: int
        tags: list[str]

    @check(f"{route}: structured output with parse")
    def _():
        r = client.chat.completions.parse(model=model, messages=[{"role": "user", "content": "a person"}],
                                          response_format=Person)
        p = r.choices[0].message.parsed
        assert isinstance(p, Person) and p.age == 1 and p.tags == ["mock"], r

    @check(f"{route}: an image")
    def _():
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": [
            {"type": "text", "text": "what is this"},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]}])
        assert "what is this" in r.choices[0].message.content
        sent = mock_requests()[-1]
        parts = sent["body"]["messages"][-1]["content"]
        kinds = [p["type"] for p in parts]
        want = "image" if route == "anthropic" else "image_url"
        assert want in kinds, kinds

    @check(f"{route}: responses create and stream with a function call, then its output")
    def _():
        tools = [{"type": "function", "name": "shell", "description": "Run a command",
                  "parameters": SHELL["function"]["parameters"], "strict": False}]
        first_input = [{"role": "user", "content": 'use the tool shell {"command":"pwd"}'}]
        plain = client.responses.create(model=model, input=first_input, tools=tools, store=False)
        with client.responses.stream(model=model, input=first_input, tools=tools, store=False) as s:
            streamed = s.get_final_response()

        def shape(r):
            return [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in r.output]
        assert shape(plain) == shape(streamed), (shape(plain), shape(streamed))
        calls = [i for i in streamed.output if i.type == "function_call"]
        assert len(calls) == 1 and json.loads(calls[0].arguments) == {"command": "pwd"}, streamed.output
        assert streamed.usage.total_tokens > 0 and streamed.model == model
        nxt = first_input + [i.model_dump(exclude_none=True) for i in streamed.output] + [
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "/work"}]
        with client.responses.stream(model=model, input=nxt, tools=tools, store=False) as s:
            final = s.get_final_response()
        assert final.output_text == "The tool said: /work", final.output_text


@check("errors: unrouted model is NotFoundError with model_not_found")
def _():
    try:
        client.chat.completions.create(model="unrouted", messages=[{"role": "user", "content": "x"}])
    except openai.NotFoundError as e:
        assert e.code == "model_not_found", e.body
        return
    raise AssertionError("no error")


@check("errors: n=2 is BadRequestError naming n")
def _():
    try:
        client.chat.completions.create(model="claude-sonnet-4-6", n=2, messages=[{"role": "user", "content": "x"}])
    except openai.BadRequestError as e:
        assert e.param == "n", e.body
        return
    raise AssertionError("no error")


@check("models: the OpenAI SDK lists the routes")
def _():
    ids = [m.id for m in client.models.list()]
    assert ids == ["claude-sonnet-4-6"], ids  # glob routes list the provider's `models:`
    assert client.models.retrieve("claude-sonnet-4-6").id == "claude-sonnet-4-6"


print(f"openai-e2e: {passed} passed, {failed} failed")
raise SystemExit(1 if failed else 0)
