//! Named clients (`clients:`): identified by their key, refused models (403) and limits (429 with
//! `retry-after`) before any provider is asked, and charged what the provider reported.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const ALICE: &str = "sk-alice-key-0001";
const BOB: &str = "sk-bob-key-0002";

/// One provider P and the given `clients:` section.
async fn with_clients(reply: Reply, clients: &str) -> (MockProvider, Balancer) {
    let p = MockProvider::start(reply).await.unwrap();
    let yaml = config_yaml(&[("P", &p.url(), 1)], "") + clients;
    (p, Balancer::start(&yaml).await)
}

async fn ask(bal: &Balancer, key: &str, model: &str, stream: bool) -> (u16, Option<String>, Value) {
    let mut body = request(stream);
    body["model"] = model.into();
    let resp = bal
        .client
        .post(format!("{}/v1/messages", bal.url))
        .header("x-api-key", key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let text = resp.text().await.unwrap();
    (
        status,
        retry,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

/// `/metrics` with a client's key (with clients configured and no `admin_keys`, any accepted key
/// may read the admin endpoints).
async fn metrics(bal: &Balancer, key: &str) -> String {
    bal.get_with_key("/metrics", key)
        .await
        .text()
        .await
        .unwrap()
}

fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn a_client_is_known_by_its_key_and_kept_to_its_models() {
    // bob is configured by the SHA-256 of his key.
    use sha2::Digest;
    let bob_sha = format!("{:x}", sha2::Sha256::digest(BOB.as_bytes()));
    let (p, bal) = with_clients(
        Reply::message("m", "hi"),
        &format!(
            "clients:\n  - name: alice\n    key: \"{ALICE}\"\n    models: [\"*sonnet*\"]\n  - name: bob\n    key_sha256: \"{bob_sha}\"\n"
        ),
    )
    .await;
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    assert_eq!(ask(&bal, BOB, "claude-opus-4-5", false).await.0, 200);
    // With clients configured, a key is needed.
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 401);
    assert_eq!(
        ask(&bal, "sk-nobody", "claude-sonnet-4-6", false).await.0,
        401
    );
    // A model outside alice's list: 403 naming it, and no provider is asked.
    let (status, _, body) = ask(&bal, ALICE, "claude-opus-4-5", false).await;
    assert_eq!(status, 403);
    assert_eq!(body["error"]["type"], "permission_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("claude-opus-4-5") && message.contains("alice"),
        "{message}"
    );
    assert_eq!(p.request_count(), 2);
    // count_tokens too keeps a client to its models.
    let mut body = request(false);
    body["model"] = "claude-opus-4-5".into();
    let counted = bal
        .client
        .post(format!("{}/v1/messages/count_tokens", bal.url))
        .header("x-api-key", ALICE)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(counted.status(), 403);
    assert_eq!(p.request_count(), 2);
    // Metrics name clients, never keys.
    let metrics = metrics(&bal, ALICE).await;
    assert_eq!(
        metric(
            &metrics,
            "claude_balancer_client_tokens_total{client=\"alice\",kind=\"input\"}"
        ),
        Some(12.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "claude_balancer_client_refusals_total{client=\"alice\",limit=\"models\"}"
        ),
        Some(2.0)
    );
    assert!(!metrics.contains(ALICE) && !metrics.contains(BOB));
}

#[tokio::test]
async fn settings_auth_api_keys_remain_one_anonymous_client() {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let yaml = config_yaml(
        &[("P", &p.url(), 1)],
        "  auth:\n    enabled: true\n    api_keys: [\"sk-team-shared\"]\n",
    ) + &format!(
        "clients:\n  - name: alice\n    key: \"{ALICE}\"\n    limits:\n      requests_per_minute: 1\n"
    );
    let bal = Balancer::start(&yaml).await;
    // The shared key has no limits; alice has hers.
    for _ in 0..3 {
        assert_eq!(
            ask(&bal, "sk-team-shared", "claude-sonnet-4-6", false)
                .await
                .0,
            200
        );
    }
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 429);
    assert_eq!(
        ask(&bal, "sk-wrong", "claude-sonnet-4-6", false).await.0,
        401
    );
}

#[tokio::test]
async fn requests_per_minute_are_refused_with_retry_after_and_never_reach_a_provider() {
    let (p, bal) = with_clients(
        Reply::message("m", "hi"),
        &format!("clients:\n  - name: alice\n    key: \"{ALICE}\"\n    limits:\n      requests_per_minute: 2\n"),
    )
    .await;
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    let (status, retry, body) = ask(&bal, ALICE, "claude-sonnet-4-6", false).await;
    assert_eq!(status, 429);
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "rate_limit_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("alice") && message.contains("2 requests per minute"),
        "{message}"
    );
    let retry: u64 = retry.unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    assert_eq!(p.request_count(), 2, "a refusal never reaches a provider");
    // ... and never counts against one.
    let providers: Value = bal
        .get_with_key("/providers", ALICE)
        .await
        .json()
        .await
        .unwrap();
    let p_entry = provider_in(&providers, "P");
    assert_eq!(p_entry["state"], "healthy");
    assert_eq!(p_entry["failures"], 0);
}

