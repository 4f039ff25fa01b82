//! The OpenAI Chat Completions front end (`POST /v1/chat/completions`) through the whole
//! balancer: converted to anthropic-type providers, forwarded as it is to openai-type ones.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::adapter::chat::stream::reassemble;
use common::*;
use serde_json::{Value, json};

/// Providers `Anth` (anthropic type) and `Oai` (openai type), each with its own route, and a
/// route `both` where `Anth` fails over to `Oai`.
fn yaml(anth: &str, oai: &str, extra: &str) -> String {
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
  both:
    - provider: Anth
      model: passthrough
      priority: 1
    - provider: Oai
      model: passthrough
      priority: 2
{extra}"
    )
}

async fn setup(extra: &str) -> (MockProvider, MockProvider, Balancer) {
    let anth = MockProvider::start(Reply::Model).await.unwrap();
    let oai = MockProvider::start(Reply::Model).await.unwrap();
    let bal = Balancer::start(&yaml(&anth.url(), &oai.url(), extra)).await;
    (anth, oai, bal)
}

fn chat(model: &str, prompt: &str, stream: bool) -> Value {
    let mut v = json!({"model": model, "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": prompt}]});
    if stream {
        v["stream"] = json!(true);
        v["stream_options"] = json!({"include_usage": true});
    }
    v
}

async fn post(bal: &Balancer, body: &Value) -> (u16, http::HeaderMap, String) {
    let resp = bal.post("/v1/chat/completions", body).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.text().await.unwrap())
}

#[tokio::test]
async fn an_anthropic_provider_answers_in_chat_completions_form() {
    let (anth, _oai, bal) = setup("").await;
    let (status, headers, text) = post(&bal, &chat("claude-x", "say hi", false)).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(headers["x-provider-used"], "Anth");
    assert!(headers.contains_key("x-request-id"));
    let c: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(c["model"], "claude-x", "the requested name is echoed");
    let m = &c["choices"][0]["message"];
    assert_eq!(m["role"], "assistant");
    assert!(
        m["content"].as_str().unwrap().contains("You said: say hi"),
        "{c}"
    );
    assert_eq!(c["choices"][0]["finish_reason"], "stop");
    assert_eq!(c["usage"]["prompt_tokens"], 25);
    assert!(c["usage"]["completion_tokens"].as_u64().unwrap() > 0);
    // What the provider got: an Anthropic request, the system prompt apart.
    let sent = anth.requests()[0].json();
    assert_eq!(anth.requests()[0].path, "/v1/messages");
    assert_eq!(anth.requests()[0].header("x-api-key"), Some("key-anth"));
    assert_eq!(sent["model"], "claude-upstream-1");
    assert_eq!(sent["system"][0]["text"], "You are terse.");
    assert_eq!(sent["messages"][0]["content"][0]["text"], "say hi");
    assert!(sent["max_tokens"].as_u64().unwrap() > 0);
}

