//! The benchmark: the same load, in the same run and in alternating rounds, sent directly to a fake
//! provider, through a bare byte-forwarding hyper proxy (the floor any gateway is compared with),
//! and through claude-balancer. It prints one table and writes BENCHMARKS.md.
//!
//! ```text
//! cargo build --release --workspace --bins && target/release/bench [--quick] [--out BENCHMARKS.md]
//! ```
//! Everything listens on 127.0.0.1; the load is bounded by request counts.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mock_provider::{End, MockProvider, Reply};
use serde_json::json;

type HttpClient = Client<HttpConnector, Full<Bytes>>;

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// Replaced in every request body by a request number, so that no two requests are identical
/// (identical requests in flight would be coalesced by the balancer's defaults).
const MARK: &str = "#00000000";

/// The main arm: claude-balancer with the shipped example configuration's settings (coalescing
/// and session affinity on, an INFO console line and a JSON file line per request), sent
/// requests that carry a Claude Code session id.
const SHIPPED_ARM: &str = "claude-balancer, as shipped";
/// For attribution: the same with coalescing and session affinity off.
const PLAIN_ARM: &str = "claude-balancer, coalescing and affinity off";
/// The shipped settings with the Redis state backend (a local `redis-server`), when installed.
const REDIS_ARM: &str = "claude-balancer, as shipped, redis state backend";
/// The shipped settings, with the requests' key a named client with every kind of limit (set so
/// high that none refuses): identified, admitted and charged on every request.
const CLIENT_ARM: &str = "claude-balancer, as shipped, named client with limits";
/// The same settings with a route that states a context window and has `when:` entries (background,
/// long context), so that every request is classified and fit-checked.
const FIT_ARM: &str = "claude-balancer, as shipped, scenario route (window + when:)";
/// Sessions the load is spread over (one per worker, as each Claude Code session is one client).
const SESSIONS: usize = 16;

/// Numbers the requests of the whole run.
static SENT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// `body` with its mark replaced by the next request number (same length).
fn unique(body: &Bytes) -> Bytes {
    let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let Some(at) = memchr::memmem::find(body, MARK.as_bytes()) else {
        return body.clone();
    };
    let mut out = body.to_vec();
    out[at..at + MARK.len()].copy_from_slice(format!("#{:08}", n % 100_000_000).as_bytes());
    Bytes::from(out)
}

/// A Claude Code-shaped request: system blocks, tools with schemas, history (about 40 KB).
fn request_body(stream: bool) -> Bytes {
    let tools: Vec<_> = (0..18)
        .map(|i| {
            json!({"name": format!("Tool{i}"), "description": "A tool that does something useful for the agent. ".repeat(12),
                "input_schema": {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object", "additionalProperties": false,
                    "properties": {"path": {"type": "string", "description": "The absolute path"}, "limit": {"type": "number"}, "flag": {"type": "boolean"}},
                    "required": ["path"]}})
        })
        .collect();
    let mut messages = Vec::new();
    for i in 0..10 {
        messages.push(json!({"role": "user", "content": [{"type": "text", "text": format!("<system-reminder>context {i}</system-reminder>")},
            {"type": "text", "text": "Please look at the code and fix the failing test. ".repeat(20)}]}));
        messages.push(json!({"role": "assistant", "content": [{"type": "text", "text": "Looking at the repository now. ".repeat(25)}]}));
    }
    messages.push(json!({"role": "user", "content": format!("continue {MARK}")}));
    let body = json!({"model": "claude-sonnet-4-6", "max_tokens": 32000, "stream": stream,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197; cc_entrypoint=cli;"},
                   {"type": "text", "text": "You are Claude Code, Anthropic's official CLI for Claude.", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "You are an interactive agent that helps users with software engineering tasks. ".repeat(40), "cache_control": {"type": "ephemeral"}}],
        "tools": tools, "messages": messages, "metadata": {"user_id": "{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"s\"}"}});
    Bytes::from(body.to_string())
}

/// The same conversation as [`request_body`] as a Chat Completions request (about 40 KB).
fn chat_body(stream: bool) -> Bytes {
    let anthropic: serde_json::Value =
        serde_json::from_slice(&request_body(stream)).unwrap_or_default();
    let mut messages = vec![
        json!({"role": "system", "content": "You are an interactive agent that helps users with software engineering tasks. ".repeat(40)}),
    ];
    for m in anthropic["messages"].as_array().into_iter().flatten() {
        let text = match &m["content"] {
            serde_json::Value::String(s) => s.clone(),
            other => other
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
        };
        messages.push(json!({"role": m["role"], "content": text}));
    }
    let tools: Vec<_> = anthropic["tools"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| json!({"type": "function", "function": {"name": t["name"], "description": t["description"], "parameters": t["input_schema"]}}))
        .collect();
    let mut body = json!({"model": "claude-sonnet-4-6", "max_tokens": 32000, "messages": messages, "tools": tools});
    if stream {
        body["stream"] = json!(true);
        body["stream_options"] = json!({"include_usage": true});
    }
    Bytes::from(body.to_string())
}