#[tokio::test]
async fn tokens_are_charged_from_what_the_provider_reported_streams_included() {
    // 12 input + 5 output tokens per answer; 30 tokens per hour: two answers, then refused.
    for stream in [false, true] {
        let reply = if stream {
            Reply::message_stream("m", "one two three")
        } else {
            Reply::message("m", "hi")
        };
        let (p, bal) = with_clients(
            reply,
            &format!("clients:\n  - name: alice\n    key: \"{ALICE}\"\n    limits:\n      tokens: {{ window: 1h, max: 30 }}\n"),
        )
        .await;
        assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", stream).await.0, 200);
        // 17 of 30: admitted, and it overshoots (34).
        assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", stream).await.0, 200);
        let (status, retry, body) = ask(&bal, ALICE, "claude-sonnet-4-6", stream).await;
        assert_eq!(status, 429, "stream: {stream}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("30 tokens per 1h"), "{message}");
        let retry: u64 = retry.unwrap().parse().unwrap();
        assert!((3000..=3600).contains(&retry), "{retry}");
        assert_eq!(p.request_count(), 2);
    }
}

#[tokio::test]
async fn a_budget_is_charged_the_cost_of_the_upstream_model() {
    // claude-sonnet-4-6 at $3 / $15 per million: 12 in + 5 out = $0.000111 per answer.
    // A budget of $0.0002: two answers ($0.000222), then refused.
    let (p, bal) = with_clients(
        Reply::message("m", "hi"),
        &format!("clients:\n  - name: alice\n    key: \"{ALICE}\"\n    limits:\n      budget_usd: {{ window: 30d, max: 0.0002 }}\n"),
    )
    .await;
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
    let (status, _, body) = ask(&bal, ALICE, "claude-sonnet-4-6", false).await;
    assert_eq!(status, 429);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("budget of 0.0002 USD per 30d")
    );
    assert_eq!(p.request_count(), 2);
    let metrics = metrics(&bal, ALICE).await;
    assert_eq!(
        metric(
            &metrics,
            "claude_balancer_client_cost_microdollars_total{client=\"alice\"}"
        ),
        Some(222.0)
    );
}

#[tokio::test]
async fn concurrent_requests_are_counted_until_the_response_ends() {
    let (p, bal) = with_clients(
        Reply::message("m", "slow").with_delay(Duration::from_millis(500)),
        &format!("clients:\n  - name: alice\n    key: \"{ALICE}\"\n    limits:\n      concurrent_requests: 1\n"),
    )
    .await;
    let first = ask(&bal, ALICE, "claude-sonnet-4-6", false);
    let second = async {
        // Once the first is in flight.
        assert!(eventually(Duration::from_secs(5), || async { p.request_count() == 1 }).await);
        ask(&bal, ALICE, "claude-sonnet-4-6", false).await
    };
    let ((one, _, _), (two, retry, body)) = tokio::join!(first, second);
    assert_eq!(one, 200);
    assert_eq!(two, 429);
    assert_eq!(retry.as_deref(), Some("1"));
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("1 concurrent requests")
    );
    // The first has ended: its place is free.
    assert_eq!(ask(&bal, ALICE, "claude-sonnet-4-6", false).await.0, 200);
}

