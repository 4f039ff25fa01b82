//! Operations in-process: request ids, the overhead header, metrics, the dashboard data, inbound and
//! admin keys, the concurrency limit, slow clients, and graceful shutdown.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECS: Duration = Duration::from_secs(1);

async fn two(settings: &str) -> (MockProvider, MockProvider, Balancer) {
    two_providers(
        Reply::message("m", "from A"),
        Reply::message("m", "from B"),
        settings,
    )
    .await
}

async fn metrics(bal: &Balancer) -> String {
    bal.get_text("/metrics").await
}

fn metric_value(text: &str, line_prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn request_ids_and_the_overhead_header() {
    let (_a, _b, bal) = two("").await;
    let resp = bal
        .post_with(
            "/v1/messages",
            &request(false),
            &[("x-request-id", "client-id-42")],
        )
        .await;
    assert_eq!(resp.headers()["x-request-id"], "client-id-42");
    let overhead: f64 = resp.headers()["x-balancer-overhead-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(overhead >= 0.0);
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert!(
        resp.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .starts_with("req_")
    );
    // Errors carry them too.
    let resp = bal
        .client
        .post(format!("{}/v1/messages", bal.url))
        .body("{")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert!(resp.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn metrics_change_as_requests_flow() {
    let (a, _b, bal) = two("  failure_cooldown: 0\n").await;
    let before = metrics(&bal).await;
    assert!(
        before.contains("# TYPE claude_balancer_requests_in_flight gauge"),
        "{before}"
    );
    assert!(
        !before.contains("claude_balancer_requests_total{"),
        "{before}"
    );
    bal.post("/v1/messages", &request(false))
        .await
        .text()
        .await
        .unwrap();
    a.push(Reply::error(503, "api_error", "down"));
    let mut body = request(true);
    body["messages"][0]["content"] = json!("second");
    b_default_stream(&_b);
    bal.post("/v1/messages", &body).await.text().await.unwrap();
    let after = metrics(&bal).await;
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_requests_total{route=\"*\",provider=\"A\",status=\"200\",front=\"anthropic\"}"
        ),
        1.0,
        "{after}"
    );
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_requests_total{route=\"*\",provider=\"B\",status=\"200\",front=\"anthropic\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_attempts_total{provider=\"A\",outcome=\"fault_overloaded\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_failovers_total{reason=\"overloaded\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&after, "claude_balancer_request_duration_seconds_count"),
        2.0
    );
    assert_eq!(
        metric_value(&after, "claude_balancer_overhead_seconds_count"),
        2.0
    );
    assert_eq!(
        metric_value(&after, "claude_balancer_requests_in_flight"),
        0.0
    );
    assert!(
        metric_value(
            &after,
            "claude_balancer_tokens_total{provider=\"A\",kind=\"input\"}"
        ) > 0.0
    );
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_cache_results_total{result=\"miss\"}"
        ),
        2.0
    );
    assert_eq!(
        metric_value(
            &after,
            "claude_balancer_provider_state{provider=\"A\",state=\"probing\"}"
        ),
        1.0,
        "{after}"
    );
    bal.client
        .post(format!("{}/providers/reload", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        metric_value(
            &metrics(&bal).await,
            "claude_balancer_reloads_total{result=\"ok\"}"
        ),
        1.0
    );
}

fn b_default_stream(b: &MockProvider) {
    b.set_default(Reply::message_stream("m", "from B"));
}

#[tokio::test]
async fn the_dashboard_is_self_contained_and_its_data_moves() {
    let (_a, _b, bal) = two("").await;
    let page = bal
        .client
        .get(format!("{}/dashboard", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.headers()["content-type"], "text/html; charset=utf-8");
    let html = page.text().await.unwrap();
    assert!(html.contains("/dashboard/data"));
    for external in ["src=\"http", "href=\"http", "@import", "url(http"] {
        assert!(
            !html.contains(external),
            "the page loads something from outside: {external}"
        );
    }
    let (_, d0) = bal.get_json("/dashboard/data").await;
    assert_eq!(d0["providers"].as_array().unwrap().len(), 2);
    assert_eq!(d0["totals"]["requests"], 0);
    bal.post("/v1/messages", &request(false))
        .await
        .text()
        .await
        .unwrap();
    let (_, d1) = bal.get_json("/dashboard/data").await;
    assert_eq!(d1["totals"]["requests"], 1);
    let series = d1["recent"]["series"].as_array().unwrap();
    assert_eq!(series.last().unwrap()["requests"], 1);
    assert!(d1["recent"]["latency_ms"]["ttfb"]["p50"].is_number());
}

fn auth_yaml(url: &str, auth: &str) -> String {
    config_yaml(&[("A", url, 1)], &format!("  auth:\n{auth}"))
}

#[tokio::test]
async fn inbound_keys_are_enforced() {
    let a = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&auth_yaml(
        &a.url(),
        "    enabled: true\n    api_keys: [\"client-key-1\"]\n    exempt_paths: [\"/health\"]\n",
    ))
    .await;
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 401);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"]["type"], "authentication_error");
    assert_eq!(
        bal.post_with(
            "/v1/messages",
            &request(false),
            &[("x-api-key", "client-key-2")]
        )
        .await
        .status(),
        401
    );
    assert_eq!(
        bal.post_with(
            "/v1/messages",
            &request(false),
            &[("x-api-key", "client-key-1")]
        )
        .await
        .status(),
        200
    );
    assert_eq!(
        bal.post_with(
            "/v1/messages",
            &request(false),
            &[("authorization", "Bearer client-key-1")]
        )
        .await
        .status(),
        200
    );
    let health = bal
        .client
        .get(format!("{}/health", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "exempt path");
    let providers = bal
        .client
        .get(format!("{}/providers", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(providers.status(), 401);
    // The provider has its own key; the balancer's inbound key never reaches it.
    assert_eq!(a.requests()[0].header("x-api-key"), Some("key-A"));
}

#[tokio::test]
async fn admin_endpoints_need_an_admin_key_when_one_is_set() {
    let a = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let bal = Balancer::start(&auth_yaml(&a.url(), "    admin_keys: [\"admin-key-9\"]\n")).await;
    // Model traffic stays open (auth.enabled is false).
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        200
    );
    for (method, path) in [
        ("GET", "/providers"),
        ("POST", "/providers/reload"),
        ("GET", "/metrics"),
        ("GET", "/dashboard"),
        ("POST", "/cache/clear"),
    ] {
        let url = format!("{}{path}", bal.url);
        let req = if method == "GET" {
            bal.client.get(&url)
        } else {
            bal.client.post(&url)
        };
        assert_eq!(
            req.send().await.unwrap().status(),
            401,
            "{path} without a key"
        );
    }
    let ok = bal
        .client
        .get(format!("{}/providers", bal.url))
        .header("x-api-key", "admin-key-9")
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let page = bal
        .client
        .get(format!("{}/dashboard?key=admin-key-9", bal.url))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), 200);
    let wrong = bal
        .client
        .get(format!("{}/metrics", bal.url))
        .header("authorization", "Bearer nope")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
}

#[tokio::test(start_paused = true)]
async fn the_concurrency_limit_answers_529_and_recovers() {
    let a = MockProvider::start(Reply::message("m", "ok").with_delay(5 * SECS))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  max_concurrent_requests: 1\n",
    ))
    .await;
    let first = bal.post("/v1/messages", &request(false));
    let mut other = request(false);
    other["messages"][0]["content"] = json!("another");
    let second = async {
        tokio::time::sleep(SECS).await;
        bal.post("/v1/messages", &other).await
    };
    let (r1, r2) = tokio::join!(first, second);
    assert_eq!(r1.status(), 200);
    assert_eq!(r2.status(), 529);
    assert_eq!(r2.headers()["retry-after"], "1");
    let v: Value = r2.json().await.unwrap();
    assert_eq!(v["error"]["type"], "overloaded_error");
    r1.text().await.unwrap();
    // Recovered once the first one is done.
    assert_eq!(bal.post("/v1/messages", &other).await.status(), 200);
}