/// 50 Anthropic events (a text answer in 44 deltas).
fn anthropic_events() -> Vec<String> {
    let words: String = (0..44).map(|i| format!("w{i} ")).collect();
    mock_provider::split_events(&mock_provider::anthropic_stream(
        "claude-sonnet-4-6",
        words.trim_end(),
    ))
}

/// 50 Chat Completions chunks.
fn openai_events() -> Vec<String> {
    let mut chunks: Vec<serde_json::Value> = (0..47)
        .map(|i| mock_provider::openai_chunk(json!({"content": format!("w{i} ")}), None))
        .collect();
    chunks.insert(
        0,
        mock_provider::openai_chunk(json!({"role": "assistant", "content": ""}), None),
    );
    chunks.push(mock_provider::openai_chunk(json!({}), Some("stop")));
    chunks.push(json!({"id": "x", "choices": [], "usage": {"prompt_tokens": 9000, "completion_tokens": 50}}));
    mock_provider::split_events(&mock_provider::openai_sse(&chunks, true))
}

fn stream_reply(events: &[String], first: Duration, gap: Duration) -> Reply {
    let chunks = events
        .iter()
        .enumerate()
        .map(|(i, e)| (if i == 0 { first } else { gap }, e.clone().into_bytes()))
        .collect();
    Reply::sse_chunks(chunks, End::Complete)
}

#[derive(Default, Clone)]
struct Samples {
    ttfb: Vec<Duration>,
    total: Vec<Duration>,
    errors: usize,
    wall: Duration,
}

impl Samples {
    fn pct(v: &[Duration], p: f64) -> f64 {
        if v.is_empty() {
            return f64::NAN;
        }
        let mut s = v.to_vec();
        s.sort();
        s[((s.len() as f64 - 1.0) * p).round() as usize].as_secs_f64() * 1000.0
    }
    fn merge(&mut self, o: Samples) {
        self.ttfb.extend(o.ttfb);
        self.total.extend(o.total);
        self.errors += o.errors;
        self.wall += o.wall;
    }
    fn throughput(&self) -> f64 {
        self.total.len() as f64 / self.wall.as_secs_f64()
    }
}

async fn load(c: &HttpClient, url: &str, body: Bytes, concurrency: usize, total: usize) -> Samples {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for worker in 0..concurrency {
        let (c, url, body, next) = (c.clone(), url.to_owned(), body.clone(), Arc::clone(&next));
        let session = format!("0b3c9f6e-5d2a-4c1b-9e8f-{:012}", worker % SESSIONS);
        workers.push(tokio::spawn(async move {
            let mut s = Samples::default();
            while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                // An arm's URL is its base, for `/v1/messages`, or a whole `/v1/…` target.
                let target = if url.contains("/v1/") {
                    url.clone()
                } else {
                    format!("{url}/v1/messages")
                };
                let req = Request::post(target)
                    .header("content-type", "application/json")
                    .header("anthropic-version", "2023-06-01")
                    .header("x-api-key", "bench-key")
                    .header("x-claude-code-session-id", session.as_str())
                    .body(Full::new(unique(&body)));
                let Ok(req) = req else {
                    s.errors += 1;
                    continue;
                };
                let t0 = Instant::now();
                let Ok(resp) = c.request(req).await else {
                    s.errors += 1;
                    continue;
                };
                let ok = resp.status().is_success();
                let mut body = resp.into_body();
                let mut first = None;
                while let Some(frame) = body.frame().await {
                    match frame {
                        Ok(f) if f.is_data() => {
                            first.get_or_insert_with(|| t0.elapsed());
                        }
                        Ok(_) => {}
                        Err(_) => {
                            s.errors += 1;
                            break;
                        }
                    }
                }
                if !ok {
                    s.errors += 1;
                }
                s.ttfb.push(first.unwrap_or_else(|| t0.elapsed()));
                s.total.push(t0.elapsed());
            }
            s
        }));
    }
    let mut all = Samples::default();
    for w in workers {
        if let Ok(s) = w.await {
            all.merge(s);
        }
    }
    all.wall = started.elapsed();
    all
}

/// Appends a Markdown table: `heading` (with its own leading blank line, if any), the column
/// names, then one row of cells per arm.
fn table(
    report: &mut String,
    heading: &str,
    columns: &[&str],
    rows: impl IntoIterator<Item = Vec<String>>,
) {
    let _ = writeln!(report, "{heading}\n");
    let _ = writeln!(
        report,
        "| {} |\n|{}",
        columns.join(" | "),
        "---|".repeat(columns.len())
    );
    for row in rows {
        let _ = writeln!(report, "| {} |", row.join(" | "));
    }
}

