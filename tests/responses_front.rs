//! The OpenAI Responses front end (`POST /v1/responses`), stateless, through the whole balancer:
//! converted for both provider types, rendered as a `response` object or its typed events.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use claude_balancer::adapter::responses::stream::accumulate;
use common::*;
use serde_json::{Value, json};

fn yaml(anth: &str, oai: &str) -> String {
    format!(
        "providers:
  - name: Anth
    type: anthropic
    base_url: \"{anth}\"
    auth_type: api_key
    auth_value: key-anth
  - name: Oai
    type: openai
    base_url: \"{oai}/v1\"
    auth_type: api_key
    auth_value: key-oai
model_routes:
  \"claude-*\":
    - provider: Anth
      model: claude-upstream-1
  \"gpt-*\":
    - provider: Oai
      model: vendor/gpt-upstream
"
    )
}

async fn setup() -> (MockProvider, MockProvider, Balancer) {
    let anth = MockProvider::start(Reply::Model).await.unwrap();
    let oai = MockProvider::start(Reply::Model).await.unwrap();
    let bal = Balancer::start(&yaml(&anth.url(), &oai.url())).await;
    (anth, oai, bal)
}

fn codex_like(model: &str, input: Value) -> Value {
    json!({"model": model, "instructions": "You are a coding agent.", "input": input, "stream": true, "store": false,
        "tools": [{"type": "function", "name": "shell", "description": "Runs a command.", "strict": false,
            "parameters": {"type": "object", "properties": {"command": {"type": "array", "items": {"type": "string"}}}, "required": ["command"]}},
            {"type": "web_search", "external_web_access": false}],
        "tool_choice": "auto", "parallel_tool_calls": false, "reasoning": null, "include": [], "prompt_cache_key": "conv-1"})
}

async fn post(bal: &Balancer, body: &Value) -> (u16, http::HeaderMap, String) {
    let resp = bal.post("/v1/responses", body).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

#[tokio::test]
async fn a_codex_tool_loop_streams_through_both_provider_types() {
    let (anth, oai, bal) = setup().await;
    for (model, provider) in [("claude-x", &anth), ("gpt-x", &oai)] {
        let first = codex_like(
            model,
            json!([{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "use the tool shell {\"command\":[\"ls\"]}"}]}]),
        );
        let (status, headers, text) = post(&bal, &first).await;
        assert_eq!(status, 200, "{model}: {text}");
        assert!(
            headers["content-type"]
                .to_str()
                .unwrap()
                .starts_with("text/event-stream")
        );
        let (r, _) = accumulate(text.as_bytes()).unwrap_or_else(|e| panic!("{model}: {e}\n{text}"));
        assert_eq!(r["model"], model);
        let call = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "function_call")
            .cloned()
            .unwrap();
        assert_eq!(call["name"], "shell");
        assert_eq!(
            serde_json::from_str::<Value>(call["arguments"].as_str().unwrap()).unwrap(),
            json!({"command": ["ls"]})
        );
        // The next turn: the whole history, the call and its output.
        let mut input = first["input"].as_array().unwrap().clone();
        input.extend(
            r["output"]
                .as_array()
                .unwrap()
                .iter()
                .cloned()
                .map(|mut i| {
                    i.as_object_mut().unwrap().remove("id");
                    i
                }),
        );
        input.push(json!({"type": "function_call_output", "call_id": call["call_id"], "output": "a.txt b.txt"}));
        let (status, _, text) = post(&bal, &codex_like(model, Value::Array(input))).await;
        assert_eq!(status, 200, "{text}");
        let (r, _) = accumulate(text.as_bytes()).unwrap();
        let message = r["output"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["type"] == "message")
            .cloned()
            .unwrap();
        assert_eq!(message["content"][0]["text"], "The tool said: a.txt b.txt");
        assert!(r["usage"]["total_tokens"].as_u64().unwrap() > 0);
        assert_eq!(provider.request_count(), 2, "{model}");
    }
    // What the providers got: the tool loop in each one's own form.
    let sent = anth.requests()[1].json();
    assert_eq!(sent["system"][0]["text"], "You are a coding agent.");
    assert_eq!(
        sent["tools"].as_array().unwrap().len(),
        1,
        "the hosted web_search is left out"
    );
    assert_eq!(sent["messages"][2]["content"][0]["type"], "tool_result");
    let sent = oai.requests()[1].json();
    assert_eq!(sent["model"], "vendor/gpt-upstream");
    assert!(
        sent["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["role"] == "tool" && m["content"] == "a.txt b.txt"),
        "{sent}"
    );
}

