//! Candidate order: strategies, session affinity, cooldowns and probes, the `provider` field.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const SECS: Duration = Duration::from_secs(1);

struct Three {
    mocks: Vec<MockProvider>,
    bal: Balancer,
}

/// Three providers named A, B, C answering with their own name; all at priority 1 unless `prios`.
async fn three(prios: [i64; 3], settings: &str) -> Three {
    let mut mocks = Vec::new();
    for n in ["A", "B", "C"] {
        mocks.push(MockProvider::start(Reply::message("m", n)).await.unwrap());
    }
    let urls: Vec<String> = mocks.iter().map(|m| m.url()).collect();
    let bal = Balancer::start(&config_yaml(
        &[
            ("A", &urls[0], prios[0]),
            ("B", &urls[1], prios[1]),
            ("C", &urls[2], prios[2]),
        ],
        settings,
    ))
    .await;
    Three { mocks, bal }
}

async fn served_by(bal: &Balancer, body: &Value, headers: &[(&str, &str)]) -> String {
    let resp = bal.post_with("/v1/messages", body, headers).await;
    assert_eq!(resp.status(), 200);
    resp.headers()["x-provider-used"]
        .to_str()
        .unwrap()
        .to_owned()
}

async fn sequence(bal: &Balancer, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(served_by(bal, &request(false), &[]).await);
    }
    out
}

#[tokio::test]
async fn priority_uses_file_order_within_a_tier_and_lower_numbers_first() {
    let t = three([2, 1, 1], "  selection_strategy: priority\n").await;
    assert_eq!(sequence(&t.bal, 4).await, ["B", "B", "B", "B"]);
}

#[tokio::test]
async fn round_robin_rotates_under_continuous_load() {
    let t = three([1, 1, 1], "  selection_strategy: round_robin\n").await;
    let seq = sequence(&t.bal, 6).await;
    assert_eq!(seq, ["A", "B", "C", "A", "B", "C"]);
    // Concurrent load rotates too: 30 different requests at once are spread evenly.
    let bodies: Vec<Value> = (0..30)
        .map(|i| {
            let mut b = request(false);
            b["messages"][0]["content"] = json!(format!("request {i}"));
            b
        })
        .collect();
    let futs = bodies.iter().map(|b| served_by(&t.bal, b, &[]));
    let all = futures_util::future::join_all(futs).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for s in all {
        *counts.entry(s).or_default() += 1;
    }
    assert_eq!(
        counts.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{counts:?}"
    );
}

#[tokio::test]
async fn round_robin_keeps_tiers_apart() {
    let t = three([1, 1, 2], "  selection_strategy: round_robin\n").await;
    let seq = sequence(&t.bal, 4).await;
    assert_eq!(seq, ["A", "B", "A", "B"]);
    assert_eq!(t.mocks[2].request_count(), 0);
}

#[tokio::test]
async fn random_reaches_every_provider() {
    let t = three([1, 1, 1], "  selection_strategy: random\n").await;
    let seq = sequence(&t.bal, 60).await;
    for n in ["A", "B", "C"] {
        assert!(seq.iter().any(|s| s == n), "{n} never chosen: {seq:?}");
    }
}

#[tokio::test]
async fn weighted_follows_the_weights() {
    let mut mocks = Vec::new();
    for n in ["A", "B", "C"] {
        mocks.push(MockProvider::start(Reply::message("m", n)).await.unwrap());
    }
    let mut y = String::from("providers:\n");
    for (n, m) in ["A", "B", "C"].iter().zip(&mocks) {
        y.push_str(&provider_yaml(n, &m.url()));
    }
    y.push_str(
        "model_routes:\n  \"*\":\n    - {provider: A, model: passthrough, weight: 3}\n    - {provider: B, model: passthrough, weight: 1}\n    - {provider: C, model: passthrough, weight: 0}\nsettings:\n  selection_strategy: weighted\n",
    );
    let bal = Balancer::start(&y).await;
    let seq = sequence(&bal, 200).await;
    let a = seq.iter().filter(|s| *s == "A").count();
    let c = seq.iter().filter(|s| *s == "C").count();
    // Expected 150 of 200 (standard deviation about 6).
    assert!((115..=185).contains(&a), "A served {a} of 200");
    assert_eq!(c, 0, "weight 0 is only a last resort");
}