#[tokio::test]
async fn a_streamed_answer_reassembles_to_the_non_streaming_one() {
    let (_anth, _oai, bal) = setup("").await;
    let prompt = "think, then use the tool read {\"path\":\"a.py\"}";
    let (status, headers, text) = post(&bal, &chat("claude-x", prompt, true)).await;
    assert_eq!(status, 200, "{text}");
    assert!(
        headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    let streamed = reassemble(text.as_bytes()).unwrap();
    let (_, _, whole) = post(&bal, &chat("claude-x", prompt, false)).await;
    let whole: Value = serde_json::from_str(&whole).unwrap();
    let want = &whole["choices"][0]["message"];
    assert_eq!(streamed["message"]["content"], want["content"]);
    assert_eq!(
        streamed["message"]["reasoning_content"],
        want["reasoning_content"]
    );
    assert_eq!(streamed["message"]["tool_calls"], want["tool_calls"]);
    assert_eq!(streamed["finish_reason"], "tool_calls");
    assert_eq!(streamed["usage"], whole["usage"]);
    assert_eq!(streamed["model"], "claude-x");
    let call = &want["tool_calls"][0];
    assert_eq!(call["function"]["name"], "read");
    assert_eq!(call["function"]["arguments"], "{\"path\":\"a.py\"}");
}

#[tokio::test]
async fn a_tool_loop_of_two_turns_reaches_the_anthropic_provider_as_tool_use_and_result() {
    let (anth, _oai, bal) = setup("").await;
    let tools = json!([{"type": "function", "function": {"name": "shell", "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}}}}]);
    let mut first = chat("claude-x", "use the tool shell {\"cmd\":\"ls\"}", false);
    first["tools"] = tools.clone();
    let (_, _, text) = post(&bal, &first).await;
    let c: Value = serde_json::from_str(&text).unwrap();
    let call = c["choices"][0]["message"]["tool_calls"][0].clone();
    assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
    let mut second = first.clone();
    let msgs = second["messages"].as_array_mut().unwrap();
    msgs.push(json!({"role": "assistant", "content": null, "tool_calls": [call.clone()]}));
    msgs.push(json!({"role": "tool", "tool_call_id": call["id"], "content": "a.txt b.txt"}));
    let (status, _, text) = post(&bal, &second).await;
    assert_eq!(status, 200, "{text}");
    let c: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        c["choices"][0]["message"]["content"],
        "The tool said: a.txt b.txt"
    );
    let sent = anth.requests()[1].json();
    let m = sent["messages"].as_array().unwrap();
    assert_eq!(m[1]["content"][0]["type"], "tool_use");
    assert_eq!(m[1]["content"][0]["id"], call["id"]);
    assert_eq!(
        m[2]["content"][0],
        json!({"type": "tool_result", "tool_use_id": call["id"], "content": "a.txt b.txt", "cache_control": {"type": "ephemeral"}})
    );
    assert_eq!(sent["tools"][0]["name"], "shell");
    assert_eq!(
        sent["tools"][0]["input_schema"]["properties"]["cmd"]["type"],
        "string"
    );
}

#[tokio::test]
async fn an_openai_provider_gets_the_clients_own_body_with_only_the_model_replaced() {
    let (_anth, oai, bal) = setup("").await;
    // Key order, spacing and fields the Anthropic form has no place for all survive.
    let raw = r#"{"seed": 7, "model":"gpt-4x",  "messages":[{"role":"user","content":"hi"}], "logit_bias": {"50256": -100}, "stream": false}"#;
    let resp = bal
        .client
        .post(format!("{}/v1/chat/completions", bal.url))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "Oai");
    let c: Value = resp.json().await.unwrap();
    assert_eq!(
        c["id"], "chatcmpl-mock",
        "the provider's answer, as it wrote it"
    );
    let r = &oai.requests()[0];
    assert_eq!(r.path, "/v1/chat/completions");
    assert_eq!(r.header("authorization"), Some("Bearer key-oai"));
    assert_eq!(
        String::from_utf8(r.body.clone()).unwrap(),
        raw.replace("\"gpt-4x\"", "\"vendor/gpt-upstream\"")
    );

    // Streamed: the chunks as the provider wrote them, ending with [DONE].
    let (status, _, text) = post(&bal, &chat("gpt-4x", "stream please", true)).await;
    assert_eq!(status, 200);
    let streamed = reassemble(text.as_bytes()).unwrap();
    assert!(
        streamed["message"]["content"]
            .as_str()
            .unwrap()
            .contains("stream please")
    );
    assert_eq!(streamed["id"], "chatcmpl-mock");
    let sent = oai.requests()[1].json();
    assert_eq!(sent["stream_options"], json!({"include_usage": true}));
    assert_eq!(sent["messages"][0]["role"], "system", "not converted");
}

#[tokio::test]
async fn failover_before_the_first_byte_works_across_provider_types() {
    let (anth, oai, bal) = setup("").await;
    anth.set_default(Reply::error(529, "overloaded_error", "Overloaded"));
    for stream in [false, true] {
        let (status, headers, text) = post(&bal, &chat("both", "hello there", stream)).await;
        assert_eq!(status, 200, "{text}");
        assert_eq!(headers["x-provider-used"], "Oai");
        let content = if stream {
            reassemble(text.as_bytes()).unwrap()["message"]["content"].clone()
        } else {
            serde_json::from_str::<Value>(&text).unwrap()["choices"][0]["message"]["content"]
                .clone()
        };
        assert!(content.as_str().unwrap().contains("hello there"), "{text}");
    }
    assert_eq!(oai.request_count(), 2);
    // The failed provider's health counts the fault as for any request.
    let a = bal.provider("Anth").await;
    assert!(
        a["consecutive_failures"].as_u64().unwrap_or(0) >= 1 || a["state"] != "healthy",
        "{a}"
    );
}

#[tokio::test]
async fn errors_take_openais_shape_and_statuses() {
    let (anth, oai, bal) = setup("").await;
    // No route.
    let (status, _, text) = post(&bal, &chat("nothing-matches", "x", false)).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 404);
    assert_eq!(e["error"]["code"], "model_not_found");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nothing-matches")
    );
    // What cannot be expressed.
    let mut two = chat("claude-x", "x", false);
    two["n"] = json!(2);
    let (status, _, text) = post(&bal, &two).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (status, e["error"]["param"].as_str()),
        (400, Some("n")),
        "{text}"
    );
    assert_eq!(e["error"]["type"], "invalid_request_error");
    // Not JSON.
    let resp = bal
        .client
        .post(format!("{}/v1/chat/completions", bal.url))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().await.unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not valid JSON")
    );
    // Every provider rate-limited: 429 with retry-after, as OpenAI answers it.
    anth.set_default(
        Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after", "7"),
    );
    oai.set_default(
        Reply::json(
            429,
            &json!({"error": {"message": "slow down", "type": "rate_limit_error"}}),
        )
        .with_header("retry-after", "7"),
    );
    let (status, headers, text) = post(&bal, &chat("both", "x", false)).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 429, "{text}");
    assert_eq!(e["error"]["type"], "rate_limit_error");
    assert_eq!(e["error"]["code"], "rate_limit_exceeded");
    assert_eq!(headers["retry-after"], "7");
    // A context overflow from an openai-type provider reads as one.
    oai.set_default(Reply::json(400, &json!({"error": {"message": "This model's maximum context length is 128000 tokens. However, your messages resulted in 130000 tokens.", "code": "context_length_exceeded"}})));
    let (status, _, text) = post(&bal, &chat("gpt-4x", "x", false)).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(status, 400);
    assert_eq!(e["error"]["code"], "context_length_exceeded", "{text}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prompt is too long: 130000 tokens > 128000 maximum")
    );
}

