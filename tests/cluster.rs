//! The state backend (`settings.state`): memory by default, Redis shared by several instances.
//! These tests run a real `redis-server` (skipped when it is not installed, unless
//! `CB_REQUIRE_REDIS` is set) on real time: they wait for the monitor's pings.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const PATIENCE: Duration = Duration::from_secs(10);

fn redis_settings(url: &str) -> String {
    format!(
        "  state:\n    backend: redis\n    redis:\n      url: \"{url}\"\n      key_prefix: \"test:\"\n    instance_name: gw-1\n"
    )
}

async fn state_of(bal: &Balancer) -> Value {
    let (status, health) = bal.get_json("/health").await;
    assert_eq!(
        status, 200,
        "a state backend never makes /health fail: {health}"
    );
    health["state"].clone()
}

/// Waits until every instance's Redis state backend is up.
async fn all_up(instances: &[&Balancer]) {
    for bal in instances {
        assert!(eventually(PATIENCE, || async { state_of(bal).await["status"] == "up" }).await);
    }
}

async fn backend_up_metric(bal: &Balancer) -> String {
    let text = bal.get_text("/metrics").await;
    text.lines()
        .find(|l| l.starts_with("claude_balancer_state_backend_up"))
        .unwrap_or_default()
        .to_owned()
}

#[tokio::test]
async fn the_memory_backend_is_local_and_always_up() {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("P", &p.url(), 1)], "")).await;
    let state = state_of(&bal).await;
    assert_eq!(
        (
            state["backend"].as_str(),
            state["status"].as_str(),
            state["shared"].as_bool()
        ),
        (Some("memory"), Some("local"), Some(false))
    );
    assert!(
        state["instance"]
            .as_str()
            .unwrap()
            .ends_with(&std::process::id().to_string())
    );
    assert_eq!(
        backend_up_metric(&bal).await,
        "claude_balancer_state_backend_up 1"
    );
    assert!(bal.state.cluster.is_none());
}

/// Started while Redis is unreachable: the balancer serves, reports degraded, and becomes shared
/// as soon as Redis answers, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_degrades_and_recovers_without_a_restart() {
    let port = free_port();
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let url = format!("redis://127.0.0.1:{port}/0");
    let bal = Balancer::start(&config_yaml(&[("P", &p.url(), 1)], &redis_settings(&url))).await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200, "Redis being down never fails a request");
    assert!(
        eventually(PATIENCE, || async {
            let s = state_of(&bal).await;
            s["status"] == "degraded" && s["error"].is_string()
        })
        .await
    );
    let s = state_of(&bal).await;
    assert_eq!(
        (
            s["backend"].as_str(),
            s["shared"].as_bool(),
            s["instance"].as_str()
        ),
        (Some("redis"), Some(false), Some("gw-1"))
    );
    assert_eq!(
        backend_up_metric(&bal).await,
        "claude_balancer_state_backend_up 0"
    );

    let Some(_redis) = RedisServer::start_on(port, None) else {
        return;
    };
    assert!(
        eventually(PATIENCE, || async {
            state_of(&bal).await["status"] == "up"
        })
        .await,
        "the instance reconnects by itself"
    );
    let (_, providers) = bal.get_json("/providers").await;
    assert_eq!(providers["state"]["shared"], true);
    assert_eq!(
        backend_up_metric(&bal).await,
        "claude_balancer_state_backend_up 1"
    );
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
}

/// Wrong credentials: degraded, and neither password ever reaches an admin answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_is_degraded_and_never_shown() {
    let Some(redis) = RedisServer::start(Some("the-right-password-1")) else {
        return;
    };
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let url = format!("redis://:the-wrong-password-2@127.0.0.1:{}/0", redis.port);
    let bal = Balancer::start(&config_yaml(&[("P", &p.url(), 1)], &redis_settings(&url))).await;
    assert!(
        eventually(PATIENCE, || async {
            let s = state_of(&bal).await;
            s["status"] == "degraded"
                && s["error"]
                    .as_str()
                    .is_some_and(|e| e != "not connected yet")
        })
        .await
    );
    for path in ["/health", "/providers", "/metrics"] {
        let text = bal.get_text(path).await;
        assert!(
            !text.contains("the-wrong-password-2") && !text.contains("the-right-password-1"),
            "{path}: {text}"
        );
    }
    assert!(!format!("{:?}", bal.state.cluster).contains("the-wrong-password-2"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);

    // The right password: up.
    let good = Balancer::start(&config_yaml(
        &[("P", &p.url(), 1)],
        &redis_settings(&redis.url()),
    ))
    .await;
    all_up(&[&good]).await;
}