/// CPU per request, or `-` for an arm whose process is not ours to measure.
fn cpu_cell(cpu: &Option<f64>) -> String {
    cpu.map_or("-".into(), |c| format!("{c:.0}"))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU seconds (user + system) a process has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / clock_ticks()
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

struct Proc(Child);
impl Drop for Proc {
    /// SIGTERM first (so that a profiler wrapping the proxy writes its report), SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg(self.0.id().to_string())
            .stderr(Stdio::null())
            .status();
        // A channel nobody sends on is the pause between checks.
        let (_keep, pause) = std::sync::mpsc::channel::<()>();
        for _ in 0..200 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            let _ = pause.recv_timeout(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A port free now and never handed out before in this run: the processes bind theirs later, so
/// the same free port given twice would put two arms on one process.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .map(|l| l.local_addr().map(|a| a.port()).unwrap_or(0))
            .unwrap_or(0);
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if port == 0 || !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

async fn wait_up(c: &HttpClient, url: &str) {
    wait_health(c, url, |_| true).await;
}

/// Polls `url`'s `/health` until it answers with a body `ready` accepts (at most 10 s).
async fn wait_health(c: &HttpClient, url: &str, ready: impl Fn(&str) -> bool) {
    for _ in 0..400 {
        let req = Request::get(format!("{url}/health")).body(Full::new(Bytes::new()));
        if let Ok(req) = req
            && let Ok(resp) = c.request(req).await
            && let Ok(body) = resp.into_body().collect().await
            && ready(&String::from_utf8_lossy(&body.to_bytes()))
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Starts claude-balancer on `upstream`; `shipped`: with the example configuration's settings
/// (coalescing and affinity on), else with both off.
fn start_balancer(
    dir: &std::path::Path,
    name: &str,
    upstream: &str,
    kind: &str,
    shipped: bool,
) -> (Proc, String) {
    start_balancer_with(dir, name, upstream, kind, shipped, "")
}

/// A `redis-server` on a free port with its own folder, if one is installed, and its URL.
fn start_redis(dir: &std::path::Path) -> Option<(Proc, String)> {
    let port = free_port();
    let folder = dir.join("redis");
    std::fs::create_dir_all(&folder).ok()?;
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&folder)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let proc = Proc(child);
    for _ in 0..400 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((proc, format!("redis://127.0.0.1:{port}/0")));
        }
        let (_keep, pause) = std::sync::mpsc::channel::<()>();
        let _ = pause.recv_timeout(Duration::from_millis(25));
    }
    None
}

/// Waits until the balancer at `url` reports its Redis state backend up.
async fn wait_shared(c: &HttpClient, url: &str) {
    wait_health(c, url, |body| body.contains("\"status\":\"up\"")).await;
}

/// [`start_balancer`] with more `settings` lines (each indented by two spaces).
fn start_balancer_with(
    dir: &std::path::Path,
    name: &str,
    upstream: &str,
    kind: &str,
    shipped: bool,
    more_settings: &str,
) -> (Proc, String) {
    let port = free_port();
    let base = if kind == "openai" {
        format!("{upstream}/v1")
    } else {
        upstream.to_owned()
    };
    let yaml = format!(
        "providers:\n  - {{name: P, type: {kind}, base_url: \"{base}\", auth_type: api_key, auth_value: provider-key}}\nmodel_routes:\n  \"*\":\n    - {{provider: P, model: passthrough}}\nsettings:\n  log_level: INFO\n  log_file_path: \"{0}/{name}-logs/logs.jsonl\"\n  usage:\n    path: \"{0}/{name}-usage.db\"\n{1}",
        dir.display(),
        if shipped {
            ""
        } else {
            "  sticky_provider_duration: 0\n  deduplication:\n    enabled: false\n"
        }
    ) + more_settings;
    spawn_balancer(dir, name, &yaml, port)
}

/// Microseconds per call of `f`, over `n` calls.
fn per_call(n: usize, mut f: impl FnMut()) -> f64 {
    let started = tokio::time::Instant::now();
    for _ in 0..n {
        f();
    }
    started.elapsed().as_secs_f64() * 1e6 / n as f64
}

/// The in-process cost of routing that knows the request, on the benchmark's request: reading
/// what it needs (during the scan every request gets), classifying it, two `when:` conditions,
/// the capabilities of a passthrough model and the fit check; and the check near a limit, where
/// the tokenizer runs.
fn fit_costs(scale: usize, passthrough_cpu: Option<f64>) -> String {
    use claude_balancer::config::{Capabilities, Conditions};
    use claude_balancer::routing::fit;
    use std::hint::black_box;
    let body = request_body(true);
    let headers = hyper::HeaderMap::new();
    let Ok(envelope) = claude_balancer::inbound::body::parse_with(&body, true) else {
        return "fit: the benchmark request did not parse".into();
    };
    let table = fit::ModelTable::new(&[]);
    let background = fit::When::new(&Conditions {
        background: Some(true),
        ..Conditions::default()
    });
    let long = fit::When::new(&Conditions {
        min_input_tokens: Some(60_000),
        ..Conditions::default()
    });
    let window = |w: u64| Capabilities {
        context_window: Some(w),
        max_output_tokens: Some(64_000),
        ..Capabilities::default()
    };
    let n = 20_000 * scale;
    let scan = per_call(n, || {
        black_box(claude_balancer::inbound::body::parse_with(black_box(&body), true).is_ok());
    });
    let needs = || {
        fit::Needs::new(
            body.clone(),
            envelope.shape.clone(),
            &headers,
            fit::Counter::Body(body.clone()),
        )
    };
    let check = per_call(n, || {
        let needs = needs();
        black_box(fit::hold(&background, &needs, &headers).is_ok());
        black_box(fit::hold(&long, &needs, &headers).is_ok());
        let caps = window(200_000).or(table.lookup(black_box("claude-sonnet-4-6")));
        black_box(fit::check(&caps, &needs, false).is_ok());
    });
    let near = per_call(50 * scale, || {
        let needs = needs();
        black_box(fit::check(&window(40_000), &needs, false).is_ok());
    });
    let ratio = passthrough_cpu.map_or("-".to_owned(), |p| format!("{:.1} %", check / p * 100.0));
    format!(
        "\n### Routing that knows the request, in process, {} KB request\n\n| work | µs/request | of the shipped passthrough's CPU/request ({}) |\n|---|---|---|\n| the request check (scan, signature and what the request needs) | {scan:.1} | - |\n| fit check and two `when:` conditions (background, min_input_tokens), no tokenizer | {check:.2} | {ratio} |\n| the same near a limit (the local tokenizer counts the request once) | {near:.0} | - |",
        body.len() / 1024,
        passthrough_cpu.map_or("not measured".to_owned(), |p| format!("{p:.0} µs")),
    )
}

/// The balancer with the scenario route of [`FIT_ARM`].
fn start_fit_balancer(dir: &std::path::Path, upstream: &str) -> (Proc, String) {
    let port = free_port();
    let mut yaml = String::from("providers:\n");
    for p in ["P", "Q", "R"] {
        yaml += &format!(
            "  - {{name: {p}, type: anthropic, base_url: \"{upstream}\", auth_type: api_key, auth_value: provider-key}}\n"
        );
    }
    yaml += "model_routes:\n  \"*\":\n    - {provider: P, model: passthrough, context_window: 200000, max_output_tokens: 64000}\n    - {provider: Q, model: passthrough, when: {background: true}}\n    - {provider: R, model: passthrough, when: {min_input_tokens: 60000}}\n";
    yaml += &format!(
        "settings:\n  log_level: INFO\n  log_file_path: \"{0}/fit-logs/logs.jsonl\"\n  usage:\n    path: \"{0}/fit-usage.db\"\n",
        dir.display()
    );
    spawn_balancer(dir, "fit", &yaml, port)
}

fn spawn_balancer(dir: &std::path::Path, name: &str, yaml: &str, port: u16) -> (Proc, String) {
    let config = dir.join(format!("{name}.yaml"));
    let _ = std::fs::write(&config, yaml);
    let exe = sibling("claude-balancer");
    let child = wrapped(exe, "balancer")
        .arg("--config")
        .arg(&config)
        .args(["--port", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => (Proc(c), format!("http://127.0.0.1:{port}")),
        Err(e) => {
            eprintln!(
                "cannot start claude-balancer (build it first: cargo build --release --workspace --bins): {e}"
            );
            std::process::exit(2);
        }
    }
}

/// A command for `exe`, run under `BENCH_WRAP` (for example `valgrind --tool=callgrind` or
/// `strace -c -f -o FILE`) when that is set and `BENCH_WRAP_ARM` (`bare` or `balancer`) is unset
/// or names this arm: for profiling the proxies under the benchmark's load.
fn wrapped(exe: PathBuf, arm: &str) -> Command {
    let mut wrap = std::env::var("BENCH_WRAP").unwrap_or_default();
    if std::env::var("BENCH_WRAP_ARM").is_ok_and(|a| a != arm) {
        wrap.clear();
    }
    let mut words = wrap.split_whitespace();
    match words.next() {
        Some(first) => {
            let mut c = Command::new(first);
            c.args(words).arg(exe);
            c
        }
        None => Command::new(exe),
    }
}

fn sibling(name: &str) -> PathBuf {
    let me = std::env::current_exe().unwrap_or_default();
    me.with_file_name(name)
}

fn start_bare_proxy(upstream: &str) -> (Proc, String) {
    let port = free_port();
    let child = wrapped(std::env::current_exe().unwrap_or_default(), "bare")
        .args(["--bare-proxy", &port.to_string(), upstream])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    match child {
        Ok(c) => (Proc(c), format!("http://127.0.0.1:{port}")),
        Err(e) => {
            eprintln!("cannot start the bare proxy: {e}");
            std::process::exit(2);
        }
    }
}

/// The floor: forwards every request to `upstream` and streams the answer back, nothing else.
async fn bare_proxy(port: u16, upstream: String) {
    let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await else {
        return;
    };
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let c: Client<HttpConnector, Incoming> = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(1024)
        .build(connector);
    let upstream = Arc::new(upstream);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (c, upstream) = (c.clone(), Arc::clone(&upstream));
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                let (c, upstream) = (c.clone(), Arc::clone(&upstream));
                async move {
                    let (mut parts, body) = req.into_parts();
                    let path = parts
                        .uri
                        .path_and_query()
                        .map(|p| p.as_str())
                        .unwrap_or("/");
                    parts.uri = format!("{upstream}{path}").parse().unwrap_or_default();
                    parts.headers.remove("host");
                    let resp = c.request(Request::from_parts(parts, body)).await;
                    Ok::<_, Infallible>(match resp {
                        Ok(r) => r.map(|b| b.boxed()),
                        Err(_) => Response::builder()
                            .status(502)
                            .body(
                                Full::new(Bytes::new())
                                    .map_err(|n: Infallible| match n {})
                                    .boxed(),
                            )
                            .unwrap_or_default(),
                    })
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpu
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cores} cores, {model}, Linux {}", kernel.trim())
}

const USAGE: &str = "usage: bench [--quick] [--only latency|stream|throughput|convert|chat|fit|memory] [--concurrency N] [--out FILE]
  runs every scenario and rewrites the measured part of FILE (BENCHMARKS.md) unless --only is given;
  --quick runs a quarter of the requests; --concurrency N runs the latency scenario at N connections (16).";

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--bare-proxy") {
        let port = args.get(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        bare_proxy(port, args.get(2).cloned().unwrap_or_default()).await;
        return;
    }
    // One pass over the arguments. Anything else (a typo, `--help`) gets the usage line: it would
    // otherwise start a full run that rewrites BENCHMARKS.md.
    let mut quick = false;
    let mut out = "BENCHMARKS.md".to_owned();
    // `--only NAME` runs one scenario (latency, stream, throughput, convert, chat, memory) and writes no file.
    let mut only: Option<String> = None;
    // `--concurrency N` runs the latency scenario at N instead of 16 (1 is how Claude Code calls).
    let mut concurrency: Option<&String> = None;
    let mut rest = args.iter();
    while let Some(a) = rest.next() {
        if a == "--quick" {
            quick = true;
            continue;
        }
        match (a.as_str(), rest.next()) {
            ("--out", Some(v)) => out = v.clone(),
            ("--only", Some(v)) => only = Some(v.clone()),
            ("--concurrency", Some(v)) => concurrency = Some(v),
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(if a == "--help" || a == "-h" { 0 } else { 2 });
            }
        }
    }
    let scale = if quick { 1 } else { 4 };
    const SCENARIOS: [&str; 7] = [
        "latency",
        "stream",
        "throughput",
        "convert",
        "chat",
        "fit",
        "memory",
    ];
    if let Some(o) = only.as_deref()
        && !SCENARIOS.contains(&o)
    {
        eprintln!("--only takes one of {}", SCENARIOS.join(", "));
        std::process::exit(2);
    }
    let want = |name: &str| only.as_deref().is_none_or(|o| o == name);
    let latency_concurrency: usize = match concurrency {
        None => 16,
        Some(n) => match n.parse() {
            Ok(n) if n > 0 => n,
            _ => {
                eprintln!("--concurrency takes a number of connections, 1 or more");
                std::process::exit(2);
            }
        },
    };
    let dir = std::env::temp_dir().join(format!("cb-bench-{}", std::process::id()));
    let _ = std::fs::create_dir_all(&dir);
    let c = client();
    let mut report = String::new();

    // Upstreams: an Anthropic-style one (JSON or 50 events) and an OpenAI-style one (50 chunks).
    let mock = match MockProvider::start(Reply::message("m", "ok")).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot start the fake provider: {e}");
            return;
        }
    };
    let oai = match MockProvider::start(Reply::message("m", "ok")).await {
        Ok(m) => m,
        Err(e) => {
            eprintln!("cannot start the fake provider: {e}");
            return;
        }
    };
    let (bal_proc, bal) = start_balancer(&dir, "shipped", &mock.url(), "anthropic", true);
    let (oai_proc, oai_bal) = start_balancer(&dir, "conv", &oai.url(), "openai", true);
    let (plain_proc, plain) = start_balancer(&dir, "plain", &mock.url(), "anthropic", false);
    let (client_proc, client_bal) = start_balancer_with(
        &dir,
        "client",
        &mock.url(),
        "anthropic",
        true,
        "clients:\n  - name: bench\n    key: bench-key\n    limits:\n      requests_per_minute: 1000000000\n      concurrent_requests: 100000\n      tokens: { window: 5h, max: 1000000000000000 }\n      budget_usd: { window: 30d, max: 1000000000 }\n",
    );
    let (bare_proc, bare) = start_bare_proxy(&mock.url());
    let (fit_proc, fit_bal) = start_fit_balancer(&dir, &mock.url());
    // The Redis arm, when `redis-server` is installed.
    let redis = start_redis(&dir);
    let shared = redis.as_ref().map(|(_, url)| {
        let state = format!("  state:\n    backend: redis\n    redis:\n      url: \"{url}\"\n");
        start_balancer_with(&dir, "redis", &mock.url(), "anthropic", true, &state)
    });
    wait_up(&c, &bal).await;
    wait_up(&c, &oai_bal).await;
    wait_up(&c, &plain).await;
    wait_up(&c, &client_bal).await;
    wait_up(&c, &fit_bal).await;
    if let Some((_, url)) = &shared {
        wait_shared(&c, url).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_mb(bal_proc.0.id());
    let mut arms = vec![
        ("direct", mock.url()),
        ("bare proxy", bare.clone()),
        (SHIPPED_ARM, bal.clone()),
        (PLAIN_ARM, plain.clone()),
        (CLIENT_ARM, client_bal.clone()),
        (FIT_ARM, fit_bal.clone()),
    ];
    if let Some((_, url)) = &shared {
        arms.push((REDIS_ARM, url.clone()));
    }
    let shared_pid = shared.as_ref().map(|(p, _)| p.0.id());
    let pids = |name: &str| match name {
        "bare proxy" => Some(bare_proc.0.id()),
        SHIPPED_ARM => Some(bal_proc.0.id()),
        PLAIN_ARM => Some(plain_proc.0.id()),
        CLIENT_ARM => Some(client_proc.0.id()),
        FIT_ARM => Some(fit_proc.0.id()),
        REDIS_ARM => shared_pid,
        _ => None,
    };

    // Runs `per_round` requests per arm, three alternating rounds; returns samples and CPU per request.
    async fn rounds(
        c: &HttpClient,
        arms: &[(&str, String)],
        pids: &dyn Fn(&str) -> Option<u32>,
        body: &Bytes,
        conc: usize,
        per_round: usize,
    ) -> Vec<(String, Samples, Option<f64>)> {
        let arms: Vec<(&str, String, Bytes)> = arms
            .iter()
            .map(|(n, u)| (*n, u.clone(), body.clone()))
            .collect();
        rounds_with(c, &arms, pids, conc, per_round).await
    }

    // [`rounds`] with a body of its own for each arm.
    async fn rounds_with(
        c: &HttpClient,
        arms: &[(&str, String, Bytes)],
        pids: &dyn Fn(&str) -> Option<u32>,
        conc: usize,
        per_round: usize,
    ) -> Vec<(String, Samples, Option<f64>)> {
        let mut res: Vec<(String, Samples, f64)> = arms
            .iter()
            .map(|(n, _, _)| ((*n).to_owned(), Samples::default(), 0.0))
            .collect();
        // Warm-up.
        for (_, url, body) in arms {
            load(c, url, body.clone(), conc, conc * 4).await;
        }
        for _ in 0..3 {
            for (i, (name, url, body)) in arms.iter().enumerate() {
                let before = pids(name).map(cpu_seconds);
                let s = load(c, url, body.clone(), conc, per_round).await;
                if let (Some(b), Some(pid)) = (before, pids(name)) {
                    res[i].2 += cpu_seconds(pid) - b;
                }
                res[i].1.merge(s);
            }
        }
        res.into_iter()
            .map(|(n, s, cpu)| {
                let per = pids(&n).map(|_| cpu / s.total.len().max(1) as f64 * 1e6);
                (n, s, per)
            })
            .collect()
    }

    let _ = writeln!(
        report,
        "Machine: {}. Fake provider, load driver and arms on 127.0.0.1; three alternating rounds per scenario.\n",
        machine()
    );

    // The shipped passthrough arm's CPU per request, for the fit scenario's ratio.
    let mut passthrough_cpu: Option<f64> = None;

    // 1. Non-streaming, 20 ms provider, concurrency 16.
    if want("latency") {
        mock.set_default(
            Reply::message("claude-sonnet-4-6", "ok").with_delay(Duration::from_millis(20)),
        );
        let body = request_body(false);
        let r = rounds(&c, &arms, &pids, &body, latency_concurrency, 300 * scale).await;
        passthrough_cpu = r
            .iter()
            .find(|(n, _, _)| n == SHIPPED_ARM)
            .and_then(|x| x.2);
        let direct = (
            Samples::pct(&r[0].1.total, 0.5),
            Samples::pct(&r[0].1.total, 0.99),
        );
        table(
            &mut report,
            &format!(
                "### Non-streaming, 20 ms provider, concurrency {latency_concurrency}, {} KB requests",
                body.len() / 1024
            ),
            &[
                "arm",
                "p50 ms",
                "p99 ms",
                "added p50 ms",
                "added p99 ms",
                "CPU µs/request",
                "errors",
            ],
            r.iter().map(|(n, s, cpu)| {
                let (p50, p99) = (Samples::pct(&s.total, 0.5), Samples::pct(&s.total, 0.99));
                vec![
                    n.clone(),
                    format!("{p50:.2}"),
                    format!("{p99:.2}"),
                    format!("{:.2}", p50 - direct.0),
                    format!("{:.2}", p99 - direct.1),
                    cpu_cell(cpu),
                    s.errors.to_string(),
                ]
            }),
        );
    }

    // 2. Streaming, 50 events, 20 ms to the first event.
    if want("stream") {
        mock.set_default(stream_reply(
            &anthropic_events(),
            Duration::from_millis(20),
            Duration::ZERO,
        ));
        let body = request_body(true);
        let r = rounds(&c, &arms, &pids, &body, 16, 150 * scale).await;
        table(
            &mut report,
            "\n### Streaming, 50 events, 20 ms to the first event, concurrency 16",
            &[
                "arm",
                "first byte p50 ms",
                "last byte p50 ms",
                "last byte p99 ms",
                "CPU µs/request",
                "errors",
            ],
            r.iter().map(|(n, s, cpu)| {
                vec![
                    n.clone(),
                    format!("{:.2}", Samples::pct(&s.ttfb, 0.5)),
                    format!("{:.2}", Samples::pct(&s.total, 0.5)),
                    format!("{:.2}", Samples::pct(&s.total, 0.99)),
                    cpu_cell(cpu),
                    s.errors.to_string(),
                ]
            }),
        );
    }

    // 3. Throughput, provider without latency, concurrency 64.
    if want("throughput") {
        mock.set_default(Reply::message("claude-sonnet-4-6", "ok"));
        let body = request_body(false);
        let r = rounds(&c, &arms, &pids, &body, 64, 1000 * scale).await;
        let base = r[0].1.throughput();
        table(
            &mut report,
            "\n### Throughput, provider without latency, concurrency 64",
            &["arm", "requests/s", "of direct", "CPU µs/request", "errors"],
            r.iter().map(|(n, s, cpu)| {
                vec![
                    n.clone(),
                    format!("{:.0}", s.throughput()),
                    format!("{:.1} %", s.throughput() / base * 100.0),
                    cpu_cell(cpu),
                    s.errors.to_string(),
                ]
            }),
        );
    }

    // 4. OpenAI conversion: streaming, 50 chunks, through the converting balancer.
    if want("convert") {
        oai.set_default(stream_reply(
            &openai_events(),
            Duration::from_millis(20),
            Duration::ZERO,
        ));
        let conv_arms = [(
            "claude-balancer, as shipped (openai conversion)",
            oai_bal.clone(),
        )];
        let conv_pid = |_: &str| Some(oai_proc.0.id());
        let r = rounds(
            &c,
            &conv_arms,
            &conv_pid,
            &request_body(true),
            16,
            150 * scale,
        )
        .await;
        table(
            &mut report,
            "\n### Streaming with OpenAI conversion, 50 chunks, 20 ms to the first chunk, concurrency 16",
            &[
                "arm",
                "first byte p50 ms",
                "last byte p50 ms",
                "CPU µs/request",
                "errors",
            ],
            r.iter().map(|(n, s, cpu)| {
                vec![
                    n.clone(),
                    format!("{:.2}", Samples::pct(&s.ttfb, 0.5)),
                    format!("{:.2}", Samples::pct(&s.total, 0.5)),
                    cpu_cell(cpu),
                    s.errors.to_string(),
                ]
            }),
        );
    }

    // 5. The OpenAI front end: Chat Completions to an openai-type provider (the fast path) and to
    //    an anthropic-type one (conversion), beside the Anthropic passthrough, in the same rounds.
    if want("chat") {
        const PASS: &str =
            "claude-balancer, as shipped: Anthropic Messages → anthropic (passthrough)";
        const FAST: &str = "claude-balancer, as shipped: Chat Completions → openai (fast path)";
        const CONV: &str = "claude-balancer, as shipped: Chat Completions → anthropic (conversion)";
        let chat_pids = |name: &str| match name {
            PASS | CONV => Some(bal_proc.0.id()),
            FAST => Some(oai_proc.0.id()),
            _ => None,
        };
        for stream in [false, true] {
            if stream {
                mock.set_default(stream_reply(
                    &anthropic_events(),
                    Duration::from_millis(20),
                    Duration::ZERO,
                ));
                oai.set_default(stream_reply(
                    &openai_events(),
                    Duration::from_millis(20),
                    Duration::ZERO,
                ));
            } else {
                mock.set_default(
                    Reply::message("claude-sonnet-4-6", "ok").with_delay(Duration::from_millis(20)),
                );
                oai.set_default(
                    Reply::json(
                        200,
                        &mock_provider::openai_completion(
                            json!({"role": "assistant", "content": "ok"}),
                            "stop",
                        ),
                    )
                    .with_delay(Duration::from_millis(20)),
                );
            }
            let (anthropic, chat) = (request_body(stream), chat_body(stream));
            let arms = [
                (
                    "direct, Anthropic Messages",
                    format!("{}/v1/messages", mock.url()),
                    anthropic.clone(),
                ),
                (
                    "direct, Chat Completions",
                    format!("{}/v1/chat/completions", oai.url()),
                    chat.clone(),
                ),
                (PASS, format!("{bal}/v1/messages"), anthropic),
                (FAST, format!("{oai_bal}/v1/chat/completions"), chat.clone()),
                (CONV, format!("{bal}/v1/chat/completions"), chat),
            ];
            let r = rounds_with(
                &c,
                &arms,
                &chat_pids,
                16,
                if stream { 150 } else { 300 } * scale,
            )
            .await;
            let direct_of = |name: &str| if name == FAST { &r[1].1 } else { &r[0].1 };
            table(
                &mut report,
                &format!(
                    "\n### OpenAI front end: {}, 20 ms provider, concurrency 16, {} KB requests",
                    if stream {
                        "streaming (50 events or chunks)"
                    } else {
                        "non-streaming"
                    },
                    request_body(false).len() / 1024
                ),
                &[
                    "arm",
                    "p50 ms",
                    "added p50 ms",
                    "added p99 ms",
                    "CPU µs/request",
                    "errors",
                ],
                r.iter().map(|(n, s, cpu)| {
                    let d = direct_of(n);
                    let (p50, p99) = (Samples::pct(&s.total, 0.5), Samples::pct(&s.total, 0.99));
                    let added = |p: f64, q: f64| {
                        if cpu.is_some() {
                            format!("{:.2}", p - Samples::pct(&d.total, q))
                        } else {
                            "-".to_owned()
                        }
                    };
                    vec![
                        n.clone(),
                        format!("{p50:.2}"),
                        added(p50, 0.5),
                        added(p99, 0.99),
                        cpu_cell(cpu),
                        s.errors.to_string(),
                    ]
                }),
            );
        }
    }

    // 6. Routing that knows the request: the fit check and `when:` conditions, in process, on the
    //    same 38 KB request, against the shipped passthrough's CPU per request measured above.
    if want("fit") {
        let _ = writeln!(report, "{}", fit_costs(scale, passthrough_cpu));
    }

    // 7. Memory: idle, and holding 1,000 concurrent streams (50 events, 100 ms apart).
    if want("memory") {
        mock.set_default(stream_reply(
            &anthropic_events(),
            Duration::from_millis(20),
            Duration::from_millis(100),
        ));
        let body = request_body(true);
        let bal_pid = bal_proc.0.id();
        let holder = tokio::spawn({
            let (c, bal, body) = (c.clone(), bal.clone(), body.clone());
            async move { load(&c, &bal, body, 1000, 1000).await }
        });
        tokio::time::sleep(Duration::from_millis(2500)).await;
        let busy_rss = rss_mb(bal_pid);
        let held = holder.await.unwrap_or_default();
        let _ = writeln!(
            report,
            "\n### Memory of claude-balancer\n\n| state | resident MB |\n|---|---|\n| idle | {idle_rss:.1} |\n| 1,000 concurrent streams | {busy_rss:.1} (errors: {}) |",
            held.errors
        );
    }

    println!("{report}");
    let doc = format!(
        "# Benchmarks\n\nProduced by:\n\n```\ncargo build --release --workspace --bins && target/release/bench\n```\n\n{report}\nAdded latency is the arm's percentile minus the direct arm's. CPU is user + system time of the\nproxy process (from `/proc`) over the requests it served. Every request carries its own number (in its last\nmessage), so no two are identical, and a Claude Code session id (`x-claude-code-session-id`, one\nsession per connection, 16 sessions), as the CLI sends. The main arm, `claude-balancer, as shipped`,\nruns the example configuration's settings: coalescing and session affinity on (every request is\nsigned, served through a flight and looked up in the affinity book), an INFO console line and a\nJSON file line per request. `coalescing and affinity off` is the same binary with both turned off,\nfor attribution; it writes the same log lines.\n"
    );
    // The measured part is rewritten; the sections after it (`## ...`: targets, analysis) are kept.
    let kept = std::fs::read_to_string(&out)
        .ok()
        .and_then(|old| old.find("\n## ").map(|at| old[at..].to_owned()))
        .unwrap_or_default();
    if only.is_none()
        && let Err(e) = std::fs::write(&out, doc + &kept)
    {
        eprintln!("cannot write {out}: {e}");
    }
    drop((bal_proc, oai_proc, plain_proc, bare_proc, fit_proc));
    let _ = std::fs::remove_dir_all(&dir);
}