#[tokio::test]
async fn a_stream_cut_after_the_first_byte_ends_with_one_error_chunk() {
    for kind in ["claude-x", "gpt-4x"] {
        let (anth, oai, bal) = setup("").await;
        anth.set_default(Reply::ModelCut(4));
        oai.set_default(Reply::ModelCut(3));
        let (status, _, text) = post(&bal, &chat(kind, "a longer answer to cut short", true)).await;
        assert_eq!(status, 200, "{kind}: {text}");
        let last = text.trim_end().rsplit("\n\n").next().unwrap();
        let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
        assert_eq!(v["error"]["type"], "server_error", "{kind}: {text}");
        assert!(!text.contains("[DONE]"), "{kind}: {text}");
        assert!(reassemble(text.as_bytes()).is_err());
    }
}

#[tokio::test]
async fn named_clients_use_bearer_keys_limits_and_model_lists_on_this_front_too() {
    let clients = "clients:\n  - name: alice\n    key: alice-key\n    models: [\"claude-*\"]\n  - name: bob\n    key: bob-key\n    limits:\n      requests_per_minute: 1\n";
    let (_anth, _oai, bal) = setup(clients).await;
    let send = |key: Option<&'static str>, model: &'static str| {
        let mut req = bal
            .client
            .post(format!("{}/v1/chat/completions", bal.url))
            .json(&chat(model, "x", false));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, e) = send(None, "claude-x").await;
    assert_eq!(status, 401);
    assert_eq!(e["error"]["code"], "invalid_api_key", "{e}");
    assert_eq!(send(Some("alice-key"), "claude-x").await.0, 200);
    let (status, e) = send(Some("alice-key"), "gpt-4x").await;
    assert_eq!(status, 403);
    assert_eq!(e["error"]["type"], "permission_error");
    assert_eq!(send(Some("bob-key"), "gpt-4x").await.0, 200);
    let (status, e) = send(Some("bob-key"), "gpt-4x").await;
    assert_eq!(status, 429);
    assert_eq!(e["error"]["type"], "rate_limit_error");
}