/// The backend is chosen at start: a reload that changes it is refused and changes nothing.
#[tokio::test]
async fn a_reload_cannot_change_the_state_backend() {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("P", &p.url(), 1)], "")).await;
    bal.write_config(&config_yaml(
        &[("P", &p.url(), 1)],
        &redis_settings("redis://127.0.0.1:1/0"),
    ));
    let errors = bal.state.reload().await.unwrap_err().0;
    assert!(
        errors
            .iter()
            .any(|e| e.starts_with("settings.state: the state backend is chosen at start")),
        "{errors:?}"
    );
    assert_eq!(state_of(&bal).await["backend"], "memory");
}

/// A session served through instance 1 stays on its provider when its next request goes to
/// instance 2, which has never seen it; another session on instance 2 goes by priority.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_provider_across_instances() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let yaml = config_yaml(
        &[("A", &a.url(), 1), ("B", &b.url(), 2)],
        &redis_settings(&redis.url()),
    );
    let one = Balancer::start(&yaml).await;
    let two = Balancer::start(&yaml).await;
    all_up(&[&one, &two]).await;
    // On instance 1, A fails once: the session is served by B.
    a.push(Reply::error(500, "api_error", "boom"));
    let session = [("x-claude-code-session-id", "session-s")];
    let resp = one
        .post_with("/v1/messages", &request(false), &session)
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    let key = claude_balancer::routing::affinity::key("session-s", "*");
    let cluster = two.state.cluster.clone().unwrap();
    assert!(
        eventually(PATIENCE, || {
            let cluster = cluster.clone();
            async move { cluster.affinity(key).await.as_deref() == Some("B") }
        })
        .await,
        "instance 1 shared the session's provider"
    );

    // Instance 2 never saw the session (and A is healthy there), yet it stays on B.
    let resp = two
        .post_with("/v1/messages", &request(false), &session)
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    // Another session on instance 2 goes by priority.
    let other = [("x-claude-code-session-id", "session-t")];
    let resp = two.post_with("/v1/messages", &request(false), &other).await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
    assert_eq!((a.request_count(), b.request_count()), (2, 2));
}

/// A cached answer made on instance 1 is a hit on instance 3 (as JSON and as a stream);
/// `/cache/clear` on instance 2 empties it for all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_response_cache_is_the_clusters() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let p = MockProvider::start(Reply::message("m", "cached words"))
        .await
        .unwrap();
    let settings = format!("  max_cache_size: 10\n{}", redis_settings(&redis.url()));
    let yaml = config_yaml(&[("P", &p.url(), 1)], &settings);
    let one = Balancer::start(&yaml).await;
    let two = Balancer::start(&yaml).await;
    let three = Balancer::start(&yaml).await;
    all_up(&[&one, &two, &three]).await;
    let resp = one.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-balancer-cache"], "miss");
    // The entry is written without waiting for it: wait until Redis holds it.
    let conn = one.state.cluster.as_ref().unwrap().connection();
    assert!(
        eventually(PATIENCE, || {
            let mut conn = conn.clone();
            async move {
                redis::cmd("ZCARD")
                    .arg("test:cache:index")
                    .query_async::<usize>(&mut conn)
                    .await
                    .is_ok_and(|n| n == 1)
            }
        })
        .await
    );
    let resp = three.post("/v1/messages", &request(false)).await;
    assert_eq!(
        resp.headers()["x-balancer-cache"],
        "hit",
        "a hit on another instance"
    );
    assert_eq!(
        p.request_count(),
        1,
        "no other request reached the provider"
    );
    let resp = three.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-balancer-cache"], "hit");
    assert_eq!(resp.headers()["x-provider-used"], "P");
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("cached words") && text.contains("message_stop"),
        "{text}"
    );

    let cleared = two.clear_cache().await;
    assert_eq!(cleared["shared"]["cleared"], true, "{cleared}");
    assert_eq!(cleared["shared"]["entries_removed"], 1, "{cleared}");
    let resp = three.post("/v1/messages", &request(false)).await;
    assert_eq!(
        resp.headers()["x-balancer-cache"],
        "miss",
        "cleared for every instance"
    );
    assert_eq!(p.request_count(), 2);
}

