//! Three balancer processes (the real binary) sharing one real `redis-server`, with fake
//! providers in the test: shared health and its single probe, session affinity, the shared
//! cache, Redis killed under load, and start-up while Redis is unreachable or refuses the
//! password. Skipped when `redis-server` is not installed, unless `CB_REQUIRE_REDIS` is set (as
//! `.ci/run` does). Real time throughout: these are separate processes.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{MockProvider, RedisServer, Reply, eventually, free_port, providers_a_and_b};
use serde_json::{Value, json};

const PATIENCE: Duration = Duration::from_secs(15);
/// A request that takes longer than this has hung.
const HUNG: Duration = Duration::from_secs(20);

/// One balancer process with its own configuration file and log folder.
struct Instance {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    client: reqwest::Client,
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The configuration of instance `name`: providers A (priority 1) and B (priority 2) in route
/// `*`, the given extra settings, and the Redis state backend at `redis_url`.
fn config(
    name: &str,
    a: &str,
    b: &str,
    redis_url: &str,
    (settings, top): (&str, &str),
    (logs, data): (&str, &str),
) -> String {
    format!(
        "providers:\n  - {{name: A, type: anthropic, base_url: \"{a}\", auth_type: api_key, auth_value: key-a}}\n  - {{name: B, type: anthropic, base_url: \"{b}\", auth_type: api_key, auth_value: key-b}}\nmodel_routes:\n  \"*\":\n    - {{provider: A, model: passthrough, priority: 1}}\n    - {{provider: B, model: passthrough, priority: 2}}\nsettings:\n  log_file_path: \"{logs}\"\n  log_level: INFO\n  usage:\n    path: \"{data}/usage.db\"\n{settings}  state:\n    backend: redis\n    redis:\n      url: \"{redis_url}\"\n      key_prefix: \"fleet:\"\n    instance_name: {name}\n{top}"
    )
}

impl Instance {
    /// Starts the binary and waits until it answers `/health`.
    async fn start(name: &str, a: &str, b: &str, redis_url: &str, settings: &str) -> Self {
        Self::start_with_env(name, a, b, redis_url, (settings, ""), &[]).await
    }

    async fn start_with_env(
        name: &str,
        a: &str,
        b: &str,
        redis_url: &str,
        settings: (&str, &str),
        env: &[(&str, &std::path::Path)],
    ) -> Self {
        claude_balancer::upstream::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        let logs = dir.path().join("logs");
        let path: PathBuf = dir.path().join("config.yaml");
        std::fs::write(
            &path,
            config(
                name,
                a,
                b,
                redis_url,
                settings,
                (
                    &format!("{}/logs.jsonl", logs.display()),
                    &dir.path().display().to_string(),
                ),
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
            .arg("--config")
            .arg(&path)
            .args(["--port", &port.to_string()])
            .env("TOKIO_WORKER_THREADS", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("console.txt")).unwrap())
            .spawn()
            .unwrap();
        let instance = Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            dir,
            client: reqwest::Client::builder()
                .no_proxy()
                .timeout(HUNG)
                .build()
                .unwrap(),
        };
        assert!(
            eventually(PATIENCE, || async {
                instance.get("/health").await.is_some()
            })
            .await,
            "instance {name} did not start"
        );
        instance
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let resp = self
            .client
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .ok()?;
        resp.json().await.ok()
    }

    async fn backend(&self) -> Value {
        self.get("/health").await.unwrap()["state"].clone()
    }

    async fn provider(&self, name: &str) -> Value {
        common::provider_in(&self.get("/providers").await.unwrap(), name)
    }