#[tokio::test]
async fn usage_is_accounted_and_metrics_name_the_front() {
    let (_anth, _oai, bal) = setup("").await;
    post(&bal, &chat("claude-x", "one", true)).await;
    post(&bal, &chat("gpt-4x", "two", true)).await;
    post(&bal, &chat("gpt-4x", "three", false)).await;
    let metrics = bal.get_text("/metrics").await;
    for provider in ["Anth", "Oai"] {
        assert!(
            metrics.contains(&format!(
                "provider=\"{provider}\",status=\"200\",front=\"openai_chat\""
            )),
            "{metrics}"
        );
    }
    // Tokens read from both wire formats: 3 requests × 25 prompt tokens.
    let input = |provider: &str| -> f64 {
        let label =
            format!("claude_balancer_tokens_total{{provider=\"{provider}\",kind=\"input\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(label.as_str()))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0.0)
    };
    assert_eq!((input("Anth"), input("Oai")), (25.0, 50.0), "{metrics}");
}

#[tokio::test]
async fn identical_requests_in_flight_share_one_upstream_call() {
    let (anth, oai, bal) = setup("settings:\n  deduplication:\n    enabled: true\n").await;
    for p in [&anth, &oai] {
        p.set_latency(Duration::from_millis(400), Duration::ZERO);
    }
    for model in ["claude-x", "gpt-4x"] {
        let body = chat(model, "same words", true);
        let (a, b) = tokio::join!(post(&bal, &body), post(&bal, &body));
        assert_eq!(a.0, 200);
        assert_eq!(b.0, 200);
        let (ra, rb) = (
            reassemble(a.2.as_bytes()).unwrap(),
            reassemble(b.2.as_bytes()).unwrap(),
        );
        assert_eq!(ra["message"], rb["message"]);
    }
    assert_eq!(anth.request_count(), 1);
    assert_eq!(oai.request_count(), 1);
}

#[tokio::test]
async fn the_fast_path_forwards_what_only_conversion_would_refuse() {
    let (_anth, oai, bal) = setup("").await;
    // n = 2 is the provider's to serve: nothing is converted on the way.
    let mut two = chat("gpt-4x", "x", false);
    two["n"] = json!(2);
    let (status, _, text) = post(&bal, &two).await;
    assert_eq!(status, 200, "{text}");
    assert_eq!(oai.requests()[0].json()["n"], 2);
    // Failing over to an anthropic-type candidate that cannot take it: skipped, and the 400 names
    // the parameter.
    oai.set_default(Reply::error(529, "overloaded_error", "busy"));
    let mut both = chat("both", "x", false);
    both["n"] = json!(2);
    let (status, _, text) = post(&bal, &both).await;
    let e: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        status, 503,
        "the openai-type provider's fault decides: {text}"
    );
    assert_eq!(e["error"]["type"], "server_error");
}

#[tokio::test]
async fn a_streaming_and_a_plain_request_alike_are_not_coalesced_into_one_form() {
    let (_anth, oai, bal) = setup("settings:\n  deduplication:\n    enabled: true\n").await;
    oai.set_latency(Duration::from_millis(300), Duration::ZERO);
    // Alike but for `stream` (which the signature leaves out).
    let b = chat("gpt-4x", "same", false);
    let mut a = b.clone();
    a["stream"] = json!(true);
    let (streamed, plain) = tokio::join!(post(&bal, &a), post(&bal, &b));
    assert_eq!((streamed.0, plain.0), (200, 200));
    assert!(reassemble(streamed.2.as_bytes()).is_ok(), "{}", streamed.2);
    let c: Value = serde_json::from_str(&plain.2).unwrap();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(oai.request_count(), 2);
}

#[tokio::test]
async fn the_cache_serves_fast_path_answers_again_in_their_own_form() {
    let (_anth, oai, bal) =
        setup("settings:\n  max_cache_size: 10\n  cache_ttl_seconds: 60\n").await;
    for stream in [false, true] {
        let body = chat("gpt-4x", "cache me", stream);
        let (s1, h1, first) = post(&bal, &body).await;
        let (s2, h2, again) = post(&bal, &body).await;
        assert_eq!((s1, s2), (200, 200));
        assert_eq!(h1["x-balancer-cache"], "miss");
        assert_eq!(h2["x-balancer-cache"], "hit", "stream {stream}");
        assert_eq!(first, again, "the provider's own answer, again");
    }
    assert_eq!(oai.request_count(), 2, "one call per form");
    // A stream that failed is not kept.
    oai.set_default(Reply::ModelCut(3));
    let body = chat("gpt-4x", "cut me short", true);
    post(&bal, &body).await;
    oai.set_default(Reply::Model);
    let (_, headers, text) = post(&bal, &body).await;
    assert_eq!(headers["x-balancer-cache"], "miss");
    assert!(reassemble(text.as_bytes()).is_ok());
}