/// `claude-balancer check` tries the Redis connection and says what it found, without failing
/// the check (the balancer would serve on local state) and without showing the password.
#[test]
fn check_reports_whether_redis_answers() {
    let Some(redis) = RedisServer::start(Some("check-password-77")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.yaml");
    let run = |url: &str| {
        std::fs::write(
            &path,
            format!(
                "providers:\n  - {{name: A, type: anthropic, base_url: \"https://a.example\", auth_type: api_key, auth_value: k}}\nmodel_routes:\n  \"*\":\n    - {{provider: A}}\nsettings:\n{}",
                redis_settings(url)
            ),
        )
        .unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let up = run(&redis.url());
    assert!(
        up.contains("state backend: redis at redis://") && up.contains(": reachable"),
        "{up}"
    );
    let wrong = run(&format!(
        "redis://:wrong-password-88@127.0.0.1:{}/0",
        redis.port
    ));
    assert!(
        wrong.contains("state backend: redis: unreachable ("),
        "{wrong}"
    );
    let down = run(&format!("redis://127.0.0.1:{}/0", free_port()));
    assert!(
        down.contains("state backend: redis: unreachable ("),
        "{down}"
    );
    for out in [&up, &wrong, &down] {
        assert!(
            !out.contains("check-password-77") && !out.contains("wrong-password-88"),
            "{out}"
        );
    }
}

/// `POST /providers/reload?scope=cluster` on one instance makes every other instance reload its
/// own configuration file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_reload_reaches_every_instance() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let a = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    // Each instance has its own name (an instance ignores the events it published itself).
    let settings = redis_settings(&redis.url());
    let named = |name: &str| settings.replace("gw-1", name);
    let one = Balancer::start(&config_yaml(&[("A", &a.url(), 1)], &named("gw-1"))).await;
    let two = Balancer::start(&config_yaml(&[("A", &a.url(), 1)], &named("gw-2"))).await;
    all_up(&[&one, &two]).await;
    // Instance 2's own file gains a provider; instance 1's does not change.
    two.write_config(&config_yaml(
        &[("A", &a.url(), 1), ("B", &a.url(), 2)],
        &named("gw-2"),
    ));
    let providers = |bal: &Balancer| {
        let url = format!("{}/providers", bal.url);
        let client = bal.client.clone();
        async move {
            let v: Value = client.get(url).send().await.unwrap().json().await.unwrap();
            v["total_providers"].as_u64().unwrap()
        }
    };
    assert_eq!(providers(&two).await, 1);
    // The subscriber connects in the background: ask until someone listened.
    let answer = std::sync::Arc::new(std::sync::Mutex::new(Value::Null));
    assert!(
        eventually(PATIENCE, || {
            let url = format!("{}/providers/reload?scope=cluster", one.url);
            let (client, answer) = (one.client.clone(), answer.clone());
            async move {
                let v: Value = client.post(url).send().await.unwrap().json().await.unwrap();
                let listened = v["cluster"]["other_instances"] == 1;
                *answer.lock().unwrap() = v;
                listened
            }
        })
        .await,
        "{}",
        answer.lock().unwrap()
    );
    assert!(
        eventually(PATIENCE, || async { providers(&two).await == 2 }).await,
        "instance 2 reloaded its own file"
    );
    assert_eq!(providers(&one).await, 1);
}

/// A session that moves to another provider on one instance moves on every instance that holds
/// it: instance 2 served it through A; after A failed for it on instance 1, instance 2 follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_moves_on_one_instance_moves_on_all() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let settings = redis_settings(&redis.url());
    let yaml = |name: &str| {
        config_yaml(
            &[("A", &a.url(), 1), ("B", &b.url(), 2)],
            &settings.replace("gw-1", name),
        )
    };
    let one = Balancer::start(&yaml("gw-1")).await;
    let two = Balancer::start(&yaml("gw-2")).await;
    let cluster = one.state.cluster.clone().unwrap();
    // Both up, and instance 2 listening to the cluster's events.
    assert!(
        eventually(PATIENCE, || {
            let cluster = cluster.clone();
            async move { cluster.publish_reload().await == Ok(1) }
        })
        .await
    );
    let session = [("x-claude-code-session-id", "session-m")];
    let resp = two
        .post_with("/v1/messages", &request(false), &session)
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "A");

    a.push(Reply::error(500, "api_error", "boom"));
    let resp = one
        .post_with("/v1/messages", &request(false), &session)
        .await;
    assert_eq!(
        resp.headers()["x-provider-used"],
        "B",
        "failed over on instance 1"
    );
    assert!(
        eventually(PATIENCE, || async {
            let now = tokio::time::Instant::now();
            two.state.affinity.get("session-m", "*", now).as_deref() == Some("B")
        })
        .await,
        "instance 2 heard that the session moved"
    );
    let resp = two
        .post_with("/v1/messages", &request(false), &session)
        .await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
}