#[tokio::test(start_paused = true)]
async fn least_latency_prefers_the_fastest_after_measuring_each() {
    let t = three([1, 1, 1], "  selection_strategy: least_latency\n").await;
    t.mocks[0].set_default(Reply::message("m", "A").with_delay(3 * SECS));
    t.mocks[1].set_default(Reply::message("m", "B").with_delay(SECS));
    t.mocks[2].set_default(Reply::message("m", "C").with_delay(2 * SECS));
    let seq = sequence(&t.bal, 6).await;
    assert_eq!(seq, ["A", "B", "C", "B", "B", "B"]);
}

#[tokio::test]
async fn sessions_stick_to_the_provider_that_served_them() {
    let t = three(
        [1, 1, 1],
        "  selection_strategy: round_robin\n  sticky_provider_duration: 300\n",
    )
    .await;
    let s1 = [("x-claude-code-session-id", "session-1")];
    let first = served_by(&t.bal, &request(false), &s1).await;
    for _ in 0..5 {
        assert_eq!(served_by(&t.bal, &request(false), &s1).await, first);
    }
    // The session id inside metadata.user_id works the same way.
    let mut body = request(false);
    body["metadata"] = json!({"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"session-2\"}"});
    let second = served_by(&t.bal, &body, &[]).await;
    for _ in 0..3 {
        assert_eq!(served_by(&t.bal, &body, &[]).await, second);
    }
    // Requests without a session keep rotating.
    let seq = sequence(&t.bal, 3).await;
    let distinct: std::collections::HashSet<_> = seq.iter().collect();
    assert_eq!(distinct.len(), 3, "{seq:?}");
}

#[tokio::test]
async fn a_session_moves_when_its_provider_fails() {
    let t = three([1, 1, 1], "  sticky_provider_duration: 300\n").await;
    let s = [("x-claude-code-session-id", "s")];
    assert_eq!(served_by(&t.bal, &request(false), &s).await, "A");
    t.mocks[0].set_default(Reply::error(503, "api_error", "down"));
    assert_eq!(served_by(&t.bal, &request(false), &s).await, "B");
    t.mocks[0].set_default(Reply::message("m", "A"));
    // A is cooling down; the session now sticks to B.
    assert_eq!(served_by(&t.bal, &request(false), &s).await, "B");
}

#[tokio::test]
async fn affinity_is_off_at_zero() {
    let t = three(
        [1, 1, 1],
        "  selection_strategy: round_robin\n  sticky_provider_duration: 0\n",
    )
    .await;
    let s = [("x-claude-code-session-id", "s")];
    let a = served_by(&t.bal, &request(false), &s).await;
    let b = served_by(&t.bal, &request(false), &s).await;
    assert_ne!(a, b);
}

#[tokio::test(start_paused = true)]
async fn cooldown_then_one_probe_heals() {
    let t = three([1, 2, 3], "  failure_cooldown: 60\n").await;
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "B");
    let a = t.bal.provider("A").await;
    assert_eq!(a["state"], "cooling_down");
    assert_eq!(a["cooldown_remaining_seconds"], 60.0);
    // While cooling, A costs nothing.
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "B");
    assert_eq!(t.mocks[0].request_count(), 1);
    tokio::time::sleep(61 * SECS).await;
    assert_eq!(t.bal.provider("A").await["state"], "probing");
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "A");
    assert_eq!(t.bal.provider("A").await["state"], "healthy");
}

#[tokio::test(start_paused = true)]
async fn a_failed_probe_doubles_the_cooldown_up_to_eight_times() {
    let t = three([1, 2, 3], "  failure_cooldown: 10\n").await;
    t.mocks[0].set_default(Reply::error(500, "api_error", "still down"));
    served_by(&t.bal, &request(false), &[]).await;
    let mut seen = Vec::new();
    for _ in 0..5 {
        let remaining = t.bal.provider("A").await["cooldown_remaining_seconds"]
            .as_f64()
            .unwrap();
        seen.push(remaining);
        tokio::time::sleep(Duration::from_secs_f64(remaining) + SECS).await;
        assert_eq!(served_by(&t.bal, &request(false), &[]).await, "B"); // the probe fails over to B
    }
    assert_eq!(seen, [10.0, 20.0, 40.0, 80.0, 80.0]);
}

