//! Admin endpoints, health, reload, and the Anthropic shape of every error the balancer makes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn one_provider(reply: Reply) -> (MockProvider, Balancer) {
    let p = MockProvider::start(reply).await.unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("P", &p.url(), 1)],
        "  failure_cooldown: 60\n",
    ))
    .await;
    (p, bal)
}

fn assert_error_shape(v: &Value, error_type: &str) {
    assert_eq!(v["type"], "error", "{v}");
    assert_eq!(v["error"]["type"], error_type, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v.get("message").is_none(), "no top-level message: {v}");
}

#[tokio::test]
async fn providers_lists_everything_with_secrets_masked() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - name: Keyed\n    type: anthropic\n    base_url: \"{url}\"\n    auth_type: api_key\n    auth_value: \"sk-ant-secret-value-abcd1234\"\n    proxy: \"socks5://user:proxypass@127.0.0.1:1\"\n  - name: \"Off\"\n    type: anthropic\n    base_url: \"{url}\"\n    auth_type: api_key\n    auth_value: \"sk-other-secret-zzzz9999\"\n    enabled: false\n  - name: Empty\n    type: openai\n    base_url: \"{url}/v1\"\n    auth_type: api_key\n    auth_value: \"\"\n  - name: OAuthOne\n    type: anthropic\n    base_url: \"{url}\"\n    auth_type: auth_token\n    auth_value: oauth\nmodel_routes:\n  \"*\":\n    - {{provider: Keyed, model: passthrough}}\n    - {{provider: Empty, model: gpt-x, priority: 2}}\nsettings:\n  selection_strategy: round_robin\n",
        url = p.url()
    );
    let bal = Balancer::start(&yaml).await;
    let (status, v) = bal.get_json("/providers").await;
    assert_eq!(status, 200);
    let text = v.to_string();
    assert!(
        !text.contains("secret-value")
            && !text.contains("abcd1234x")
            && !text.contains("proxypass"),
        "{text}"
    );
    assert!(!text.contains("sk-other-secret"), "{text}");
    assert_eq!(v["total_providers"], 4);
    assert_eq!(v["selection_strategy"], "round_robin");
    assert_eq!(v["total_model_routes"], 1);
    let by_name = |n: &str| {
        v["providers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .unwrap_or_else(|| panic!("{n} missing in {v}"))
            .clone()
    };
    let keyed = by_name("Keyed");
    assert_eq!(keyed["state"], "healthy");
    assert_eq!(keyed["type"], "anthropic");
    assert_eq!(keyed["credentials"]["value"], "****1234");
    assert_eq!(keyed["proxy"], "socks5://****@127.0.0.1:1");
    assert_eq!(by_name("Off")["state"], "disabled");
    assert_eq!(by_name("Empty")["state"], "no_credentials");
    assert_eq!(by_name("OAuthOne")["state"], "disabled");
    assert_eq!(v["healthy_providers"], 2);
    for key in [
        "consecutive_failures",
        "cooldown_remaining_seconds",
        "last_error",
        "last_error_time",
        "requests",
        "failures",
        "avg_ttfb_ms",
        "base_url",
        "enabled",
    ] {
        assert!(keyed.get(key).is_some(), "missing {key}");
    }
}

#[tokio::test]
async fn counters_and_last_error_are_reported() {
    let (p, bal) = one_provider(Reply::message("m", "ok")).await;
    bal.post("/v1/messages", &request(false)).await;
    p.push(Reply::error(503, "api_error", "maintenance"));
    bal.post("/v1/messages", &request(false)).await;
    let pv = bal.provider("P").await;
    assert_eq!(pv["requests"], 2);
    assert_eq!(pv["successes"], 1);
    assert_eq!(pv["failures"], 1);
    assert!(pv["last_error"].as_str().unwrap().contains("maintenance"));
    assert!(pv["last_error_time"].as_str().unwrap().ends_with('Z'));
    assert!(pv["avg_ttfb_ms"].as_f64().is_some());
}

#[tokio::test]
async fn health_is_503_when_no_provider_is_usable() {
    let (p, bal) = one_provider(Reply::message("m", "ok")).await;
    let (status, v) = bal.get_json("/health").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "healthy");
    p.push(Reply::error(500, "api_error", "x"));
    bal.post("/v1/messages", &request(false)).await;
    let (status, v) = bal.get_json("/health").await;
    assert_eq!(status, 503);
    assert_eq!(v["providers"]["cooling_down"], 1);
}

#[tokio::test]
async fn root_names_the_service() {
    let (_p, bal) = one_provider(Reply::message("m", "ok")).await;
    let (status, v) = bal.get_json("/").await;
    assert_eq!(status, 200);
    assert_eq!(v["status"], "running");
    assert!(v["name"].is_string() && v["version"].is_string());
}