#[tokio::test(start_paused = true)]
async fn slow_clients_are_cut_off() {
    let (_a, _b, bal) = two("").await;
    // A body that never completes: 408 after the body timeout.
    let mut tcp = tokio::net::TcpStream::connect(bal.addr).await.unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= claude_balancer::inbound::BODY_READ_TIMEOUT);
    // Headers that never complete: the connection is closed.
    let mut tcp = tokio::net::TcpStream::connect(bal.addr).await.unwrap();
    tcp.write_all(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\n")
        .await
        .unwrap();
    let started = tokio::time::Instant::now();
    let n = tcp.read(&mut buf).await.unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
    assert!(started.elapsed() >= claude_balancer::server::HEADER_READ_TIMEOUT);
}

#[tokio::test(start_paused = true)]
async fn shutdown_lets_streams_finish_then_cuts_the_rest_with_an_error_event() {
    let a = MockProvider::start(Reply::message("m", "x")).await.unwrap();
    let mut bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  shutdown_grace_seconds: 10\n",
    ))
    .await;
    let parts =
        mock_provider::split_events(&mock_provider::anthropic_stream("m", "one two three four"));
    let slow = |gap: Duration| {
        Reply::sse_chunks(
            parts
                .iter()
                .map(|e| (gap, e.clone().into_bytes()))
                .collect(),
            End::Complete,
        )
    };
    // A stream of about 9 s finishes within the 10 s grace period.
    a.push(slow(SECS));
    let resp = bal.post("/v1/messages", &request(true)).await;
    let server = bal.shutdown();
    let text = resp.text().await.unwrap();
    assert_eq!(
        names(&events(&text)).last(),
        Some(&"message_stop"),
        "{text}"
    );
    server.await.unwrap();
    // New connections are refused once the server has stopped.
    assert!(tokio::net::TcpStream::connect(bal.addr).await.is_err());

    // A stream longer than the grace period ends with an error event.
    let a = MockProvider::start(Reply::message("m", "x")).await.unwrap();
    let mut bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  shutdown_grace_seconds: 3\n",
    ))
    .await;
    a.push(slow(2 * SECS));
    let resp = bal.post("/v1/messages", &request(true)).await;
    let started = tokio::time::Instant::now();
    let server = bal.shutdown();
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(names(&ev).last(), Some(&"error"), "{text}");
    assert!(
        ev.last().unwrap().1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("shutting down")
    );
    server.await.unwrap();
    assert!(started.elapsed() < 10 * SECS);
}

