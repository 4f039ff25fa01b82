//! OpenAI-compatible providers through the whole balancer, against a fake Chat Completions server.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::adapter::events::accumulate_sse;
use common::*;
use mock_provider::{openai_chunk, openai_completion, openai_sse};
use serde_json::{Value, json};

fn openai_yaml(url: &str, extra: &str) -> String {
    format!(
        "providers:\n  - name: O\n    type: openai\n    base_url: \"{url}/v1\"\n    auth_type: api_key\n    auth_value: sk-openai-own\n{extra}model_routes:\n  \"*\":\n    - provider: O\n      model: vendor/model-x\n"
    )
}

async fn setup(extra: &str) -> (MockProvider, Balancer) {
    let p = MockProvider::start(Reply::json(
        200,
        &openai_completion(json!({"role":"assistant","content":"hello"}), "stop"),
    ))
    .await
    .unwrap();
    let bal = Balancer::start(&openai_yaml(&p.url(), extra)).await;
    (p, bal)
}

fn tool_turn_body(stream: bool) -> Value {
    json!({
        "model": "claude-sonnet-4-6", "max_tokens": 32000, "stream": stream,
        "system": [{"type":"text","text":"x-anthropic-billing-header: cc_version=2.1.197"},{"type":"text","text":"You are Claude Code."}],
        "tools": [{"name":"Bash","description":"Run","input_schema":{"type":"object","properties":{"command":{"type":"string"}}}}],
        "messages": [
            {"role":"user","content":"list"},
            {"role":"assistant","content":[{"type":"tool_use","id":"call_1","name":"Bash","input":{"command":"ls"}}]},
            {"role":"user","content":[{"type":"text","text":"<system-reminder>x</system-reminder>"},{"type":"tool_result","tool_use_id":"call_1","content":"a.txt"}]}
        ]
    })
}

#[tokio::test]
async fn non_streaming_text_with_model_mapping_and_credentials() {
    let (p, bal) = setup("").await;
    let resp = bal
        .post_with(
            "/v1/messages?beta=true",
            &request(false),
            &[("x-api-key", "sk-client")],
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "O");
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["model"], "claude-sonnet-4-6");
    assert_eq!(m["content"], json!([{"type":"text","text":"hello"}]));
    assert_eq!(m["usage"]["input_tokens"], 20);
    let r = &p.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some("Bearer sk-openai-own"));
    assert_eq!(r.header("x-api-key"), None);
    let sent = r.json();
    assert_eq!(sent["model"], "vendor/model-x");
    assert_eq!(
        sent["messages"][0],
        json!({"role":"user","content":"hello"})
    );
}