#[tokio::test]
async fn a_non_streaming_response_with_thinking_carries_it_to_the_next_turn() {
    let (anth, _oai, bal) = setup().await;
    let body = json!({"model": "claude-x", "input": "think, then use the tool shell {\"command\":[\"pwd\"]}",
        "reasoning": {"effort": "medium", "summary": "auto"}, "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object"}}]});
    let (status, _, text) = post(&bal, &body).await;
    assert_eq!(status, 200, "{text}");
    let r: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(r["object"], "response");
    assert_eq!(r["status"], "completed");
    let output = r["output"].as_array().unwrap();
    assert_eq!(output[0]["type"], "reasoning");
    assert!(
        output[0]["summary"][0]["text"]
            .as_str()
            .unwrap()
            .starts_with("Thinking about")
    );
    let call = output
        .iter()
        .find(|i| i["type"] == "function_call")
        .unwrap();
    let mut input = vec![json!({"role": "user", "content": body["input"]})];
    input.extend(output.iter().cloned());
    input.push(
        json!({"type": "function_call_output", "call_id": call["call_id"], "output": "/work"}),
    );
    let mut next = body.clone();
    next["input"] = Value::Array(input);
    let (status, _, text) = post(&bal, &next).await;
    assert_eq!(status, 200, "{text}");
    // The provider got the signed thinking back, first in the assistant turn, and thinking on.
    let sent = anth.requests()[1].json();
    assert_eq!(sent["messages"][1]["content"][0]["type"], "thinking");
    assert_eq!(
        sent["messages"][1]["content"][0]["signature"],
        "mock-signature"
    );
    assert_eq!(sent["thinking"]["type"], "enabled");
}

#[tokio::test]
async fn errors_before_and_after_the_stream_began() {
    let (anth, _oai, bal) = setup().await;
    // A stateless gateway refuses previous_response_id by name.
    let (status, _, text) = post(
        &bal,
        &json!({"model": "claude-x", "input": "x", "previous_response_id": "resp_1"}),
    )
    .await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("previous_response_id")),
        "{text}"
    );
    // Stored-response paths: 404 in OpenAI's shape.
    let resp = bal
        .client
        .get(format!("{}/v1/responses/resp_1", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(resp.json::<Value>().await.unwrap()["error"]["message"].is_string());
    // A prompt too long for a streaming request: 200, then response.failed with the code Codex
    // compacts on.
    anth.push(Reply::error(
        400,
        "invalid_request_error",
        "prompt is too long: 210000 tokens > 200000 maximum",
    ));
    let (status, _, text) = post(&bal, &codex_like("claude-x", json!("hello"))).await;
    assert_eq!(status, 200, "{text}");
    let failed = events(&text);
    assert_eq!(
        names(&failed),
        [
            "response.created",
            "response.in_progress",
            "response.failed"
        ]
    );
    assert_eq!(
        failed[2].1["response"]["error"]["code"],
        "context_length_exceeded"
    );
    // Overloaded everywhere: 503 without the code on which Codex would give up at once.
    anth.set_default(Reply::error(529, "overloaded_error", "Overloaded"));
    let (status, _, text) = post(&bal, &codex_like("claude-x", json!("hello"))).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 503, "{text}");
    assert_eq!(e["error"]["type"], "server_error");
    assert!(e["error"]["code"].is_null());
    // A stream cut after it began: response.failed, retryable.
    anth.set_default(Reply::ModelCut(4));
    let (status, _, text) = post(
        &bal,
        &codex_like("claude-x", json!("a longer answer to cut")),
    )
    .await;
    assert_eq!(status, 200);
    let cut = events(&text);
    let (last, data) = cut.last().unwrap();
    assert_eq!(last, "response.failed", "{text}");
    assert_eq!(data["response"]["error"]["code"], "server_error");
}