#[tokio::test(start_paused = true)]
async fn only_one_probe_at_a_time() {
    let t = three([1, 2, 3], "  failure_cooldown: 10\n").await;
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    served_by(&t.bal, &request(false), &[]).await;
    tokio::time::sleep(11 * SECS).await;
    // The probe is slow; a concurrent request must not pile onto A.
    t.mocks[0].push(Reply::message("m", "A").with_delay(5 * SECS));
    let body = request(false);
    let probe = served_by(&t.bal, &body, &[]);
    let mut other_body = request(false);
    other_body["messages"][0]["content"] = json!("a different request");
    let other = async {
        tokio::time::sleep(SECS).await;
        served_by(&t.bal, &other_body, &[]).await
    };
    let (p, o) = tokio::join!(probe, other);
    assert_eq!((p.as_str(), o.as_str()), ("A", "B"));
}

#[tokio::test]
async fn threshold_counts_consecutive_faults() {
    let t = three([1, 2, 3], "  unhealthy_threshold: 2\n").await;
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "B");
    assert_eq!(t.bal.provider("A").await["state"], "healthy");
    assert_eq!(t.bal.provider("A").await["consecutive_failures"], 1);
    // A success clears the count.
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "A");
    assert_eq!(t.bal.provider("A").await["consecutive_failures"], 0);
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    served_by(&t.bal, &request(false), &[]).await;
    served_by(&t.bal, &request(false), &[]).await;
    assert_eq!(t.bal.provider("A").await["state"], "cooling_down");
}

#[tokio::test(start_paused = true)]
async fn old_faults_are_forgotten_after_the_reset_timeout() {
    let t = three(
        [1, 2, 3],
        "  unhealthy_threshold: 2\n  unhealthy_reset_timeout: 30\n",
    )
    .await;
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    served_by(&t.bal, &request(false), &[]).await;
    tokio::time::sleep(31 * SECS).await;
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    served_by(&t.bal, &request(false), &[]).await;
    let a = t.bal.provider("A").await;
    assert_eq!(a["state"], "healthy");
    assert_eq!(a["consecutive_failures"], 1);
}

#[tokio::test(start_paused = true)]
async fn retry_after_of_a_429_is_the_cooldown() {
    let t = three(
        [1, 2, 3],
        "  failure_cooldown: 60\n  unhealthy_threshold: 3\n",
    )
    .await;
    t.mocks[0].push(Reply::error(429, "rate_limit_error", "slow").with_header("retry-after", "12"));
    served_by(&t.bal, &request(false), &[]).await;
    let a = t.bal.provider("A").await;
    assert_eq!(a["state"], "cooling_down");
    assert_eq!(a["cooldown_remaining_seconds"], 12.0);
}

#[tokio::test]
async fn cooling_providers_go_last_soonest_first() {
    let t = three([1, 2, 3], "  failure_cooldown: 60\n").await;
    // A cools for 60 s, B for 30 s (its own retry-after).
    t.mocks[0].push(Reply::error(500, "api_error", "x"));
    t.mocks[1].push(Reply::error(429, "rate_limit_error", "x").with_header("retry-after", "30"));
    assert_eq!(served_by(&t.bal, &request(false), &[]).await, "C");
    t.mocks[2].push(Reply::error(500, "api_error", "x"));
    // All three cool now: B (30 s) is tried before A (60 s) and C (60 s).
    let resp = t.bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
}

#[tokio::test]
async fn the_provider_field_picks_the_first_candidate_and_is_stripped() {
    let t = three([1, 2, 3], "").await;
    let mut body = request(false);
    body["provider"] = json!("C");
    assert_eq!(served_by(&t.bal, &body, &[]).await, "C");
    let sent = t.mocks[2].requests()[0].json();
    assert!(sent.get("provider").is_none(), "{sent}");
    assert_eq!(sent["model"], "claude-sonnet-4-6");
    // A provider outside the route is ignored.
    body["provider"] = json!("Nope");
    assert_eq!(served_by(&t.bal, &body, &[]).await, "A");
}