#[tokio::test(start_paused = true)]
async fn silence_in_a_fast_path_stream_gets_comments_not_anthropic_pings() {
    let (_anth, oai, bal) =
        setup("settings:\n  timeouts:\n    streaming:\n      read_timeout: 40\n").await;
    let first = mock_provider::openai_sse(
        &[mock_provider::openai_chunk(
            json!({"role": "assistant", "content": ""}),
            None,
        )],
        false,
    );
    oai.push(Reply::sse_chunks(
        vec![(Duration::ZERO, first.into_bytes())],
        End::Hang,
    ));
    let (status, _, text) = post(&bal, &chat("gpt-4x", "x", true)).await;
    assert_eq!(status, 200);
    assert!(!text.contains("\"ping\""), "{text}");
    assert_eq!(text.matches(": ping\n\n").count(), 2, "{text}");
    let last = text.trim_end().rsplit("\n\n").next().unwrap();
    assert!(last.contains("read_timeout"), "{text}");
}

#[tokio::test]
async fn the_cache_keeps_converted_streams_too() {
    let (anth, _oai, bal) =
        setup("settings:\n  max_cache_size: 10\n  cache_ttl_seconds: 60\n").await;
    let body = chat("claude-x", "stream and cache", true);
    let (_, h1, first) = post(&bal, &body).await;
    let (_, h2, again) = post(&bal, &body).await;
    assert_eq!(h1["x-balancer-cache"], "miss");
    assert_eq!(h2["x-balancer-cache"], "hit", "{again}");
    assert_eq!(anth.request_count(), 1);
    let (a, b) = (
        reassemble(first.as_bytes()).unwrap(),
        reassemble(again.as_bytes()).unwrap(),
    );
    assert_eq!(a["message"], b["message"]);
}

#[tokio::test]
async fn a_key_in_a_fast_path_streams_last_unterminated_error_is_masked() {
    let (_anth, oai, bal) = setup("").await;
    let first = mock_provider::openai_sse(
        &[mock_provider::openai_chunk(
            json!({"role": "assistant", "content": "hi"}),
            None,
        )],
        false,
    );
    let error = "data: {\"error\":{\"message\":\"invalid key key-oai\"}}";
    oai.push(Reply::sse_chunks(
        vec![
            (Duration::ZERO, first.into_bytes()),
            (Duration::ZERO, error.as_bytes().to_vec()),
        ],
        End::Complete,
    ));
    let (status, _, text) = post(&bal, &chat("gpt-4x", "x", true)).await;
    assert_eq!(status, 200);
    assert!(!text.contains("key-oai"), "{text}");
    assert!(text.contains("invalid key"), "{text}");
}

#[tokio::test]
async fn a_fast_path_stream_is_accounted_even_when_its_client_asks_no_usage() {
    let (_anth, oai, bal) = setup("").await;
    let body = json!({"model": "gpt-4x", "stream": true, "messages": [{"role": "user", "content": "count me"}]});
    let (status, _, text) = post(&bal, &body).await;
    assert_eq!(status, 200);
    // The provider was asked for usage; the client, which did not ask, gets no usage chunk.
    let sent = String::from_utf8(oai.requests()[0].body.clone()).unwrap();
    assert!(
        sent.ends_with(",\"stream_options\":{\"include_usage\":true}}"),
        "{sent}"
    );
    assert!(!text.contains("\"usage\""), "{text}");
    let r = reassemble(text.as_bytes()).unwrap();
    assert!(
        r["message"]["content"]
            .as_str()
            .unwrap()
            .contains("count me")
    );
    let metrics = bal.get_text("/metrics").await;
    assert!(
        metrics.contains("claude_balancer_tokens_total{provider=\"Oai\",kind=\"input\"} 25"),
        "{metrics}"
    );
}
