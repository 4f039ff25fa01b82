//! The real binary as a process: its JSON log file, signals (SIGTERM, SIGHUP) and watching the
//! configuration file. Fake providers run in the test on 127.0.0.1.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use mock_provider::{End, MockProvider, Reply};
use serde_json::{Value, json};

const PROVIDER_KEY: &str = "sk-provider-secret-AAAA1111";
const CLIENT_KEY: &str = "sk-client-secret-BBBB2222";
const ADMIN_KEY: &str = "sk-admin-secret-CCCC3333";

struct Process {
    child: Child,
    url: String,
    dir: tempfile::TempDir,
    config: PathBuf,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn yaml(providers: &[(&str, &str)], route_to: &str, settings: &str, log_dir: &Path) -> String {
    let mut y = String::from("providers:\n");
    for (name, url) in providers {
        y.push_str(&format!(
            "  - {{name: \"{name}\", type: anthropic, base_url: \"{url}\", auth_type: api_key, auth_value: \"{PROVIDER_KEY}\"}}\n"
        ));
    }
    y.push_str(&format!(
        "model_routes:\n  \"*\":\n    - {{provider: \"{route_to}\", model: passthrough}}\n"
    ));
    y.push_str(&format!(
        "settings:\n  log_file_path: \"{0}/logs.jsonl\"\n  log_level: INFO\n{1}{settings}",
        log_dir.display(),
        if settings.contains("  usage:") {
            String::new()
        } else {
            format!(
                "  usage:\n    path: \"{}/../usage.db\"\n",
                log_dir.display()
            )
        }
    ));
    y
}

async fn start(config_text: impl Fn(&Path) -> String) -> Process {
    launch(config_text, None).await
}

/// Starts the binary (through `sh -c "{shell_first} && exec …"` when given) and waits until it
/// answers `/health`.
async fn launch(config_text: impl Fn(&Path) -> String, shell_first: Option<&str>) -> Process {
    claude_balancer::upstream::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.yaml");
    std::fs::write(&config, config_text(&dir.path().join("logs"))).unwrap();
    let port = free_port();
    let bin = env!("CARGO_BIN_EXE_claude-balancer");
    let mut command = match shell_first {
        // Through a shell that runs `shell_first` and then becomes the balancer (same pid).
        Some(first) => {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                &format!(
                    "{first} && exec '{bin}' --config '{}' --port {port}",
                    config.display()
                ),
            ]);
            c
        }
        None => {
            let mut c = Command::new(bin);
            c.args(["--config"])
                .arg(&config)
                .args(["--port", &port.to_string()]);
            c
        }
    };
    let child = command
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("console.txt")).unwrap())
        .spawn()
        .unwrap();
    // From here the process is owned by `Process`, whose drop kills it even if the test panics.
    let process = Process {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
        config,
    };
    let client = reqwest::Client::new();
    for _ in 0..200 {
        if client
            .get(format!("{}/health", process.url))
            .send()
            .await
            .is_ok()
        {
            return process;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the balancer did not start");
}

/// The balancer with one provider, `A`, answering `reply`; the provider lives as long as it is kept.
async fn start_with_one(reply: Reply) -> (MockProvider, Process) {
    let a = MockProvider::start(reply).await.unwrap();
    let ua = a.url();
    let p = start(|logs| yaml(&[("A", &ua)], "A", "", logs)).await;
    (a, p)
}

fn signal(p: &Process, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &p.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

async fn wait_exit(p: &mut Process) -> i32 {
    for _ in 0..400 {
        if let Some(status) = p.child.try_wait().unwrap() {
            return status.code().unwrap_or(-1);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the balancer did not exit");
}

fn log_lines(p: &Process) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(p.dir.path().join("logs")).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for line in text.lines() {
            let v: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            out.push((line.to_owned(), v));
        }
    }
    out
}

fn request() -> Value {
    json!({"model": "claude-sonnet-4-6", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]})
}

async fn served_by(url: &str) -> Option<String> {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/messages"))
        .json(&request())
        .send()
        .await
        .ok()?;
    resp.headers()
        .get("x-provider-used")
        .map(|v| v.to_str().unwrap().to_owned())
}

#[tokio::test]
async fn logs_are_json_lines_with_a_summary_per_request_and_no_secret() {
    let a = MockProvider::start(Reply::error(
        401,
        "authentication_error",
        &format!("invalid x-api-key {PROVIDER_KEY}"),
    ))
    .await
    .unwrap();
    let b = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let (ua, ub) = (a.url(), b.url());
    let mut p = start(|logs| {
        let mut y = yaml(
            &[("A", &ua), ("B", &ub)],
            "A",
            &format!("  auth:\n    enabled: true\n    api_keys: [\"{CLIENT_KEY}\"]\n    admin_keys: [\"{ADMIN_KEY}\"]\n    exempt_paths: [\"/health\"]\n"),
            logs,
        );
        y = y.replace("    - {provider: \"A\", model: passthrough}\n", "    - {provider: \"A\", model: passthrough}\n    - {provider: \"B\", model: passthrough, priority: 2}\n");
        y
    })
    .await;
    let client = reqwest::Client::new();
    let resp = client
        .post(format!("{}/v1/messages", p.url))
        .header("x-api-key", CLIENT_KEY)
        .header("x-claude-code-session-id", "session-xyz")
        .header("x-request-id", "req-from-client-1")
        .json(&request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().await.unwrap();
    assert!(!body.contains(PROVIDER_KEY));
    let admin = client
        .get(format!("{}/providers", p.url))
        .header("authorization", format!("Bearer {ADMIN_KEY}"))
        .send()
        .await
        .unwrap();
    let admin_text = admin.text().await.unwrap();
    assert!(
        !admin_text.contains(PROVIDER_KEY)
            && !admin_text.contains(ADMIN_KEY)
            && !admin_text.contains(CLIENT_KEY)
    );
    let refused = client
        .post(format!("{}/v1/messages", p.url))
        .header("x-api-key", "sk-wrong-key-ZZZZ")
        .json(&request())
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    signal(&p, "-TERM");
    assert_eq!(wait_exit(&mut p).await, 0);

    let lines = log_lines(&p);
    for (raw, _) in &lines {
        for secret in [PROVIDER_KEY, CLIENT_KEY, ADMIN_KEY, "sk-wrong-key-ZZZZ"] {
            assert!(!raw.contains(secret), "a secret reached the log: {raw}");
        }
    }
    let summary = lines
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["message"] == "request" && v["request_id"] == "req-from-client-1")
        .unwrap_or_else(|| panic!("no summary line: {lines:?}"));
    assert!(
        summary["timestamp"].as_str().unwrap().ends_with('Z'),
        "RFC 3339 UTC: {summary}"
    );
    assert_eq!(summary["session_id"], "session-xyz");
    assert_eq!(summary["model"], "claude-sonnet-4-6");
    assert_eq!(summary["route"], "*");
    assert_eq!(summary["provider"], "B");
    assert_eq!(summary["status"], 200);
    assert_eq!(summary["stream"], false);
    assert_eq!(summary["cache"], "miss");
    for field in [
        "ttfb_ms",
        "total_ms",
        "overhead_ms",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ] {
        assert!(summary[field].is_number(), "{field}: {summary}");
    }
    assert_eq!(summary["input_tokens"], 12);
    let attempts: Value = serde_json::from_str(summary["attempts"].as_str().unwrap()).unwrap();
    assert_eq!(attempts[0]["provider"], "A");
    assert_eq!(attempts[0]["outcome"], "fault");
    assert_eq!(attempts[0]["status"], 401);
    assert!(attempts[0]["reason"].as_str().unwrap().contains("****"));
    assert_eq!(attempts[1]["outcome"], "committed");
    let messages: Vec<String> = lines
        .iter()
        .map(|(_, v)| v["message"].as_str().unwrap_or("").to_owned())
        .collect();
    assert!(
        messages
            .iter()
            .any(|m| m.starts_with("claude-balancer listening")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|m| m == "provider state changed"),
        "{messages:?}"
    );
    assert!(messages.iter().any(|m| m == "shut down"), "{messages:?}");
}

#[tokio::test]
async fn sigterm_lets_a_stream_in_flight_finish() {
    let events = mock_provider::split_events(&mock_provider::anthropic_stream(
        "m",
        "a slow answer in many words",
    ));
    let chunks = events
        .into_iter()
        .map(|e| (Duration::from_millis(150), e.into_bytes()))
        .collect();
    let (_a, mut p) = start_with_one(Reply::sse_chunks(chunks, End::Complete)).await;
    let mut body = request();
    body["stream"] = json!(true);
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", p.url))
        .json(&body)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut text = String::from_utf8(stream.next().await.unwrap().unwrap().to_vec()).unwrap();
    signal(&p, "-TERM");
    while let Some(chunk) = stream.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
    }
    assert!(
        text.trim_end()
            .ends_with("data: {\"type\":\"message_stop\"}"),
        "{text}"
    );
    assert_eq!(wait_exit(&mut p).await, 0);
}

