//! The soak test: many requests at concurrency 64 against the real binary, a few percent of random
//! provider faults, and a configuration reload every second. Afterwards: no request lost or
//! malformed, nothing in flight, memory back near its start, no file descriptor leaked.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/soak --requests 40000
//! ```
//! `.ci/run` runs a shortened form. Prints "soak: N passed, M failed" (requests plus end checks).

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use claude_balancer::adapter::events::accumulate_sse;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use mock_provider::{MockProvider, Reply};
use serde_json::{Value, json};
use tokio::time::Instant;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const FAULTS: &[&str] = &[
    r#"{"kind":"status","status":500}"#,
    r#"{"kind":"status","status":529,"retry_after":"1"}"#,
    r#"{"kind":"status","status":429,"retry_after":"1"}"#,
    r#"{"kind":"drop_before_headers"}"#,
    r#"{"kind":"drop_mid_stream","after":4}"#,
    r#"{"kind":"error_in_stream"}"#,
    r#"{"kind":"malformed_json"}"#,
    r#"{"kind":"truncated_sse"}"#,
    r#"{"kind":"status","status":400}"#,
];

fn config(a1: &str, a2: &str, o1: &str, round: usize, logs: &std::path::Path) -> String {
    let strategy = if round.is_multiple_of(2) {
        "priority"
    } else {
        "round_robin"
    };
    format!(
        "providers:\n  - {{name: A1, type: anthropic, base_url: \"{a1}\", auth_type: api_key, auth_value: k1}}\n  - {{name: A2, type: anthropic, base_url: \"{a2}\", auth_type: api_key, auth_value: k2}}\n  - {{name: O1, type: openai, base_url: \"{o1}/v1\", auth_type: api_key, auth_value: k3}}\nmodel_routes:\n  \"*claude*\":\n    - {{provider: A1, model: passthrough, priority: 1}}\n    - {{provider: A2, model: passthrough, priority: 1}}\n  \"*gpt*\":\n    - {{provider: O1, model: mock-model, priority: 1}}\n    - {{provider: A2, model: claude-fallback, priority: 2}}\nsettings:\n  selection_strategy: {strategy}\n  failure_cooldown: 1\n  log_file_path: \"{0}/logs.jsonl\"\n  usage:\n    path: \"{0}/usage.db\"\n  timeouts:\n    streaming:\n      read_timeout: 5\n    non_streaming:\n      read_timeout: 5\n",
        logs.display()
    )
}

