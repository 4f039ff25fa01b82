//! What reaches the provider (URL, headers, credentials, body) and what comes back to the client.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use common::*;
use serde_json::json;

fn yaml_with(auth_type: &str, auth_value: &str, url: &str, model: &str) -> String {
    format!(
        "providers:\n  - name: P\n    type: anthropic\n    base_url: \"{url}\"\n    auth_type: {auth_type}\n    auth_value: \"{auth_value}\"\nmodel_routes:\n  \"*sonnet*\":\n    - provider: P\n      model: \"{model}\"\n"
    )
}

const CLIENT_HEADERS: &[(&str, &str)] = &[
    ("x-api-key", "sk-client-key-123"),
    ("authorization", "Bearer client-token-456"),
    ("anthropic-version", "2023-06-01"),
    (
        "anthropic-beta",
        "claude-code-20250219,interleaved-thinking-2025-05-14",
    ),
    ("x-app", "cli"),
    ("user-agent", "claude-cli/2.1.197 (external, sdk-cli)"),
    ("x-claude-code-session-id", "0b6d-session"),
    ("x-stainless-retry-count", "0"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
];

#[tokio::test]
async fn api_key_provider_gets_its_own_key_and_the_client_headers() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with(
        "api_key",
        "sk-provider-own",
        &p.url(),
        "passthrough",
    ))
    .await;
    let resp = bal
        .client
        .post(format!("{}/v1/messages?beta=true", bal.url))
        .headers({
            let mut h = reqwest::header::HeaderMap::new();
            for (n, v) in CLIENT_HEADERS {
                h.insert(*n, v.parse().unwrap());
            }
            h
        })
        .json(&request(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let r = &p.requests()[0];
    assert_eq!(r.path, "/v1/messages?beta=true");
    assert_eq!(r.header("x-api-key"), Some("sk-provider-own"));
    assert_eq!(r.header("authorization"), None);
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(
        r.header("anthropic-beta"),
        Some("claude-code-20250219,interleaved-thinking-2025-05-14")
    );
    assert_eq!(r.header("x-app"), Some("cli"));
    assert_eq!(
        r.header("user-agent"),
        Some("claude-cli/2.1.197 (external, sdk-cli)")
    );
    assert_eq!(r.header("x-claude-code-session-id"), Some("0b6d-session"));
    assert_eq!(r.header("x-stainless-retry-count"), Some("0"));
    assert_eq!(r.header("accept-encoding"), None);
    let all = format!("{:?}", r.headers);
    assert!(
        !all.contains("sk-client-key-123") && !all.contains("client-token-456"),
        "client credential leaked: {all}"
    );
}

#[tokio::test]
async fn auth_token_provider_gets_a_bearer_token() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with("auth_token", "tok-own", &p.url(), "passthrough")).await;
    bal.post_with(
        "/v1/messages",
        &request(false),
        &[("x-api-key", "sk-client")],
    )
    .await;
    let r = &p.requests()[0];
    assert_eq!(r.header("authorization"), Some("Bearer tok-own"));
    assert_eq!(r.header("x-api-key"), None);
}

#[tokio::test]
async fn passthrough_forwards_the_client_credentials() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with(
        "auth_token",
        "passthrough",
        &p.url(),
        "passthrough",
    ))
    .await;
    bal.post_with(
        "/v1/messages",
        &request(false),
        &[("authorization", "Bearer sk-ant-oat-user")],
    )
    .await;
    assert_eq!(
        p.requests()[0].header("authorization"),
        Some("Bearer sk-ant-oat-user")
    );
    bal.post_with("/v1/messages", &request(false), &[("x-api-key", "sk-user")])
        .await;
    assert_eq!(p.requests()[1].header("x-api-key"), Some("sk-user"));
}

#[tokio::test]
async fn the_model_mapping_replaces_only_the_model() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with("api_key", "k", &p.url(), "vendor/sonnet-x")).await;
    let raw = r#"{"model":"claude-sonnet-4-6","max_tokens":5,"messages":[{"role":"user","content":"hi"}],"metadata":{"user_id":"u"},  "unknown_field": {"kept": [1, 2]}}"#;
    bal.client
        .post(format!("{}/v1/messages", bal.url))
        .header("content-type", "application/json")
        .body(raw)
        .send()
        .await
        .unwrap();
    let sent = String::from_utf8(p.requests()[0].body.clone()).unwrap();
    assert_eq!(sent, raw.replace("claude-sonnet-4-6", "vendor/sonnet-x"));
}