/// Whether requests come to be served by `provider` within five seconds.
async fn comes_to_serve(url: &str, provider: &str) -> bool {
    for _ in 0..100 {
        if served_by(url).await.as_deref() == Some(provider) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    false
}

#[tokio::test]
async fn a_watched_file_is_reloaded_and_a_broken_edit_changes_nothing() {
    let a = MockProvider::start(Reply::message("m", "A")).await.unwrap();
    let b = MockProvider::start(Reply::message("m", "B")).await.unwrap();
    let (ua, ub) = (a.url(), b.url());
    let p = start(|logs| yaml(&[("A", &ua), ("B", &ub)], "A", "  reload: true\n", logs)).await;
    assert_eq!(served_by(&p.url).await.as_deref(), Some("A"));
    // Editors write a new file and rename it over the old one.
    let logs = p.dir.path().join("logs");
    let tmp = p.dir.path().join("config.yaml.tmp");
    std::fs::write(
        &tmp,
        yaml(&[("A", &ua), ("B", &ub)], "B", "  reload: true\n", &logs),
    )
    .unwrap();
    std::fs::rename(&tmp, &p.config).unwrap();
    assert!(
        comes_to_serve(&p.url, "B").await,
        "the route did not move after the file changed"
    );
    std::fs::write(&p.config, "providers: [ this is not yaml").unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(served_by(&p.url).await.as_deref(), Some("B"));
    let refused = log_lines(&p).iter().any(|(_, v)| {
        v["message"] == "configuration reload refused; the running configuration is unchanged"
    });
    assert!(refused, "the broken edit was not logged");
}

#[tokio::test]
async fn sighup_reloads() {
    let a = MockProvider::start(Reply::message("m", "A")).await.unwrap();
    let b = MockProvider::start(Reply::message("m", "B")).await.unwrap();
    let (ua, ub) = (a.url(), b.url());
    let p = start(|logs| yaml(&[("A", &ua), ("B", &ub)], "A", "", logs)).await;
    assert_eq!(served_by(&p.url).await.as_deref(), Some("A"));
    std::fs::write(
        &p.config,
        yaml(
            &[("A", &ua), ("B", &ub)],
            "B",
            "",
            &p.dir.path().join("logs"),
        ),
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        served_by(&p.url).await.as_deref(),
        Some("A"),
        "no reload without a signal or reload: true"
    );
    signal(&p, "-HUP");
    assert!(comes_to_serve(&p.url, "B").await);
}

/// The allocator is built to hand freed pages back from a background thread
/// (`.cargo/config.toml`): without it, the pages of a burst of large request bodies stay resident.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_allocator_returns_freed_pages_from_a_background_thread() {
    let (_a, p) = start_with_one(Reply::message("m", "ok")).await;
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", p.child.id()))
        .unwrap()
        .map(|t| std::fs::read_to_string(t.unwrap().path().join("comm")).unwrap_or_default())
        .map(|name| name.trim().to_owned())
        .collect();
    assert!(
        threads.iter().any(|n| n.starts_with("jemalloc_bg")),
        "{threads:?}"
    );
}