fn rss_kb(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Checks one answer: a valid message or stream, or a well-formed Anthropic error.
fn valid(status: u16, body: &[u8], stream: bool) -> Result<(), String> {
    let text = String::from_utf8_lossy(body);
    if status != 200 {
        let v: Value = serde_json::from_str(&text)
            .map_err(|_| format!("{status} with a non-JSON body: {text}"))?;
        if v["type"] == "error"
            && v["error"]["type"].is_string()
            && v["error"]["message"].is_string()
            && v.get("message").is_none()
        {
            return Ok(());
        }
        return Err(format!("{status} not Anthropic-shaped: {text}"));
    }
    if stream {
        return match accumulate_sse(&text) {
            Ok(_) => Ok(()),
            Err(e)
                if e.starts_with("error event")
                    && text.trim_end().ends_with('}')
                    && !text.contains("message_stop") =>
            {
                Ok(())
            }
            Err(e) => Err(format!("invalid stream ({e}): {text}")),
        };
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|_| format!("200 with a non-JSON body: {text}"))?;
    if v["type"] == "message" && v["stop_reason"].is_string() {
        Ok(())
    } else {
        Err(format!("not a message: {text}"))
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let requests: usize = args
        .iter()
        .position(|a| a == "--requests")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let concurrency = 64;
    let dir = std::env::temp_dir().join(format!("cb-soak-{}", std::process::id()));
    let _ = std::fs::create_dir_all(dir.join("logs"));
    let start_mock = || async { MockProvider::start(Reply::Model).await };
    // About one request in 33 first queues a random fault at a random provider (`/_mock/push`).
    let (Ok(a1), Ok(a2), Ok(o1)) = (start_mock().await, start_mock().await, start_mock().await)
    else {
        eprintln!("cannot start the fake providers");
        std::process::exit(2);
    };
    let cfg = dir.join("config.yaml");
    let _ = std::fs::write(
        &cfg,
        config(&a1.url(), &a2.url(), &o1.url(), 0, &dir.join("logs")),
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0);
    let exe = std::env::current_exe()
        .unwrap_or_default()
        .with_file_name("claude-balancer");
    let Ok(mut child) = Command::new(exe)
        .arg("--config")
        .arg(&cfg)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        eprintln!("cannot start claude-balancer (build the workspace binaries first)");
        std::process::exit(2);
    };
    let pid = child.id();
    let url = format!("http://127.0.0.1:{port}");
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(256)
        .build(connector);
    let get = |path: &str| {
        let c = client.clone();
        let u = format!("{url}{path}");
        async move {
            let req = Request::get(u).body(Full::new(Bytes::new())).ok()?;
            let resp = c.request(req).await.ok()?;
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some(String::from_utf8_lossy(&body).into_owned())
        }
    };
    for _ in 0..400 {
        if get("/health").await.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Warm up, then take the baseline.
    for i in 0..200 {
        let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 50, "messages": [{"role": "user", "content": format!("warm {i}")}]});
        let req = Request::post(format!("{url}/v1/messages"))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())));
        if let Ok(req) = req
            && let Ok(r) = client.request(req).await
        {
            let _ = r.into_body().collect().await;
        }
    }
    let rss_start = rss_kb(pid);
    let fds_start = fds(pid);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let reloads = Arc::new(AtomicUsize::new(0));

    // Reload every second.
    let reloader = {
        let (stop, cfg, client, url, reloads) = (
            Arc::clone(&stop),
            cfg.clone(),
            client.clone(),
            url.clone(),
            Arc::clone(&reloads),
        );
        let (u1, u2, u3, logs) = (a1.url(), a2.url(), o1.url(), dir.join("logs"));
        tokio::spawn(async move {
            let mut round = 1;
            while !stop.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let _ = std::fs::write(&cfg, config(&u1, &u2, &u3, round, &logs));
                if let Ok(req) =
                    Request::post(format!("{url}/providers/reload")).body(Full::new(Bytes::new()))
                    && let Ok(r) = client.request(req).await
                {
                    if r.status().is_success() {
                        reloads.fetch_add(1, Ordering::Relaxed);
                    }
                    let _ = r.into_body().collect().await;
                }
                round += 1;
            }
        })
    };

    let started = Instant::now();
    let bad = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let ok = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..concurrency {
        let (client, url, counter, bad, ok) = (
            client.clone(),
            url.clone(),
            Arc::clone(&counter),
            Arc::clone(&bad),
            Arc::clone(&ok),
        );
        let mock_for_faults = [a1.url(), a2.url(), o1.url()];
        let fault_client = client.clone();
        workers.push(tokio::spawn(async move {
            loop {
                let i = counter.fetch_add(1, Ordering::Relaxed);
                if i >= requests {
                    break;
                }
                // About one request in 33 first queues a fault at a random provider.
                if fastrand_like(i, w).is_multiple_of(33) {
                    let spec = FAULTS[i % FAULTS.len()];
                    let target = &mock_for_faults[i % 3];
                    if let Ok(req) = Request::post(format!("{target}/_mock/push")).body(Full::new(Bytes::from(spec.to_owned())))
                        && let Ok(r) = fault_client.request(req).await {
                            let _ = r.into_body().collect().await;
                        }
                }
                let stream = i % 2 == 0;
                let model = if i % 3 == 0 { "gpt-soak" } else { "claude-sonnet-4-6" };
                // One request in ten repeats an earlier one (coalescing and cache paths).
                let content = if i % 10 == 0 { "repeat".to_owned() } else { format!("soak request {i}") };
                let body = json!({"model": model, "max_tokens": 100, "stream": stream, "messages": [{"role": "user", "content": content}]});
                let req = Request::post(format!("{url}/v1/messages"))
                    .header("content-type", "application/json")
                    .header("x-api-key", "soak-client")
                    .body(Full::new(Bytes::from(body.to_string())));
                let Ok(req) = req else { continue };
                let outcome = tokio::time::timeout(Duration::from_secs(60), async {
                    let resp = client.request(req).await.map_err(|e| format!("request lost: {e}"))?;
                    let status = resp.status().as_u16();
                    let body = resp.into_body().collect().await.map_err(|e| format!("body lost: {e}"))?.to_bytes();
                    valid(status, &body, stream)
                })
                .await;
                match outcome {
                    Ok(Ok(())) => {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => bad.lock().unwrap_or_else(|p| p.into_inner()).push(e),
                    Err(_) => bad.lock().unwrap_or_else(|p| p.into_inner()).push("no answer within 60 s".into()),
                }
            }
        }));
    }
    for w in workers {
        let _ = w.await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = reloader.await;
    let elapsed = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let metrics = get("/metrics").await.unwrap_or_default();
    let in_flight = metrics
        .lines()
        .find(|l| l.starts_with("claude_balancer_requests_in_flight "))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("?")
        .to_owned();
    let rss_end = rss_kb(pid);
    let fds_end = fds(pid);
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);

    let bad = bad.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let ok = ok.load(Ordering::Relaxed);
    println!(
        "{requests} requests in {:.1} s at concurrency {concurrency}, {} reloads: {ok} valid, {} lost or malformed",
        elapsed.as_secs_f64(),
        reloads.load(Ordering::Relaxed),
        bad.len()
    );
    for b in bad.iter().take(10) {
        println!("  {b}");
    }
    let mut checks_failed = 0;
    let mut check = |name: &str, pass: bool, detail: String| {
        println!("{} {name}: {detail}", if pass { "ok  " } else { "FAIL" });
        if !pass {
            checks_failed += 1;
        }
    };
    check(
        "requests in flight back to 0",
        in_flight == "0",
        in_flight.clone(),
    );
    let grown = rss_end.saturating_sub(rss_start);
    check(
        "memory back near its start",
        grown < 32 * 1024,
        format!("{rss_start} kB → {rss_end} kB"),
    );
    // Idle keep-alive connections stay pooled (the client's, and up to one per worker and provider
    // upstream); a leak grows with the request count, far past this bound.
    let fd_bound = fds_start + concurrency * 4 + 16;
    check(
        "no file descriptor leaked",
        fds_end <= fd_bound,
        format!("{fds_start} → {fds_end} (bound {fd_bound}, pooled connections included)"),
    );
    check(
        "reloads applied",
        reloads.load(Ordering::Relaxed) as f64 >= (elapsed.as_secs_f64() - 2.0).max(1.0) * 0.5,
        format!("{}", reloads.load(Ordering::Relaxed)),
    );
    // Five checks: every answer valid, and the four end checks.
    let failed = usize::from(!bad.is_empty()) + checks_failed;
    println!("soak: {} passed, {failed} failed", 5 - failed);
    if !bad.is_empty() || checks_failed > 0 {
        std::process::exit(1);
    }
}

/// A cheap deterministic spread (no RNG dependency).
fn fastrand_like(i: usize, w: usize) -> usize {
    let mut x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (w as u64).rotate_left(17);
    x ^= x >> 31;
    x as usize
}