#[tokio::test]
async fn passthrough_model_sends_the_body_byte_for_byte() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with("api_key", "k", &p.url(), "passthrough")).await;
    let raw = "{ \"model\" : \"claude-sonnet-4-6\",\n \"messages\": [ {\"role\":\"user\",\"content\":\"\\u00e9t\u{e9}\"} ] ,\"max_tokens\":1}";
    let resp = bal
        .client
        .post(format!("{}/v1/messages", bal.url))
        .body(raw)
        .send()
        .await
        .unwrap();
    assert_eq!(p.requests()[0].body, raw.as_bytes());
    // A complete answer goes back with its length, as Anthropic sends it, not chunked.
    let length = resp.headers().get("content-length").cloned();
    assert!(resp.headers().get("transfer-encoding").is_none());
    let answer = resp.bytes().await.unwrap();
    assert_eq!(length.unwrap().to_str().unwrap(), answer.len().to_string());
}

#[tokio::test]
async fn provider_response_headers_come_back() {
    let p = MockProvider::start(
        Reply::error(429, "rate_limit_error", "slow")
            .with_header("request-id", "req_011")
            .with_header("retry-after", "3")
            .with_header("anthropic-ratelimit-requests-remaining", "0")
            .with_header("x-internal-secret", "nope"),
    )
    .await
    .unwrap();
    // 429 must reach the client here: make it a client fault for this test.
    let yaml = yaml_with("api_key", "k", &p.url(), "passthrough")
        + "settings:\n  unhealthy_http_codes: [500]\n";
    let bal = Balancer::start(&yaml).await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 429);
    let h = resp.headers();
    assert_eq!(h["request-id"], "req_011");
    assert_eq!(h["retry-after"], "3");
    assert_eq!(h["anthropic-ratelimit-requests-remaining"], "0");
    assert_eq!(h["x-provider-used"], "P");
    assert!(h.get("x-internal-secret").is_none());
}

#[tokio::test]
async fn base_url_ending_in_v1_is_not_doubled() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&yaml_with(
        "api_key",
        "k",
        &format!("{}/v1/", p.url()),
        "passthrough",
    ))
    .await;
    bal.post(
        "/v1/messages",
        &json!({"model":"claude-sonnet-4-6","messages":[]}),
    )
    .await;
    assert_eq!(p.requests()[0].path, "/v1/messages");
}

#[tokio::test]
async fn exact_routes_win_over_globs_and_later_routes_are_fallbacks() {
    let a = MockProvider::start(Reply::message("m", "A")).await.unwrap();
    let b = MockProvider::start(Reply::message("m", "B")).await.unwrap();
    let c = MockProvider::start(Reply::message("m", "C")).await.unwrap();
    let yaml = format!(
        "providers:\n{}{}{}model_routes:\n  \"*sonnet*\":\n    - {{provider: A, model: passthrough}}\n  \"Claude-Sonnet-Special\":\n    - {{provider: B, model: special-upstream}}\n  \"*\":\n    - {{provider: C, model: catch-all}}\n",
        provider_yaml("A", &a.url()),
        provider_yaml("B", &b.url()),
        provider_yaml("C", &c.url())
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal
        .post(
            "/v1/messages",
            &json!({"model":"claude-sonnet-special","messages":[]}),
        )
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(b.requests()[0].json()["model"], "special-upstream");
    let resp = bal
        .post(
            "/v1/messages",
            &json!({"model":"CLAUDE-SONNET-4","messages":[]}),
        )
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
    // A fails: the catch-all route's C is the fallback, with its own mapping.
    a.push(Reply::error(500, "api_error", "x"));
    let resp = bal
        .post(
            "/v1/messages",
            &json!({"model":"claude-sonnet-5","messages":[]}),
        )
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "C");
    assert_eq!(c.requests()[0].json()["model"], "catch-all");
    // No route at all.
    let yaml_no_catch_all = format!(
        "providers:\n{}model_routes:\n  \"*sonnet*\":\n    - {{provider: A, model: passthrough}}\n",
        provider_yaml("A", &a.url())
    );
    let bal = Balancer::start(&yaml_no_catch_all).await;
    let resp = bal
        .post("/v1/messages", &json!({"model":"gpt-4o","messages":[]}))
        .await;
    assert_eq!(resp.status(), 404);
    let v: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "not_found_error");
    assert!(v["error"]["message"].as_str().unwrap().contains("gpt-4o"));
}

#[tokio::test]
async fn an_outbound_proxy_carries_the_request() {
    // The mock stands in for an HTTP proxy: a plain-http request through a proxy arrives in
    // absolute form, naming the provider's real address, which need not resolve from here.
    let proxy = MockProvider::start(Reply::message("m", "via proxy"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - name: P\n    type: anthropic\n    base_url: \"http://provider.invalid/claude\"\n    auth_type: api_key\n    auth_value: k\n    proxy: \"{}\"\nmodel_routes:\n  \"*\":\n    - provider: P\n",
        proxy.url()
    );
    let bal = Balancer::start(&yaml).await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    let r = &proxy.requests()[0];
    assert_eq!(r.path, "http://provider.invalid/claude/v1/messages");
    assert_eq!(r.header("x-api-key"), Some("k"));
}
