//! Same-request failover: which faults fail over, which count, and the final error when all fail.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

async fn two(settings: &str) -> (MockProvider, MockProvider, Balancer) {
    two_providers(
        Reply::message("m", "from A"),
        Reply::message("m", "from B"),
        settings,
    )
    .await
}

async fn text_of(resp: reqwest::Response) -> String {
    let v: Value = resp.json().await.unwrap();
    v["content"][0]["text"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn provider_fault_statuses_fail_over_and_count() {
    for status in [401, 402, 403, 404, 408, 429, 500, 502, 503, 529] {
        let (a, b, bal) = two("  failure_cooldown: 60\n").await;
        a.push(Reply::error(status, "api_error", "upstream trouble"));
        let resp = bal.post("/v1/messages", &request(false)).await;
        assert_eq!(resp.status(), 200, "status {status}");
        assert_eq!(resp.headers()["x-provider-used"], "B");
        assert_eq!(text_of(resp).await, "from B");
        assert_eq!(a.request_count(), 1);
        assert_eq!(b.request_count(), 1);
        let pa = bal.provider("A").await;
        assert_eq!(pa["failures"], 1, "status {status}");
        assert_eq!(pa["state"], "cooling_down", "status {status}");
        assert!(
            pa["last_error"]
                .as_str()
                .unwrap()
                .contains(&status.to_string())
        );
    }
}

#[tokio::test]
async fn client_faults_return_unchanged_without_failover_or_penalty() {
    for status in [400, 413, 422] {
        let (a, b, bal) = two("").await;
        a.push(
            Reply::error(status, "invalid_request_error", "bad field x")
                .with_header("request-id", "req_up_1"),
        );
        let resp = bal.post("/v1/messages", &request(false)).await;
        assert_eq!(resp.status(), status);
        assert_eq!(resp.headers()["request-id"], "req_up_1");
        assert_eq!(resp.headers()["x-provider-used"], "A");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["message"], "bad field x");
        assert_eq!(b.request_count(), 0, "no failover for {status}");
        let pa = bal.provider("A").await;
        assert_eq!(pa["failures"], 0);
        assert_eq!(pa["state"], "healthy");
    }
}

#[tokio::test]
async fn custom_unhealthy_codes_replace_the_defaults() {
    let (a, b, bal) = two("  unhealthy_http_codes: [400]\n").await;
    a.push(Reply::error(400, "invalid_request_error", "relay says no"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.request_count(), 1);
    // 500 is no longer a provider fault: it goes back to the client.
    a.push(Reply::error(500, "api_error", "boom"));
    b.push(Reply::error(500, "api_error", "boom"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 500);
}

#[tokio::test]
async fn exception_patterns_turn_client_faults_into_provider_faults() {
    let (a, b, bal) = two("  unhealthy_exception_patterns: [\"no available token\"]\n").await;
    a.push(Reply::error(
        400,
        "invalid_request_error",
        "no available token for this group",
    ));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(b.request_count(), 1);
}

#[tokio::test]
async fn transport_faults_fail_over() {
    // Connection refused: a port with nothing listening.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let b = MockProvider::start(Reply::message("m", "from B"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("A", &dead_url, 1), ("B", &b.url(), 2)], "")).await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(bal.provider("A").await["state"], "cooling_down");

    // Dropped before headers.
    let (a, b, bal) = two("").await;
    a.push(Reply::DropBeforeHeaders);
    b.push(Reply::message_stream("m", "streamed from B"));
    let resp = bal.post("/v1/messages", &request(true)).await;
    let st = resp.status();
    let used = resp.headers().get("x-provider-used").cloned();
    let t = resp.text().await.unwrap();
    assert_eq!(st, 200, "{t}");
    assert_eq!(used.unwrap(), "B");
    assert_eq!(b.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_provider_that_never_answers_times_out_and_fails_over() {
    let settings = "  timeouts:\n    non_streaming:\n      read_timeout: 5\n    streaming:\n      read_timeout: 5\n";
    let (a, _b, bal) = two(settings).await;
    a.push(Reply::Hang);
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "B");
    let pa = bal.provider("A").await;
    assert!(
        pa["last_error"]
            .as_str()
            .unwrap()
            .contains("no response within"),
        "{pa}"
    );
    // The hung connection was closed by the balancer.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(a.client_closed(), 1);
}

#[tokio::test]
async fn an_error_inside_a_200_fails_over() {
    let (a, b, bal) = two("").await;
    a.push(Reply::json(
        200,
        &serde_json::json!({"type":"error","error":{"type":"overloaded_error","message":"busy"}}),
    ));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(text_of(resp).await, "from B");
    assert_eq!(b.request_count(), 1);
}

#[tokio::test]
async fn body_patterns_apply_to_200_bodies() {
    let (a, _b, bal) =
        two("  unhealthy_response_body_patterns: [\"quota (exceeded|exhausted)\"]\n").await;
    a.push(Reply::message("m", "your quota exhausted, please recharge"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(text_of(resp).await, "from B");
    assert_eq!(a.request_count(), 1);
}

#[tokio::test]
async fn all_overloaded_gives_529_with_the_shortest_cooldown() {
    let (a, b, bal) = two("  failure_cooldown: 60\n").await;
    a.push(Reply::error(529, "overloaded_error", "Overloaded"));
    b.push(Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after", "7"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 529);
    assert_eq!(resp.headers()["retry-after"], "7");
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["type"], "error");
    assert_eq!(v["error"]["type"], "overloaded_error");
    assert!(v.get("message").is_none(), "no top-level message: {v}");
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(
        msg.contains("A: HTTP 529") && msg.contains("B: HTTP 429"),
        "{msg}"
    );
}

#[tokio::test]
async fn refused_credentials_give_502_never_401() {
    let (a, b, bal) = two("").await;
    a.push(Reply::error(
        401,
        "authentication_error",
        "invalid x-api-key",
    ));
    b.push(Reply::error(403, "permission_error", "forbidden"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 502);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "api_error");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("invalid x-api-key")
    );
}

#[tokio::test(start_paused = true)]
async fn all_timed_out_gives_504() {
    let settings = "  timeouts:\n    non_streaming:\n      read_timeout: 3\n";
    let (a, b, bal) = two(settings).await;
    a.push(Reply::Hang);
    b.push(Reply::Hang);
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 504);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "timeout_error");
}

#[tokio::test]
async fn cooling_providers_are_still_tried_when_nothing_else_is_left() {
    let (a, b, bal) = two("  failure_cooldown: 600\n").await;
    a.push(Reply::error(500, "api_error", "x"));
    b.push(Reply::error(500, "api_error", "x"));
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        500
    );
    // Both cool down now; the next request still gets an answer from one of them.
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(a.request_count() + b.request_count(), 3);
}

/// When every attempt failed with the same upstream status, the client gets that status and its
/// Anthropic error type (as the earlier balancer answered), with the message listing each attempt.
/// 401 and 403 stay 502; mixed statuses keep the 529/502 rules.
#[tokio::test]
async fn the_same_status_from_every_provider_is_answered_with_that_status() {
    let cases: &[(u16, u16, u16, &str)] = &[
        (429, 429, 429, "rate_limit_error"),
        (500, 500, 500, "api_error"),
        (503, 503, 503, "overloaded_error"),
        (529, 529, 529, "overloaded_error"),
        (402, 402, 402, "billing_error"),
        (401, 401, 502, "api_error"),
        (403, 403, 502, "api_error"),
        (500, 503, 502, "api_error"),
        (529, 429, 529, "overloaded_error"),
    ];
    for &(sa, sb, want, kind) in cases {
        for stream in [false, true] {
            let (a, b, bal) = two("").await;
            a.push(Reply::error(sa, "api_error", "first refused").with_header("retry-after", "9"));
            b.push(Reply::error(sb, "api_error", "second refused").with_header("retry-after", "4"));
            let resp = bal.post("/v1/messages", &request(stream)).await;
            let label = format!("{sa}+{sb}, stream={stream}");
            assert_eq!(resp.status().as_u16(), want, "{label}");
            if want == 429 || kind == "overloaded_error" {
                assert_eq!(resp.headers()["retry-after"], "4", "{label}");
            }
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["type"], "error", "{label}");
            assert_eq!(v["error"]["type"], kind, "{label}: {v}");
            let msg = v["error"]["message"].as_str().unwrap();
            assert!(
                msg.contains(&format!("A: HTTP {sa}")) && msg.contains(&format!("B: HTTP {sb}")),
                "{label}: {msg}"
            );
        }
    }
}

/// A redirect from a provider is never followed nor passed on: it is a provider fault, named with
/// its location, and the next candidate serves.
#[tokio::test]
async fn redirects_are_provider_faults() {
    for status in [301, 302, 307, 308] {
        let (a, b, bal) = two("").await;
        a.push(
            Reply::json(status, &serde_json::json!({}))
                .with_header("location", "https://user:pw@elsewhere.example/v1/messages"),
        );
        let resp = bal.post("/v1/messages", &request(false)).await;
        assert_eq!(resp.status(), 200, "{status}");
        assert_eq!(text_of(resp).await, "from B", "{status}");
        assert_eq!(b.request_count(), 1);
        let last_error = bal.provider("A").await["last_error"].to_string();
        assert!(
            last_error.contains(&format!("HTTP {status}"))
                && last_error.contains("elsewhere.example"),
            "{last_error}"
        );
        assert!(!last_error.contains("pw@"), "{last_error}");
        a.push(Reply::json(status, &serde_json::json!({})).with_header("location", "/x"));
        b.push(Reply::json(status, &serde_json::json!({})).with_header("location", "/y"));
        let resp = bal.post("/v1/messages", &request(true)).await;
        assert_eq!(resp.status(), 502, "{status}: both redirected");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"]["type"], "api_error");
    }
}