/// The console gets one readable line per request (written out by the flusher, not by the
/// request), and no key.
#[tokio::test]
async fn the_console_gets_a_readable_line_per_request_without_keys() {
    let (_a, p) = start_with_one(Reply::message("m", "ok")).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages", p.url))
        .header("x-api-key", CLIENT_KEY)
        .json(&request())
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let console = p.dir.path().join("console.txt");
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&console).unwrap_or_default();
        if text.contains(" request ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = text
        .lines()
        .find(|l| l.contains(" request "))
        .unwrap_or_else(|| panic!("no request line in {text:?}"));
    assert!(line.contains(" 200 ") && line.contains("-> A "), "{line}");
    assert!(text.contains("listening"), "{text}");
    assert!(
        !text.contains(CLIENT_KEY) && !text.contains(PROVIDER_KEY),
        "{text}"
    );
}

/// A client key sent as `Authorization: bearer …` in any letter case and echoed back by a provider
/// in its error is recognised as the client's credential: it reaches neither the answer, the log
/// file, the console, nor an admin view.
#[tokio::test]
async fn a_client_key_echoed_by_a_provider_is_redacted_whatever_the_scheme_case() {
    let echo = format!("invalid api key: {CLIENT_KEY}");
    let (_a, mut p) = start_with_one(Reply::error(500, "api_error", &echo)).await;
    let client = reqwest::Client::new();
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let resp = client
            .post(format!("{}/v1/messages", p.url))
            .header("authorization", format!("{scheme} {CLIENT_KEY}"))
            .json(&request())
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_server_error(), "{scheme}");
        let body = resp.text().await.unwrap();
        assert!(
            body.contains("****"),
            "{scheme}: the echo is in the answer, masked: {body}"
        );
        assert!(!body.contains(CLIENT_KEY), "{scheme}: {body}");
    }
    for path in ["/providers", "/dashboard/data", "/metrics"] {
        let text = client
            .get(format!("{}{path}", p.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!text.contains(CLIENT_KEY), "{path}: {text}");
    }
    signal(&p, "-TERM");
    assert_eq!(wait_exit(&mut p).await, 0);
    let lines = log_lines(&p);
    assert!(lines.iter().any(|(_, v)| v["message"] == "request"));
    for (raw, _) in &lines {
        assert!(!raw.contains(CLIENT_KEY), "the key reached the log: {raw}");
    }
    let console = std::fs::read_to_string(p.dir.path().join("console.txt")).unwrap();
    assert!(console.contains("attempt failed"), "{console}");
    assert!(
        !console.contains(CLIENT_KEY),
        "the key reached the console: {console}"
    );
}