/// Two instances on one Redis with providers A (answering 500) and B: one fault of A starts its
/// cooldown of `cooldown` seconds.
struct FailingA {
    a: MockProvider,
    b: MockProvider,
    settings: String,
    one: Balancer,
    two: Balancer,
}

impl FailingA {
    async fn start(redis: &RedisServer, cooldown: f64) -> Self {
        let a = MockProvider::start(Reply::error(500, "api_error", "A is broken"))
            .await
            .unwrap();
        let b = MockProvider::start(Reply::message("m", "from B"))
            .await
            .unwrap();
        let settings = format!(
            "  unhealthy_threshold: 1\n  failure_cooldown: {cooldown}\n{}",
            redis_settings(&redis.url())
        );
        let config = |name: &str| {
            config_yaml(
                &[("A", &a.url(), 1), ("B", &b.url(), 2)],
                &settings.replace("gw-1", name),
            )
        };
        let one = Balancer::start(&config("gw-1")).await;
        let two = Balancer::start(&config("gw-2")).await;
        all_up(&[&one, &two]).await;
        Self {
            a,
            b,
            settings,
            one,
            two,
        }
    }

    /// The configuration of another instance of the same cluster.
    fn config(&self, name: &str) -> String {
        config_yaml(
            &[("A", &self.a.url(), 1), ("B", &self.b.url(), 2)],
            &self.settings.replace("gw-1", name),
        )
    }
}

/// A provider that fails on one instance is skipped by the others during its cooldown (the
/// change is published, not polled), and after the cooldown exactly one instance probes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_health_is_shared_and_one_instance_probes() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let fleet = FailingA::start(&redis, 1.5).await;
    let (a, one, two) = (&fleet.a, &fleet.one, &fleet.two);

    let resp = one.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(a.request_count(), 1);
    assert!(
        eventually(PATIENCE, || async {
            two.provider("A").await["state"] == "cooling_down"
        })
        .await,
        "instance 2 learns that A is down"
    );
    let shown = two.provider("A").await;
    assert_eq!(shown["state_changed_by"], "gw-1", "{shown}");
    assert_eq!(
        shown["last_error"]
            .as_str()
            .map(|e| e.contains("A is broken")),
        Some(true)
    );
    for _ in 0..3 {
        let resp = two.post("/v1/messages", &request(false)).await;
        assert_eq!(resp.headers()["x-provider-used"], "B");
    }
    assert_eq!(
        a.request_count(),
        1,
        "instance 2 never paid for A's failure"
    );

    // The cooldown ends on both: requests on both at once, one probe in all.
    assert!(
        eventually(PATIENCE, || async {
            one.provider("A").await["state"] == "probing"
                && two.provider("A").await["state"] == "probing"
        })
        .await
    );
    let mut calls = Vec::new();
    for _ in 0..4 {
        for bal in [&one, &two] {
            calls.push(bal.post("/v1/messages", &request(false)));
        }
    }
    for resp in futures_util::future::join_all(calls).await {
        assert_eq!(resp.status(), 200);
    }
    assert_eq!(
        a.request_count(),
        2,
        "exactly one probe across the instances"
    );
    // The failed probe doubled the cooldown everywhere.
    for bal in [&one, &two] {
        assert!(
            eventually(PATIENCE, || async {
                let p = bal.provider("A").await;
                p["state"] == "cooling_down" && p["consecutive_failures"] == 2
            })
            .await
        );
    }

    // A new instance (or a restarted one) starts with what the cluster knows.
    let three = Balancer::start(&fleet.config("gw-3")).await;
    all_up(&[&three]).await;
    assert!(
        eventually(PATIENCE, || async {
            three.provider("A").await["state"] == "cooling_down"
        })
        .await,
        "health outlives an instance's restart"
    );
    let resp = three.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(a.request_count(), 2);
}