#[tokio::test]
async fn reload_swaps_a_valid_file_and_keeps_health() {
    let a = MockProvider::start(Reply::message("m", "A")).await.unwrap();
    let b = MockProvider::start(Reply::message("m", "B")).await.unwrap();
    let bal = Balancer::start(&config_yaml(&[("A", &a.url(), 1), ("B", &b.url(), 2)], "")).await;
    a.push(Reply::error(500, "api_error", "x"));
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.headers()["x-provider-used"],
        "B"
    );
    // Move the route: B first, then A; A's health must survive.
    bal.write_config(&config_yaml(
        &[("B", &b.url(), 1), ("A", &a.url(), 2)],
        "  selection_strategy: round_robin\n",
    ));
    let resp = bal
        .client
        .post(format!("{}/providers/reload", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["status"], "reloaded");
    let (_, pv) = bal.get_json("/providers").await;
    assert_eq!(pv["selection_strategy"], "round_robin");
    let a_state = pv["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "A")
        .unwrap()
        .clone();
    assert_eq!(a_state["failures"], 1);
    assert_eq!(a_state["state"], "cooling_down");
}

#[tokio::test]
async fn reload_refuses_an_invalid_file_and_changes_nothing() {
    let (_p, bal) = one_provider(Reply::message("m", "ok")).await;
    let before = bal.get_json("/providers").await.1;
    bal.write_config(
        "providers:\n  - name: X\n    type: martian\n    base_url: nope\n    auth_type: api_key\n    auth_value: k\nmodel_routes:\n  \"*\":\n    - provider: Y\n",
    );
    let resp = bal
        .client
        .post(format!("{}/providers/reload", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_error_shape(&v, "invalid_request_error");
    let errors: Vec<&str> = v["error"]["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(
        errors.iter().any(|e| e.starts_with("providers[0].type")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("providers[0].base_url")),
        "{errors:?}"
    );
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("model_routes.\"*\"[0].provider")),
        "{errors:?}"
    );
    let mut after = bal.get_json("/providers").await.1;
    after["config_loaded_at"] = before["config_loaded_at"].clone();
    assert_eq!(before, after);
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        200
    );
}

#[tokio::test(start_paused = true)]
async fn a_request_in_flight_survives_a_reload_that_removes_its_provider() {
    let a = MockProvider::start(Reply::message("m", "A")).await.unwrap();
    let b = MockProvider::start(Reply::message("m", "B")).await.unwrap();
    let bal = Balancer::start(&config_yaml(&[("A", &a.url(), 1)], "")).await;
    let parts =
        mock_provider::split_events(&mock_provider::anthropic_stream("m", "slow answer from A"));
    let chunks = parts
        .into_iter()
        .map(|e| (Duration::from_secs(1), e.into_bytes()))
        .collect();
    a.push(Reply::sse_chunks(chunks, End::Complete));
    let body = request(true);
    let in_flight = bal.post("/v1/messages", &body);
    let reload = async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        bal.write_config(&config_yaml(&[("B", &b.url(), 1)], ""));
        let r = bal
            .client
            .post(format!("{}/providers/reload", bal.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    };
    let (resp, ()) = tokio::join!(in_flight, reload);
    let text = resp.text().await.unwrap();
    assert_eq!(
        names(&events(&text)).last(),
        Some(&"message_stop"),
        "{text}"
    );
    assert!(text.contains("slow "));
    // New requests use the new configuration.
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.headers()["x-provider-used"],
        "B"
    );
}

#[tokio::test]
async fn unknown_paths_and_wrong_methods_are_anthropic_errors() {
    let (_p, bal) = one_provider(Reply::message("m", "ok")).await;
    let resp = bal
        .client
        .get(format!("{}/v2/nothing", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert_error_shape(&resp.json().await.unwrap(), "not_found_error");
    let resp = bal
        .client
        .get(format!("{}/v1/messages", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 405);
    assert_error_shape(&resp.json().await.unwrap(), "invalid_request_error");
    let resp = bal
        .client
        .head(format!("{}/api/hello", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn bad_bodies_get_400_and_never_reach_a_provider() {
    let (p, bal) = one_provider(Reply::message("m", "ok")).await;
    let cases: Vec<(&str, String)> = vec![
        ("invalid JSON", "{\"model\": ".into()),
        ("not an object", "[1,2]".into()),
        ("missing model", json!({"messages": []}).to_string()),
        (
            "missing messages",
            json!({"model": "claude-sonnet-4-6"}).to_string(),
        ),
        (
            "model not a string",
            json!({"model": 3, "messages": []}).to_string(),
        ),
        ("empty body", String::new()),
    ];
    for path in ["/v1/messages", "/v1/messages/count_tokens"] {
        for (what, body) in &cases {
            let resp = bal
                .client
                .post(format!("{}{path}", bal.url))
                .body(body.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), 400, "{path}: {what}");
            assert_error_shape(&resp.json().await.unwrap(), "invalid_request_error");
        }
    }
    assert_eq!(p.request_count(), 0);
}

#[tokio::test]
async fn oversized_bodies_get_413() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("P", &p.url(), 1)],
        "  max_request_bytes: 2000\n",
    ))
    .await;
    let big = json!({"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"x".repeat(5000)}]});
    let resp = bal.post("/v1/messages", &big).await;
    assert_eq!(resp.status(), 413);
    assert_error_shape(&resp.json().await.unwrap(), "request_too_large");
    // Without a content-length (chunked upload) the limit holds too.
    let stream =
        futures_util::stream::iter((0..10).map(|_| Ok::<_, std::io::Error>(vec![b' '; 500])));
    let resp = bal
        .client
        .post(format!("{}/v1/messages", bal.url))
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 413);
    assert_eq!(p.request_count(), 0);
}
