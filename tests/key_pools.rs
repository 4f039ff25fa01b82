//! Provider key pools (`auth_value` as a list, or `keys:`): a key that gets a 429, 401, 402 or 403
//! rests while the pool's other keys serve; a key reported exhausted rests before any 429; a
//! session sticks to its key; `/providers` lists the keys masked. (The rest's end is checked with
//! the paused clock in `routing::keys`.)
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::{Duration, SystemTime};

use common::*;
use serde_json::Value;

const KEY_1: &str = "sk-pool-key-one-111";
const KEY_2: &str = "sk-pool-key-two-222";

/// Provider P with a pool of two keys, in route `*`, and extra settings.
async fn pooled(settings: &str) -> (MockProvider, Balancer) {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - name: P\n    type: anthropic\n    base_url: \"{}\"\n    auth_type: api_key\n    keys:\n      - {{ name: one, value: \"{KEY_1}\" }}\n      - {{ name: two, value: \"{KEY_2}\" }}\nmodel_routes:\n  \"*\":\n    - {{ provider: P, model: passthrough }}\nsettings:\n{settings}",
        p.url()
    );
    (p, Balancer::start(&yaml).await)
}

/// The key of P that `/providers` shows resting (the test fails if none is).
async fn resting_key(bal: &Balancer) -> Value {
    let keys = bal.provider("P").await["keys"].clone();
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["state"] == "resting")
        .cloned()
        .unwrap_or_else(|| panic!("no resting key: {keys}"))
}

/// The key each request the provider received was sent with.
fn keys_used(p: &MockProvider) -> Vec<String> {
    p.requests()
        .iter()
        .map(|r| r.header("x-api-key").unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn a_key_that_gets_a_429_rests_and_the_other_key_serves_the_same_request() {
    let (p, bal) = pooled("  unhealthy_threshold: 1\n").await;
    // Whichever key goes first gets a 429 with retry-after: 30.
    p.push(Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after", "30"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(
        resp.status(),
        200,
        "the other key answered the same request"
    );
    let used = keys_used(&p);
    assert_eq!(used.len(), 2);
    assert_ne!(used[0], used[1]);
    let rested = used[0].clone();
    // The next requests all go to the other key; the provider stays healthy.
    for _ in 0..4 {
        assert_eq!(
            bal.post("/v1/messages", &request(false)).await.status(),
            200
        );
    }
    let used = keys_used(&p);
    assert!(used[2..].iter().all(|k| *k != rested), "{used:?}");
    let provider = bal.provider("P").await;
    assert_eq!(provider["state"], "healthy", "{provider}");
    assert_eq!(provider["consecutive_failures"], 0);
    let keys = provider["keys"].as_array().unwrap();
    let resting: Vec<&Value> = keys.iter().filter(|k| k["state"] == "resting").collect();
    assert_eq!(resting.len(), 1, "{provider}");
    let secs = resting[0]["resting_seconds"].as_f64().unwrap();
    assert!(secs > 28.0 && secs <= 30.0, "{secs}");
    assert_eq!(resting[0]["reason"], "status 429");
    // Keys are listed masked, never whole.
    let text = provider.to_string();
    assert!(!text.contains(KEY_1) && !text.contains(KEY_2), "{text}");
    assert!(
        keys.iter()
            .all(|k| k["credentials"]["value"].as_str().unwrap().contains('*'))
    );
}

#[tokio::test]
async fn the_provider_fails_only_when_every_key_rests() {
    let (p, bal) = pooled("  unhealthy_threshold: 1\n").await;
    for _ in 0..2 {
        p.push(Reply::error(429, "rate_limit_error", "slow down").with_header("retry-after", "30"));
    }
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 429);
    assert_eq!(p.request_count(), 2, "each key tried once");
    assert_eq!(bal.provider("P").await["state"], "cooling_down");
}

#[tokio::test]
async fn a_key_reported_exhausted_rests_before_it_ever_gets_a_429() {
    let (p, bal) = pooled("").await;
    let reset =
        humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(60)).to_string();
    p.push(
        Reply::message("m", "last one")
            .with_header("anthropic-ratelimit-requests-remaining", "0")
            .with_header("anthropic-ratelimit-requests-reset", &reset),
    );
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        200
    );
    let exhausted = keys_used(&p)[0].clone();
    for _ in 0..4 {
        assert_eq!(
            bal.post("/v1/messages", &request(false)).await.status(),
            200
        );
    }
    let used = keys_used(&p);
    assert!(used[1..].iter().all(|k| *k != exhausted), "{used:?}");
    let shown = resting_key(&bal).await;
    assert_eq!(shown["requests_remaining"], 0);
    assert!(shown["reason"].as_str().unwrap().contains("exhausted"));
}