    /// Sends a request; its status and the provider that served it.
    async fn ask(&self, session: Option<&str>, text: &str) -> (u16, String) {
        let mut req = self
            .client
            .post(format!("{}/v1/messages", self.url))
            .json(&json!({
                "model": "claude-sonnet-4-6",
                "max_tokens": 50,
                "messages": [{"role": "user", "content": text}]
            }));
        if let Some(s) = session {
            req = req.header("x-claude-code-session-id", s);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let provider = resp
            .headers()
            .get("x-provider-used")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let cache = resp
            .headers()
            .get("x-balancer-cache")
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let _ = resp.bytes().await.unwrap();
        (
            status,
            format!(
                "{provider}{}",
                if cache == "hit" { " (cache hit)" } else { "" }
            ),
        )
    }

    /// What the process wrote to its JSON log file(s), as one text.
    fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(entries) = std::fs::read_dir(self.dir.path().join("logs")) {
            for entry in entries {
                text.push_str(&std::fs::read_to_string(entry.unwrap().path()).unwrap());
            }
        }
        text
    }
}

/// Waits until every instance says its state backend is up (shared).
async fn all_up(instances: &[&Instance]) {
    for i in instances {
        assert!(
            eventually(PATIENCE, || async { i.backend().await["status"] == "up" }).await,
            "{}",
            i.backend().await
        );
    }
}

/// Three instances gw-1, gw-2, gw-3 on one Redis, with providers A and B.
async fn fleet(
    redis: &RedisServer,
    a: &MockProvider,
    b: &MockProvider,
    settings: &str,
) -> [Instance; 3] {
    fleet_with(redis, a, b, (settings, "")).await
}

/// [`fleet`] with top-level sections (`top`) added to each instance's configuration.
async fn fleet_with(
    redis: &RedisServer,
    a: &MockProvider,
    b: &MockProvider,
    settings: (&str, &str),
) -> [Instance; 3] {
    let (ua, ub, url) = (a.url(), b.url(), redis.url());
    let start = |name| Instance::start_with_env(name, &ua, &ub, &url, settings, &[]);
    let one = start("gw-1").await;
    let two = start("gw-2").await;
    let three = start("gw-3").await;
    all_up(&[&one, &two, &three]).await;
    [one, two, three]
}

/// A's failure on instance 1 keeps instances 2 and 3 away from A for its cooldown; after it,
/// exactly one of the three probes A. Run on a fresh fleet, and again after Redis was killed and
/// restarted (the instances share again without a restart).
async fn a_failure_is_shared_and_probed_once(fleet: &[Instance; 3], a: &MockProvider) {
    let [one, two, three] = fleet;
    a.set_default(Reply::error(500, "api_error", "A is broken"));
    let before = a.request_count();
    assert_eq!(one.ask(None, "first").await, (200, "B".to_owned()));
    assert_eq!(a.request_count(), before + 1);
    for other in [two, three] {
        assert!(
            eventually(PATIENCE, || async {
                other.provider("A").await["state"] == "cooling_down"
            })
            .await,
            "the failure reaches every instance"
        );
        assert_eq!(other.provider("A").await["state_changed_by"], "gw-1");
    }
    for round in 0..3 {
        for other in [two, three] {
            assert_eq!(other.ask(None, &format!("during {round}")).await.1, "B");
        }
    }
    assert_eq!(
        a.request_count(),
        before + 1,
        "no instance pays again for A during its cooldown"
    );

    // The cooldown ends: concurrent requests on all three, one probe among them.
    assert!(
        eventually(PATIENCE, || async {
            let mut all = true;
            for i in fleet {
                all &= i.provider("A").await["state"] == "probing";
            }
            all
        })
        .await
    );
    let texts: Vec<String> = (0..4).map(|n| format!("after {n}")).collect();
    let mut calls = Vec::new();
    for text in &texts {
        for i in fleet {
            calls.push(i.ask(None, text));
        }
    }
    for (status, _) in futures_util::future::join_all(calls).await {
        assert_eq!(status, 200);
    }
    assert_eq!(
        a.request_count(),
        before + 2,
        "exactly one probe across the three instances"
    );
    // The probe failed: every instance knows, with the doubled cooldown.
    for i in fleet {
        assert!(
            eventually(PATIENCE, || async {
                let p = i.provider("A").await;
                p["state"] == "cooling_down" && p["consecutive_failures"] == 2
            })
            .await
        );
    }
    // Heal A for whatever runs next.
    a.set_default(Reply::message("m", "from A"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_health_and_probe_once() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let fleet = fleet(
        &redis,
        &a,
        &b,
        "  unhealthy_threshold: 1\n  failure_cooldown: 2\n",
    )
    .await;
    a_failure_is_shared_and_probed_once(&fleet, &a).await;
}

/// A session served through instance 1 stays on its provider on instances 2 and 3, and an answer
/// cached on instance 1 is a hit on instance 3 until instance 2 clears the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_sessions_and_the_cache() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let [one, two, three] = fleet(
        &redis,
        &a,
        &b,
        "  unhealthy_threshold: 5\n  sticky_provider_duration: 300\n  max_cache_size: 100\n  cache_ttl: 300\n",
    )
    .await;

    // A fails this session's first request once, so it lands on B; A stays healthy (one fault
    // of five), so only the session's affinity keeps the next requests on B.
    a.push(Reply::error(500, "api_error", "once"));
    assert_eq!(
        one.ask(Some("session-1"), "turn 1").await,
        (200, "B".to_owned())
    );
    assert_eq!(two.ask(None, "no session").await, (200, "A".to_owned()));
    assert_eq!(
        two.ask(Some("session-1"), "turn 2").await,
        (200, "B".to_owned())
    );
    assert_eq!(
        three.ask(Some("session-1"), "turn 3").await,
        (200, "B".to_owned())
    );

    // The cache: made on 1, hit on 3, cleared from 2 for all. The entry is written to Redis
    // without the request waiting for it: once instance 1 itself hits, it is there for all.
    let served = a.request_count();
    assert_eq!(one.ask(None, "cache me").await, (200, "A".to_owned()));
    assert_eq!(a.request_count(), served + 1);
    assert!(
        eventually(PATIENCE, || async {
            one.ask(None, "cache me").await.1 == "A (cache hit)"
        })
        .await
    );
    let served = a.request_count();
    assert_eq!(
        three.ask(None, "cache me").await,
        (200, "A (cache hit)".to_owned())
    );
    assert_eq!(a.request_count(), served, "the hit cost no provider call");
    let cleared: Value = two
        .client
        .post(format!("{}/cache/clear", two.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(cleared["shared"]["cleared"], true, "{cleared}");
    assert_eq!(three.ask(None, "cache me").await, (200, "A".to_owned()));
    assert_eq!(a.request_count(), served + 1);
}

/// Redis is killed (SIGKILL) in the middle of load at concurrency 32 spread over the three
/// instances: no request fails or hangs. Started again, Redis is shared again without restarting
/// any instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_redis_under_load_fails_no_request_and_sharing_resumes() {
    let Some(mut redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let fleet = std::sync::Arc::new(
        fleet(
            &redis,
            &a,
            &b,
            "  unhealthy_threshold: 1\n  failure_cooldown: 2\n  sticky_provider_duration: 300\n",
        )
        .await,
    );
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for w in 0..32usize {
        let (fleet, stop) = (fleet.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            let mut results = Vec::new();
            let mut n = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let instance = &fleet[(w + n) % 3];
                let session = format!("session-{}", w % 8);
                results.push(
                    instance
                        .ask(Some(&session), &format!("load {w} {n}"))
                        .await
                        .0,
                );
                n += 1;
            }
            results
        }));
    }
    let served = || a.request_count() + b.request_count();
    let wait_for = |count: usize| async move {
        assert!(eventually(PATIENCE, || async { served() >= count }).await);
    };
    wait_for(served() + 200).await;
    redis.kill();
    for i in fleet.iter() {
        assert!(
            eventually(PATIENCE, || async {
                i.backend().await["status"] == "degraded"
            })
            .await
        );
    }
    wait_for(served() + 200).await;
    redis.restart();
    all_up(&[&fleet[0], &fleet[1], &fleet[2]]).await;
    wait_for(served() + 200).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total = 0;
    for w in workers {
        let results = w.await.unwrap();
        total += results.len();
        assert!(results.iter().all(|s| *s == 200), "{results:?}");
    }
    assert!(total >= 600, "{total}");
    for i in fleet.iter() {
        let logs = i.logs();
        assert_eq!(
            logs.matches("state backend redis is unreachable").count(),
            1,
            "the loss of Redis is logged once, not per request"
        );
    }
    a_failure_is_shared_and_probed_once(&fleet, &a).await;
}