/// The concurrency permit is held by the response body: a stream whose head has gone out still
/// counts until its last byte, and frees its place the moment it ends.
#[tokio::test(start_paused = true)]
async fn a_stream_holds_its_concurrency_permit_until_its_body_ends() {
    let events = mock_provider::split_events(&mock_provider::anthropic_stream("m", "slowly"));
    let a = MockProvider::start(Reply::sse_chunks(
        events.into_iter().map(|e| (SECS, e.into_bytes())).collect(),
        End::Complete,
    ))
    .await
    .unwrap();
    let bal = Balancer::start(&config_yaml(
        &[("A", &a.url(), 1)],
        "  max_concurrent_requests: 1\n  deduplication:\n    enabled: false\n",
    ))
    .await;
    let stream = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(stream.status(), 200, "the stream's head is out");
    let mut other = request(false);
    other["messages"][0]["content"] = json!("another");
    assert_eq!(
        bal.post("/v1/messages", &other).await.status(),
        529,
        "the open stream still holds the only permit"
    );
    let text = stream.text().await.unwrap();
    assert!(text.contains("message_stop"));
    a.set_default(Reply::message("m", "ok"));
    assert_eq!(bal.post("/v1/messages", &other).await.status(), 200);
}

/// Client strings are bounded: a model or provider name past 256 bytes is refused with a 400
/// naming the field; a huge session id is accepted (hashed to a bounded key).
#[tokio::test]
async fn oversized_client_strings_are_bounded() {
    let (_a, _b, bal) = two("").await;
    let mut body = request(false);
    body["model"] = json!("m".repeat(257));
    let resp = bal.post("/v1/messages", &body).await;
    assert_eq!(resp.status(), 400);
    let v: Value = resp.json().await.unwrap();
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("model: longer than 256"),
        "{v}"
    );
    let mut body = request(false);
    body["provider"] = json!("p".repeat(257));
    assert_eq!(bal.post("/v1/messages", &body).await.status(), 400);
    for round in 0..3 {
        let mut body = request(false);
        body["metadata"] =
            json!({"user_id": format!("user_x_account__session_{}", "s".repeat(4 << 20))});
        body["messages"][0]["content"] = json!(format!("round {round}"));
        assert_eq!(bal.post("/v1/messages", &body).await.status(), 200);
    }
    assert_eq!(bal.state.affinity.len(), 1, "one (hashed) session");
}