#[tokio::test]
async fn a_session_sticks_to_one_key_of_the_provider() {
    let (p, bal) = pooled("").await;
    let session = [("x-claude-code-session-id", "session-keys-1")];
    for _ in 0..5 {
        let resp = bal
            .post_with("/v1/messages", &request(false), &session)
            .await;
        assert_eq!(resp.status(), 200);
    }
    let used = keys_used(&p);
    assert!(
        used.iter().all(|k| *k == used[0]),
        "one key for the session: {used:?}"
    );
    // Requests without a session take the keys in turn.
    for _ in 0..4 {
        assert_eq!(
            bal.post("/v1/messages", &request(false)).await.status(),
            200
        );
    }
    let used = keys_used(&p);
    assert!(
        used[5..].contains(&KEY_1.to_owned()) && used[5..].contains(&KEY_2.to_owned()),
        "{used:?}"
    );
}

#[test]
fn auth_value_may_be_a_list_of_keys() {
    let yaml = r#"
providers:
  - name: P
    type: anthropic
    base_url: "https://p.example"
    auth_type: auth_token
    auth_value: ["k-a", "${UNSET_POOL_KEY}", "k-c"]
model_routes:
  "*":
    - provider: P
"#;
    let loaded = claude_balancer::config::load_str(yaml, &|_| None).unwrap();
    let keys = &loaded.config.providers[0].keys;
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    assert_eq!(names, ["key-1", "key-3"]);
    assert!(
        loaded
            .warnings
            .iter()
            .any(|w| w.contains("providers[0].auth_value[1]") && w.contains("UNSET_POOL_KEY")),
        "{:?}",
        loaded.warnings
    );
    assert!(
        matches!(&keys[0].auth, claude_balancer::config::Auth::Bearer(k) if k.expose() == "k-a")
    );
}

/// A subscription account's 429 says until when its quota is exhausted: the key rests until then,
/// not just for the cooldown.
#[tokio::test]
async fn a_429_with_a_unified_reset_rests_the_key_until_that_reset() {
    let (p, bal) = pooled("  failure_cooldown: 5\n").await;
    let reset = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    p.push(
        Reply::error(429, "rate_limit_error", "usage limit reached")
            .with_header("anthropic-ratelimit-unified-status", "rejected")
            .with_header("anthropic-ratelimit-unified-reset", &reset.to_string()),
    );
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        200
    );
    let resting = resting_key(&bal).await;
    let secs = resting["resting_seconds"].as_f64().unwrap();
    assert!(
        secs > 3500.0,
        "rests until the reset, not the 5 s cooldown: {secs}"
    );
}

/// count_tokens uses the pool's keys but never rests them: a relay whose count_tokens refuses
/// must not take keys away from chat requests.
#[tokio::test]
async fn count_tokens_failures_do_not_rest_keys() {
    let (p, bal) = pooled("").await;
    for _ in 0..4 {
        p.push(Reply::error(
            403,
            "permission_error",
            "no count_tokens here",
        ));
    }
    for _ in 0..2 {
        let resp = bal.post("/v1/messages/count_tokens", &request(false)).await;
        assert_eq!(resp.status(), 200, "the local count answers");
    }
    let keys = bal.provider("P").await["keys"].clone();
    assert!(
        keys.as_array()
            .unwrap()
            .iter()
            .all(|k| k["state"] == "available"),
        "{keys}"
    );
}