/// `GET /usage` and `claude-balancer usage` report the requests made: by client and model, with
/// tokens and cost; requests of no named client count too.
#[tokio::test]
async fn usage_and_the_usage_command_agree_with_the_requests_made() {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let yaml = config_yaml(
        &[("P", &p.url(), 1)],
        "  auth:\n    enabled: true\n    api_keys: [\"sk-team-shared\"]\n    admin_keys: [\"sk-admin-1\"]\n",
    ) + &format!(
        "clients:\n  - name: alice\n    key: \"{ALICE}\"\n  - name: bob\n    key: \"{BOB}\"\n"
    );
    let bal = Balancer::start(&yaml).await;
    for (key, model, n) in [
        (ALICE, "claude-sonnet-4-6", 3),
        (BOB, "claude-haiku-4-5", 2),
        ("sk-team-shared", "gpt-5", 1),
    ] {
        for _ in 0..n {
            assert_eq!(ask(&bal, key, model, false).await.0, 200);
        }
    }
    // Admin keys only.
    let path = "/usage?group_by=client,model&bucket=day";
    assert_eq!(bal.get_with_key(path, ALICE).await.status(), 401);
    let usage: Value = bal
        .get_with_key(path, "sk-admin-1")
        .await
        .json()
        .await
        .unwrap();
    let rows = usage["rows"].as_array().unwrap();
    let row = |client: &str| {
        rows.iter()
            .find(|r| r["client"] == client)
            .unwrap_or_else(|| panic!("no row for {client:?}: {usage}"))
            .clone()
    };
    let alice = row("alice");
    assert_eq!(alice["model"], "claude-sonnet-4-6");
    assert_eq!(
        (
            alice["requests"].as_u64(),
            alice["input_tokens"].as_u64(),
            alice["output_tokens"].as_u64()
        ),
        (Some(3), Some(36), Some(15))
    );
    // 3 × (12 × $3 + 5 × $15) / 1e6 = $0.000333; haiku 4.5: 2 × (12 × $1 + 5 × $5) / 1e6.
    assert!((alice["cost_usd"].as_f64().unwrap() - 0.000333).abs() < 1e-12);
    let bob = row("bob");
    assert!((bob["cost_usd"].as_f64().unwrap() - 0.000074).abs() < 1e-12);
    let shared = row("");
    assert_eq!(
        (
            shared["requests"].as_u64(),
            shared["unpriced_requests"].as_u64()
        ),
        (Some(1), Some(1))
    );
    assert_eq!(usage["totals"]["requests"], 6);
    assert!(alice["start"].as_str().unwrap().ends_with("T00:00:00Z"));
    assert_eq!(
        serde_json::to_string(&usage["clients"]).unwrap(),
        r#"[{"name":"alice","limits":[]},{"name":"bob","limits":[]}]"#
    );
    // Bad parameters: a 400 that names them.
    let bad = bal.get_with_key("/usage?group_by=team", "sk-admin-1").await;
    assert_eq!(bad.status(), 400);
    assert!(
        bad.text()
            .await
            .unwrap()
            .contains("group_by: expected client, provider, model or route")
    );

    // The command reads the same file.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
        .args(["usage", "--group-by", "client", "--config"])
        .arg(bal.config_file.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let line = |name: &str| {
        table
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("no {name} line in:\n{table}"))
            .split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        line("alice"),
        ["alice", "3", "36", "15", "0", "0", "0.0003"]
    );
    assert_eq!(line("bob"), ["bob", "2", "24", "10", "0", "0", "0.0001"]);
    assert_eq!(line("-"), ["-", "1", "12", "5", "0", "0", "0.0000"]);
    assert_eq!(
        line("total"),
        ["total", "6", "72", "30", "0", "0", "0.0004"]
    );
    assert!(
        table.contains("1 request(s) used models with no price"),
        "{table}"
    );
}