/// A probe that ends without a verdict (its client left) gives the cluster's probe lease back at
/// once: another instance probes the provider instead of waiting for the lease to run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_whose_client_leaves_gives_the_lease_back() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let fleet = FailingA::start(&redis, 1.0).await;
    let (a, one, two) = (&fleet.a, &fleet.one, &fleet.two);
    assert_eq!(
        one.post("/v1/messages", &request(false)).await.headers()["x-provider-used"],
        "B"
    );
    assert!(
        eventually(PATIENCE, || async {
            one.provider("A").await["state"] == "probing"
                && two.provider("A").await["state"] == "probing"
        })
        .await
    );
    // Instance 1 probes A, which takes its time; the client gives up first.
    a.set_default(Reply::message("m", "from A").with_delay(Duration::from_secs(3)));
    let impatient = one
        .client
        .post(format!("{}/v1/messages", one.url))
        .timeout(Duration::from_millis(300))
        .json(&request(false))
        .send()
        .await;
    assert!(impatient.is_err(), "the client gave up");
    assert_eq!(a.request_count(), 2, "the probe reached A");
    let conn = redis::Client::open(redis.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    assert!(
        eventually(PATIENCE, || {
            let mut conn = conn.clone();
            async move {
                let held: Vec<String> = redis::cmd("KEYS")
                    .arg("test:probe:*")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                held.is_empty()
            }
        })
        .await,
        "the lease was given back"
    );
    // Instance 2's next request probes A itself.
    let resp = two.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
    assert_eq!(a.request_count(), 3);
}

/// With the Redis backend, tokens charged on one instance count on every other: a client's token
/// window filled through instance 1 refuses it on instance 2.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_token_window_is_the_clusters() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let settings = redis_settings(&redis.url());
    let yaml = |name: &str| {
        config_yaml(&[("P", &p.url(), 1)], &settings.replace("gw-1", name))
            + "clients:\n  - name: alice\n    key: \"sk-alice-c\"\n    limits:\n      tokens: { window: 1h, max: 30 }\n"
    };
    let one = Balancer::start(&yaml("gw-1")).await;
    let two = Balancer::start(&yaml("gw-2")).await;
    all_up(&[&one, &two]).await;
    let ask = |bal: &Balancer| {
        bal.client
            .post(format!("{}/v1/messages", bal.url))
            .header("x-api-key", "sk-alice-c")
            .json(&request(false))
            .send()
    };
    // 17 tokens each: two answers on instance 1 fill the window (34 of 30).
    assert_eq!(ask(&one).await.unwrap().status(), 200);
    assert_eq!(ask(&one).await.unwrap().status(), 200);
    assert!(
        eventually(PATIENCE, || {
            let resp = ask(&two);
            async move {
                let resp = resp.await.unwrap();
                resp.status() == 429 && resp.text().await.unwrap().contains("30 tokens per 1h")
            }
        })
        .await,
        "instance 2 refuses alice"
    );
    // Instance 2 alone served nothing before the refusal came: at most the requests it admitted
    // before the charges arrived.
    assert!(p.request_count() <= 4, "{}", p.request_count());
}