/// Started while Redis is unreachable (instance 1) or refuses its password (instance 2): both
/// serve, report degraded, and share as soon as Redis accepts them, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_start_without_redis_and_recover_when_it_comes() {
    let Some(mut guarded) = RedisServer::start(Some("the-right-pass-31")) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let absent_port = free_port();
    let absent = format!("redis://127.0.0.1:{absent_port}/0");
    let wrong = format!("redis://:the-wrong-pass-42@127.0.0.1:{}/0", guarded.port);
    let one = Instance::start("gw-1", &a.url(), &b.url(), &absent, "").await;
    let two = Instance::start("gw-2", &a.url(), &b.url(), &wrong, "").await;
    for i in [&one, &two] {
        for n in 0..3 {
            assert_eq!(i.ask(None, &format!("hello {n}")).await.0, 200);
        }
        assert!(
            eventually(PATIENCE, || async {
                let s = i.backend().await;
                // Failed at least once (before the first ping, it is "not connected yet").
                s["status"] == "degraded"
                    && s["shared"] == false
                    && s["error"].is_string()
                    && s["error"] != "not connected yet"
            })
            .await
        );
        let providers = i.get("/providers").await.unwrap();
        assert_eq!(providers["state"]["shared"], false);
    }
    // Each says why, without the password.
    let why = |s: Value| s["error"].as_str().unwrap_or_default().to_lowercase();
    assert!(
        why(one.backend().await).contains("refused"),
        "{}",
        one.backend().await
    );
    let refused = why(two.backend().await);
    assert!(
        refused.contains("authentication") && !refused.contains("the-wrong-pass-42"),
        "{refused}"
    );

    // Redis appears where instance 1 looks for it; instance 2's Redis now takes its password.
    let _absent = RedisServer::start_on(absent_port, None).unwrap();
    guarded.kill();
    let _guarded = RedisServer::start_on(guarded.port, Some("the-wrong-pass-42")).unwrap();
    all_up(&[&one, &two]).await;
    for i in [&one, &two] {
        assert_eq!(i.ask(None, "after").await.0, 200);
        // The log file is written in the background: wait for the line of the recovery.
        assert!(
            eventually(PATIENCE, || async {
                i.logs().matches("state backend redis is up").count() == 1
            })
            .await
        );
        let logs = i.logs();
        assert_eq!(
            logs.matches("state backend redis is unreachable").count(),
            1,
            "{logs}"
        );
        assert!(!logs.contains("the-wrong-pass-42") && !logs.contains("the-right-pass-31"));
    }
}

