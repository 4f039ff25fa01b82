//! count_tokens: forwarded to anthropic providers of the route, else counted locally; never 0.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use common::*;
use serde_json::{Value, json};

fn count_body() -> Value {
    json!({
        "model": "claude-sonnet-4-6",
        "system": [{"type": "text", "text": "You are Claude Code."}],
        "messages": [{"role": "user", "content": "count these words please"}],
        "tools": [{"name": "Bash", "description": "Run a command", "input_schema": {"type": "object"}}]
    })
}

#[tokio::test]
async fn forwarded_to_the_provider_with_the_mapped_model() {
    let p = MockProvider::start(Reply::json(200, &json!({"input_tokens": 4321})))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n{}model_routes:\n  \"*\":\n    - {{provider: P, model: upstream-name}}\n",
        provider_yaml("P", &p.url())
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal
        .client
        .post(format!("{}/v1/messages/count_tokens?beta=true", bal.url))
        .header("anthropic-beta", "token-counting-2024-11-01")
        .json(&count_body())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "P");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["input_tokens"], 4321);
    let r = &p.requests()[0];
    assert_eq!(r.path, "/v1/messages/count_tokens?beta=true");
    assert_eq!(r.json()["model"], "upstream-name");
    assert_eq!(
        r.header("anthropic-beta"),
        Some("token-counting-2024-11-01")
    );
    assert_eq!(r.header("x-api-key"), Some("key-P"));
}

#[tokio::test]
async fn fails_over_then_counts_locally_without_hurting_chat_health() {
    let a = MockProvider::start(Reply::error(404, "not_found_error", "no such endpoint"))
        .await
        .unwrap();
    let b = MockProvider::start(Reply::json(200, &json!({"input_tokens": 0})))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("A", &a.url(), 1), ("B", &b.url(), 2)], "")).await;
    let resp = bal.post("/v1/messages/count_tokens", &count_body()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-token-count"], "local");
    let v: Value = resp.json().await.unwrap();
    let n = v["input_tokens"].as_u64().unwrap();
    assert!((10..200).contains(&n), "{n}");
    assert_eq!(a.request_count(), 1);
    assert_eq!(b.request_count(), 1, "a count of 0 is not an answer");
    // A relay without count_tokens keeps its chat traffic.
    assert_eq!(bal.provider("A").await["state"], "healthy");
}

#[tokio::test]
async fn repeated_failures_stop_asking_the_provider() {
    let a = MockProvider::start(Reply::error(404, "not_found_error", "no"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  token_counting:\n    failure_threshold: 2\n",
    ))
    .await;
    for _ in 0..4 {
        assert_eq!(
            bal.post("/v1/messages/count_tokens", &count_body())
                .await
                .status(),
            200
        );
    }
    assert_eq!(a.request_count(), 2);
}

#[tokio::test]
async fn always_use_local_never_asks() {
    let a = MockProvider::start(Reply::json(200, &json!({"input_tokens": 5})))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  token_counting:\n    always_use_local: true\n",
    ))
    .await;
    let v: Value = bal
        .post("/v1/messages/count_tokens", &count_body())
        .await
        .json()
        .await
        .unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 5);
    assert_eq!(a.request_count(), 0);
}

#[tokio::test]
async fn openai_only_routes_and_unknown_models_count_locally() {
    let o = MockProvider::start(Reply::json(200, &json!({"input_tokens": 5})))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - {{name: O, type: openai, base_url: \"{}/v1\", auth_type: api_key, auth_value: k}}\nmodel_routes:\n  \"*gpt*\":\n    - {{provider: O, model: passthrough}}\n",
        o.url()
    );
    let bal = Balancer::start(&yaml).await;
    let mut body = count_body();
    body["model"] = json!("gpt-4o");
    let resp = bal.post("/v1/messages/count_tokens", &body).await;
    assert_eq!(resp.headers()["x-token-count"], "local");
    body["model"] = json!("unrouted-model");
    let resp = bal.post("/v1/messages/count_tokens", &body).await;
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert!(v["input_tokens"].as_u64().unwrap() > 0);
    assert_eq!(o.request_count(), 0);
}

/// count_tokens accepts every body `/v1/messages` accepts (one body check): nesting to the
/// scanner's depth, a lone surrogate escape and a number out of f64 range are counted, not
/// refused, and a large body is counted (off the request threads, the exact part bounded).
#[tokio::test]
async fn the_local_count_accepts_what_messages_accepts() {
    let bal = Balancer::start(
        "providers: []\nmodel_routes: {}\nsettings:\n  token_counting:\n    always_use_local: true\n",
    )
    .await;
    let post = |body: String| {
        bal.client
            .post(format!("{}/v1/messages/count_tokens", bal.url))
            .header("content-type", "application/json")
            .body(body)
            .send()
    };
    let deep = format!(
        "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":\"hi\"}}],\"metadata\":{{\"x\":{}1{}}}}}",
        "[".repeat(126),
        "]".repeat(126)
    );
    assert!(
        serde_json::from_str::<Value>(&deep).is_err(),
        "deeper than serde_json goes"
    );
    let surrogate =
        r#"{"model":"m","messages":[{"role":"user","content":"a \ud800 b"}]}"#.to_owned();
    let huge = r#"{"model":"m","temperature":1e400,"messages":[{"role":"user","content":"hi"}]}"#
        .to_owned();
    let big = serde_json::to_string(&json!({
        "model": "m",
        "messages": [{"role": "user", "content": "word ".repeat(2 * 1024 * 1024)}]
    }))
    .unwrap();
    for (name, body) in [
        ("deep", deep),
        ("surrogate", surrogate),
        ("huge number", huge),
        ("10 MB", big),
    ] {
        let resp = post(body).await.unwrap();
        assert_eq!(resp.status(), 200, "{name}");
        assert_eq!(resp.headers()["x-token-count"], "local");
        let v: Value = resp.json().await.unwrap();
        assert!(v["input_tokens"].as_u64().unwrap() > 0, "{name}: {v}");
    }
}