/// A Responses stream as an OpenAI-compatible provider that speaks the API would write it.
fn native_stream(text: &str, complete: bool) -> String {
    let mut out = String::new();
    let mut ev = |kind: &str, data: Value| {
        out.push_str(&format!("event: {kind}\ndata: {data}\n\n"));
    };
    let resp = json!({"id": "resp_native", "object": "response", "created_at": 1, "status": "in_progress", "model": "vendor/gpt-upstream", "output": [], "usage": null});
    ev(
        "response.created",
        json!({"type": "response.created", "sequence_number": 0, "response": resp}),
    );
    ev(
        "response.output_item.added",
        json!({"type": "response.output_item.added", "sequence_number": 1, "output_index": 0,
        "item": {"type": "message", "id": "msg_n", "role": "assistant", "status": "in_progress", "content": []}}),
    );
    ev(
        "response.content_part.added",
        json!({"type": "response.content_part.added", "sequence_number": 2, "item_id": "msg_n", "output_index": 0, "content_index": 0,
        "part": {"type": "output_text", "text": "", "annotations": []}}),
    );
    ev(
        "response.output_text.delta",
        json!({"type": "response.output_text.delta", "sequence_number": 3, "item_id": "msg_n", "output_index": 0, "content_index": 0, "delta": text, "logprobs": []}),
    );
    if complete {
        let item = json!({"type": "message", "id": "msg_n", "role": "assistant", "status": "completed", "content": [{"type": "output_text", "text": text, "annotations": []}]});
        ev(
            "response.output_item.done",
            json!({"type": "response.output_item.done", "sequence_number": 4, "output_index": 0, "item": item}),
        );
        let mut done = resp.clone();
        done["status"] = json!("completed");
        done["output"] = json!([item]);
        done["usage"] = json!({"input_tokens": 40, "input_tokens_details": {"cached_tokens": 30}, "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 45});
        ev(
            "response.completed",
            json!({"type": "response.completed", "sequence_number": 5, "response": done}),
        );
    }
    out
}

#[tokio::test]
async fn a_provider_that_speaks_responses_gets_the_request_as_it_is() {
    let anth = MockProvider::start(Reply::Model).await.unwrap();
    let oai = MockProvider::start(Reply::sse(&native_stream("native hello", true)))
        .await
        .unwrap();
    let config = yaml(&anth.url(), &oai.url())
        .replace("    auth_value: key-oai\n", "    auth_value: key-oai\n    responses: true\n")
        .replace("model_routes:\n", "model_routes:\n  \"mixed-*\":\n    - provider: Oai\n      model: vendor/gpt-upstream\n      priority: 1\n    - provider: Anth\n      model: claude-upstream-1\n      priority: 2\n");
    let bal = Balancer::start(&config).await;
    let raw = r#"{"model":"gpt-x", "input":"hi", "stream":true, "store":false, "service_tier":"flex", "text":{"verbosity":"low"}}"#;
    let resp = bal
        .client
        .post(format!("{}/v1/responses", bal.url))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert_eq!(
        text,
        native_stream("native hello", true),
        "relayed as written"
    );
    let r = &oai.requests()[0];
    assert_eq!(r.path, "/v1/responses");
    assert_eq!(r.header("authorization"), Some("Bearer key-oai"));
    assert_eq!(
        String::from_utf8(r.body.clone()).unwrap(),
        raw.replace("\"gpt-x\"", "\"vendor/gpt-upstream\"")
    );
    // Usage read from the provider's own events: 10 uncached + 30 cached input tokens.
    let metrics = bal.get_text("/metrics").await;
    assert!(
        metrics.contains("claude_balancer_tokens_total{provider=\"Oai\",kind=\"input\"} 10"),
        "{metrics}"
    );
    assert!(
        metrics.contains("claude_balancer_tokens_total{provider=\"Oai\",kind=\"cache_read\"} 30"),
        "{metrics}"
    );
    assert!(metrics.contains("front=\"openai_responses\""), "{metrics}");

    // A failed first event fails over to the next candidate, converted.
    let failed = "event: response.failed\ndata: {\"type\":\"response.failed\",\"sequence_number\":0,\"response\":{\"id\":\"r\",\"status\":\"failed\",\"error\":{\"code\":\"server_error\",\"message\":\"boom\"}}}\n\n";
    oai.push(Reply::sse(failed));
    let (status, headers, text) = post(
        &bal,
        &json!({"model": "mixed-1", "input": "hello there", "stream": true}),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-provider-used"], "Anth");
    let (r, _) = accumulate(text.as_bytes()).unwrap();
    assert!(
        r["output"][0]["content"][0]["text"]
            .as_str()
            .unwrap()
            .contains("hello there")
    );

    // Cut after the first byte: the client gets response.failed, numbered after what it saw.
    oai.push(Reply::sse(&native_stream("cut", false)));
    let (status, _, text) = post(
        &bal,
        &json!({"model": "gpt-x", "input": "x", "stream": true}),
    )
    .await;
    assert_eq!(status, 200);
    let got = events(&text);
    let (last, data) = got.last().unwrap();
    assert_eq!(last, "response.failed", "{text}");
    assert_eq!(data["sequence_number"], 4);
    assert_eq!(data["response"]["error"]["code"], "server_error");
}

#[tokio::test]
async fn each_reasoning_effort_reaches_an_openai_type_provider_as_itself() {
    let (_anth, oai, bal) = setup().await;
    for effort in ["low", "medium", "high", "xhigh"] {
        let (status, _, text) = post(
            &bal,
            &json!({"model": "gpt-x", "input": "x", "reasoning": {"effort": effort}}),
        )
        .await;
        assert_eq!(status, 200, "{text}");
        let sent = oai.requests().last().unwrap().json();
        let want = if effort == "xhigh" { "high" } else { effort };
        assert_eq!(sent["reasoning_effort"], want, "{effort}");
    }
}