/// A certificate authority and a certificate for 127.0.0.1 signed by it, written as `ca.pem`,
/// `server.pem` and `server.key` in a new folder.
fn certificates() -> tempfile::TempDir {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca_cert.pem()).unwrap();
    std::fs::write(dir.path().join("server.pem"), server.pem()).unwrap();
    std::fs::write(dir.path().join("server.key"), key.serialize_pem()).unwrap();
    dir
}

/// A `rediss://` URL connects over TLS, and the server's certificate is verified: trusted
/// through `SSL_CERT_FILE` it is up, untrusted it is degraded (and the instance still serves).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rediss_url_connects_over_verified_tls() {
    let certs = certificates();
    let Some(redis) = RedisServer::start_tls(certs.path()) else {
        return;
    };
    let url = redis.url();
    assert!(url.starts_with("rediss://"), "{url}");
    let (a, b) = providers_a_and_b().await;
    let ca = certs.path().join("ca.pem");
    let trusting = Instance::start_with_env(
        "gw-1",
        &a.url(),
        &b.url(),
        &url,
        ("", ""),
        &[("SSL_CERT_FILE", &ca)],
    )
    .await;
    // A file holding no certificate: the system's store is used, which does not know this CA.
    let empty = certs.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    let doubting = Instance::start_with_env(
        "gw-2",
        &a.url(),
        &b.url(),
        &url,
        ("", ""),
        &[("SSL_CERT_FILE", &empty)],
    )
    .await;
    all_up(&[&trusting]).await;
    assert!(
        eventually(PATIENCE, || async {
            let s = doubting.backend().await;
            s["status"] == "degraded"
                && s["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("certificate"))
        })
        .await
    );
    for i in [&trusting, &doubting] {
        assert_eq!(i.ask(None, "over tls").await.0, 200);
    }
}

/// A named client's limit of 10 requests per minute holds for the cluster: 15 requests spread
/// over three instances get 10 answers and 5 refusals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_limit_holds_across_three_instances() {
    let Some(redis) = RedisServer::start(None) else {
        return;
    };
    let (a, b) = providers_a_and_b().await;
    let fleet = fleet_with(
        &redis,
        &a,
        &b,
        (
            "",
            "clients:\n  - name: alice\n    key: \"sk-alice-fleet\"\n    limits:\n      requests_per_minute: 10\n",
        ),
    )
    .await;
    let mut statuses = Vec::new();
    for n in 0..15 {
        let i = &fleet[n % 3];
        let resp = i
            .client
            .post(format!("{}/v1/messages", i.url))
            .header("x-api-key", "sk-alice-fleet")
            .json(&json!({"model": "claude-sonnet-4-6", "max_tokens": 5, "messages": [{"role": "user", "content": format!("n{n}")}]}))
            .send()
            .await
            .unwrap();
        if resp.status() == 429 {
            let retry: u64 = resp.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=60).contains(&retry));
        }
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 200).count(),
        10,
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == 429).count(),
        5,
        "{statuses:?}"
    );
    assert_eq!(a.request_count() + b.request_count(), 10);

    // The usage report is the cluster's: instance 3 reports what all three served.
    let third = &fleet[2];
    let usage_of_alice = || async {
        let v: Value = third
            .client
            .get(format!("{}/usage?group_by=client", third.url))
            .header("x-api-key", "sk-alice-fleet")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let requests = v["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["client"] == "alice")
            .map_or(0, |r| r["requests"].as_u64().unwrap());
        (v["scope"].clone(), requests)
    };
    assert!(
        eventually(PATIENCE, || async {
            usage_of_alice().await == (json!("cluster"), 10)
        })
        .await,
        "{:?}",
        usage_of_alice().await
    );
    let out = Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
        .args(["usage", "--group-by", "client", "--config"])
        .arg(third.dir.path().join("config.yaml"))
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("the cluster's usage in redis"), "{table}");
    let alice: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("alice"))
        .unwrap_or_else(|| panic!("{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(alice[1], "10", "{table}");
}