/// The binary serves connections on one single-threaded runtime per core: the accepting runtime
/// hands each new connection to the next one in turn, and a graceful shutdown still waits for
/// the streams open on all of them. Real time: the worker runtimes run on their own threads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_are_spread_over_worker_runtimes_and_drained_at_shutdown() {
    let a = MockProvider::start(Reply::message("m", "x")).await.unwrap();
    let mut loaded =
        claude_balancer::config::load_str(&config_yaml(&[("A", &a.url(), 1)], ""), &|_| None)
            .unwrap();
    loaded.config.settings.usage.path = String::new();
    let state = claude_balancer::state::AppState::new(loaded.config, None).unwrap();
    let mut threads = Vec::new();
    let mut handles = Vec::new();
    for _ in 0..2 {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        handles.push(runtime.handle().clone());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        threads.push((
            stop,
            std::thread::spawn(move || {
                runtime.block_on(async {
                    let _ = stopped.await;
                })
            }),
        ));
    }
    let alive = |h: &tokio::runtime::Handle| h.metrics().num_alive_tasks();
    let before: Vec<usize> = handles.iter().map(alive).collect();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (shutdown, on_shutdown) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let handles = handles.clone();
        tokio::spawn(async move {
            claude_balancer::server::serve_on(
                listener,
                state,
                async {
                    let _ = on_shutdown.await;
                },
                &handles,
            )
            .await
        })
    };
    let parts =
        mock_provider::split_events(&mock_provider::anthropic_stream("m", "one two three four"));
    let slow = Reply::sse_chunks(
        parts
            .iter()
            .map(|e| (Duration::from_millis(150), e.clone().into_bytes()))
            .collect(),
        End::Complete,
    );
    // Two streams on two connections: one on each worker runtime.
    a.push(slow.clone());
    a.push(slow);
    let post = |url: String| async move {
        // A new client each time: a new connection each time.
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        client
            .post(format!("{url}/v1/messages"))
            .json(&request(true))
            .send()
            .await
            .unwrap()
    };
    let (r1, r2) = tokio::join!(post(url.clone()), post(url.clone()));
    let during: Vec<usize> = handles.iter().map(alive).collect();
    for (b, d) in before.iter().zip(&during) {
        // Beyond its timer ticker, each worker runtime runs a connection (and its upstream one).
        assert!(
            *d >= b + 2,
            "each worker runtime serves a connection: {before:?} -> {during:?}"
        );
    }
    // Shut down while both streams are open: both still end with message_stop.
    shutdown.send(()).unwrap();
    for r in [r1, r2] {
        let text = r.text().await.unwrap();
        assert_eq!(
            names(&events(&text)).last(),
            Some(&"message_stop"),
            "{text}"
        );
    }
    server.await.unwrap().unwrap();
    for (stop, thread) in threads {
        stop.send(()).unwrap();
        thread.join().unwrap();
    }
}