/// count_tokens leaves a summary line like every other request, marked with its endpoint, with
/// the provider attempts it made before counting locally.
#[tokio::test]
async fn count_tokens_leaves_a_summary_line() {
    let (_a, mut p) = start_with_one(Reply::error(404, "not_found_error", "no count here")).await;
    let resp = reqwest::Client::new()
        .post(format!("{}/v1/messages/count_tokens", p.url))
        .header("x-request-id", "req-count-1")
        .json(&json!({"model": "claude-sonnet-4-6", "messages": [{"role": "user", "content": "hello there"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-token-count"], "local");
    assert!(
        resp.json::<Value>().await.unwrap()["input_tokens"]
            .as_u64()
            .unwrap()
            > 0
    );
    signal(&p, "-TERM");
    assert_eq!(wait_exit(&mut p).await, 0);
    let lines = log_lines(&p);
    let summary = lines
        .iter()
        .map(|(_, v)| v)
        .find(|v| v["message"] == "request" && v["request_id"] == "req-count-1")
        .unwrap_or_else(|| panic!("no summary line for count_tokens: {lines:?}"));
    assert_eq!(summary["endpoint"], "count_tokens");
    assert_eq!(summary["status"], 200);
    assert_eq!(summary["route"], "*");
    assert_eq!(summary["provider"], "");
    let attempts: Value = serde_json::from_str(summary["attempts"].as_str().unwrap()).unwrap();
    assert_eq!(attempts[0]["provider"], "A");
    assert_eq!(attempts[0]["outcome"], "fault");
    assert_eq!(attempts[0]["status"], 404);
}

/// The soft limit on open files is raised to the hard one at start: every client connection holds
/// a descriptor.
#[cfg(target_os = "linux")]
#[tokio::test]
async fn the_open_file_limit_is_raised_to_the_hard_limit() {
    let a = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let ua = a.url();
    let p = launch(
        |logs| yaml(&[("A", &ua)], "A", "", logs),
        Some("ulimit -Sn 256"),
    )
    .await;
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", p.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    assert_eq!(soft, hard, "{line}");
    assert_ne!(soft, "256", "{line}");
}

/// A client over its budget is still refused after the balancer restarts: the usage file keeps
/// what it spent, and the new process charges it back into the client's window.
#[tokio::test]
async fn a_spent_budget_is_still_spent_after_a_restart() {
    let a = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let ua = a.url();
    let data = tempfile::tempdir().unwrap();
    let usage = data.path().join("usage.db");
    let settings = format!("  usage:\n    path: \"{}\"\n", usage.display());
    // claude-sonnet-4-6: 12 input and 5 output tokens cost $0.000111; the budget holds one.
    let text = move |logs: &Path| {
        yaml(&[("A", &ua)], "A", &settings, logs)
            + &format!(
                "clients:\n  - name: alice\n    key: \"{CLIENT_KEY}\"\n    limits:\n      budget_usd: {{ window: 1d, max: 0.0001 }}\n"
            )
    };
    let ask = |url: String| async move {
        let mut body = request();
        body["model"] = "claude-sonnet-4-6".into();
        let resp = reqwest::Client::new()
            .post(format!("{url}/v1/messages"))
            .header("x-api-key", CLIENT_KEY)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap())
    };
    let mut first = start(&text).await;
    assert_eq!(ask(first.url.clone()).await.0, 200);
    assert_eq!(ask(first.url.clone()).await.0, 429);
    signal(&first, "-TERM");
    assert_eq!(wait_exit(&mut first).await, 0);
    drop(first);

    let second = start(&text).await;
    let (status, body) = ask(second.url.clone()).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("budget of 0.0001 USD per 1d"), "{body}");
    assert_eq!(
        a.request_count(),
        1,
        "only the first request reached the provider"
    );
}
