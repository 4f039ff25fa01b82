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