#[tokio::test]
async fn a_tool_round_trip_streams_valid_anthropic_events() {
    let (p, bal) = setup("").await;
    let chunks = vec![
        openai_chunk(json!({"role":"assistant","content":"Running it."}), None),
        openai_chunk(
            json!({"tool_calls":[{"index":0,"id":"call_2","type":"function","function":{"name":"Bash","arguments":"{\"command\":"}}]}),
            None,
        ),
        openai_chunk(
            json!({"tool_calls":[{"index":0,"function":{"arguments":"\"cat a.txt\"}"}},{"index":1,"id":"call_3","function":{"name":"Bash","arguments":"{\"command\":\"pwd\"}"}}]}),
            None,
        ),
        openai_chunk(json!({}), Some("tool_calls")),
        json!({"id":"x","choices":[],"usage":{"prompt_tokens":300,"completion_tokens":40,"prompt_tokens_details":{"cached_tokens":200}}}),
    ];
    p.push(Reply::sse(&openai_sse(&chunks, true)));
    let resp = bal.post("/v1/messages", &tool_turn_body(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    let text = resp.text().await.unwrap();
    let m = accumulate_sse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(m["stop_reason"], "tool_use");
    assert_eq!(m["content"][0]["text"], "Running it.");
    assert_eq!(m["content"][1]["input"], json!({"command":"cat a.txt"}));
    assert_eq!(m["content"][2]["input"], json!({"command":"pwd"}));
    assert_eq!(
        m["usage"],
        json!({"input_tokens":100,"cache_creation_input_tokens":0,"cache_read_input_tokens":200,"output_tokens":40})
    );
    // What went upstream: tool message right after the call, user text after it, no attribution.
    let sent = p.requests()[0].json();
    let msgs = sent["messages"].as_array().unwrap();
    assert_eq!(
        msgs[0],
        json!({"role":"system","content":"You are Claude Code."})
    );
    assert_eq!(msgs[2]["tool_calls"][0]["id"], "call_1");
    assert_eq!(
        msgs[3],
        json!({"role":"tool","tool_call_id":"call_1","content":"a.txt"})
    );
    assert_eq!(msgs[4]["role"], "user");
    assert_eq!(sent["stream"], true);
    assert_eq!(sent["stream_options"]["include_usage"], true);
}

#[tokio::test]
async fn reasoning_becomes_signed_thinking() {
    let (p, bal) = setup("").await;
    p.push(Reply::sse(&openai_sse(
        &[
            openai_chunk(json!({"reasoning_content":"Let me think."}), None),
            openai_chunk(json!({"content":"Done."}), None),
            openai_chunk(json!({}), Some("stop")),
        ],
        true,
    )));
    let mut body = request(true);
    body["thinking"] = json!({"type":"adaptive"});
    let text = bal.post("/v1/messages", &body).await.text().await.unwrap();
    let m = accumulate_sse(&text).unwrap();
    assert_eq!(m["content"][0]["type"], "thinking");
    assert_eq!(m["content"][0]["thinking"], "Let me think.");
    assert!(
        m["content"][0]["signature"]
            .as_str()
            .unwrap()
            .starts_with("gw1.")
    );
    assert_eq!(m["content"][1]["text"], "Done.");
}

#[tokio::test]
async fn an_error_before_the_first_chunk_fails_over_and_after_it_ends_with_an_error_event() {
    let o = MockProvider::start(Reply::sse(&openai_sse(
        &[json!({"error":{"message":"No available providers","code":503}})],
        false,
    )))
    .await
    .unwrap();
    let b = MockProvider::start(Reply::message_stream("m", "from B"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - {{name: O, type: openai, base_url: \"{}/v1\", auth_type: api_key, auth_value: k}}\n{}model_routes:\n  \"*\":\n    - {{provider: O, model: x, priority: 1}}\n    - {{provider: B, model: passthrough, priority: 2}}\n",
        o.url(),
        provider_yaml("B", &b.url())
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert!(accumulate_sse(&resp.text().await.unwrap()).is_ok());
    assert_eq!(bal.provider("O").await["state"], "cooling_down");

    // After commit: a cut stream ends with one error event and no fake message_stop.
    let (p, bal) = setup("").await;
    let body = openai_sse(&[openai_chunk(json!({"content":"partial"}), None)], false);
    p.push(Reply::sse_chunks(
        vec![(Duration::ZERO, body.into_bytes())],
        End::Cut,
    ));
    let text = bal
        .post("/v1/messages", &request(true))
        .await
        .text()
        .await
        .unwrap();
    let ev = events(&text);
    assert_eq!(names(&ev).first(), Some(&"message_start"));
    assert_eq!(names(&ev).last(), Some(&"error"), "{text}");
    assert!(!text.contains("message_stop"));
}

#[tokio::test]
async fn errors_are_mapped_to_anthropic_statuses_and_wording() {
    let (p, bal) = setup("").await;
    p.push(Reply::json(400, &json!({"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 140000 tokens.","type":"invalid_request_error","code":"context_length_exceeded"}})));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v,
        json!({"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 140000 tokens > 128000 maximum"}})
    );

    // The provider refusing our key: a provider fault, and never a 401 to the client.
    p.push(Reply::json(
        401,
        &json!({"error":{"message":"Incorrect API key provided","type":"invalid_request_error"}}),
    ));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");

    // A 401 made a client fault by configuration is still mapped away from 401.
    let (p, bal) = setup("").await;
    let yaml = openai_yaml(&p.url(), "") + "settings:\n  unhealthy_http_codes: [500]\n";
    bal.write_config(&yaml);
    bal.client
        .post(format!("{}/providers/reload", bal.url))
        .send()
        .await
        .unwrap();
    p.push(Reply::json(401, &json!({"error":{"message":"bad key"}})));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 502);
    p.push(Reply::json(422, &json!({"error":{"message":"bad schema"}})));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["message"], "upstream (O): bad schema");
}

#[tokio::test]
async fn a_server_tool_gets_a_clear_400_unless_another_candidate_can_serve_it() {
    let (p, bal) = setup("").await;
    let mut body = request(false);
    body["tools"] = json!([{"type":"web_search_20250305","name":"web_search","max_uses":5}]);
    let resp = bal.post("/v1/messages", &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"].as_str().unwrap().contains("tools[0]"),
        "{v}"
    );
    assert_eq!(p.request_count(), 0);
    assert_eq!(bal.provider("O").await["failures"], 0);

    let o = MockProvider::start(Reply::message("m", "unused"))
        .await
        .unwrap();
    let a = MockProvider::start(Reply::message("m", "searched"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - {{name: O, type: openai, base_url: \"{}/v1\", auth_type: api_key, auth_value: k}}\n{}model_routes:\n  \"*\":\n    - {{provider: O, model: x, priority: 1}}\n    - {{provider: A, model: passthrough, priority: 2}}\n",
        o.url(),
        provider_yaml("A", &a.url())
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal.post("/v1/messages", &body).await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
}

#[tokio::test]
async fn max_tokens_is_clamped_and_the_dialect_shapes_the_request() {
    let (p, bal) = setup("    max_tokens_cap: 8192\n    dialect: deepseek\n").await;
    let mut body = request(false);
    body["max_tokens"] = json!(64000);
    body["thinking"] = json!({"type":"enabled","budget_tokens":20000});
    bal.post("/v1/messages", &body).await;
    let sent = p.requests()[0].json();
    assert_eq!(sent["max_tokens"], 8192);
    assert_eq!(sent["thinking"], json!({"type":"enabled"}));
    assert_eq!(sent["reasoning_effort"], "high");
}

#[tokio::test]
async fn gateway_signed_thinking_is_stripped_before_an_anthropic_provider() {
    let a = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("A", &a.url(), 1)], "")).await;
    let sig = claude_balancer::adapter::ids::thinking_signature("earlier");
    let body = json!({"model":"claude-sonnet-4-6","max_tokens":10,"messages":[
        {"role":"user","content":"q"},
        {"role":"assistant","content":[{"type":"thinking","thinking":"earlier","signature":sig},{"type":"text","text":"answer"}]},
        {"role":"user","content":"next"}]});
    assert_eq!(bal.post("/v1/messages", &body).await.status(), 200);
    let sent = a.requests()[0].json();
    assert_eq!(
        sent["messages"][1]["content"],
        json!([{"type":"text","text":"answer"}])
    );
}

#[tokio::test]
async fn a_non_streaming_200_with_an_error_or_garbage_fails_over() {
    let o = MockProvider::start(Reply::json(
        200,
        &json!({"error":{"message":"upstream overloaded"}}),
    ))
    .await
    .unwrap();
    let o2 = MockProvider::start(Reply::Full {
        status: 200,
        headers: vec![],
        body: b"<html>oops</html>".to_vec(),
        delay: Duration::ZERO,
    })
    .await
    .unwrap();
    let b = MockProvider::start(Reply::message("m", "from B"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - {{name: O, type: openai, base_url: \"{}/v1\", auth_type: api_key, auth_value: k}}\n  - {{name: O2, type: openai, base_url: \"{}/v1\", auth_type: api_key, auth_value: k}}\n{}model_routes:\n  \"*\":\n    - {{provider: O, model: x, priority: 1}}\n    - {{provider: O2, model: x, priority: 2}}\n    - {{provider: B, model: passthrough, priority: 3}}\n",
        o.url(),
        o2.url(),
        provider_yaml("B", &b.url())
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(o.request_count() + o2.request_count(), 2);
}

/// A converted stream whose chunks all arrive in one read ends with `message_stop` and nothing
/// after it, and the provider stays healthy.
#[tokio::test]
async fn a_converted_stream_that_arrives_in_one_read_ends_cleanly() {
    let chunks = vec![
        openai_chunk(json!({"role": "assistant", "content": "Hi"}), None),
        openai_chunk(json!({"content": " there"}), Some("stop")),
    ];
    let body = openai_sse(&chunks, true);
    let p = MockProvider::start(Reply::sse_chunks(
        vec![(Duration::ZERO, body.into_bytes())],
        End::Hang,
    ))
    .await
    .unwrap();
    let bal = Balancer::start(&openai_yaml(&p.url(), "")).await;
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.status(), 200);
    let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
        .await
        .expect("the stream never ended")
        .unwrap();
    let names: Vec<String> = events(&text).into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names.last().map(String::as_str),
        Some("message_stop"),
        "{text}"
    );
    assert!(!names.iter().any(|n| n == "error"), "{text}");
    assert_eq!(bal.provider("O").await["consecutive_failures"], 0);
}
