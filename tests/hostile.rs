//! What a hostile client or a hostile upstream can do, kept from doing harm: each test here is an
//! attack that once worked (see the fault matrix for the ordinary faults).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::server::{FIRST_REQUEST_TIMEOUT, IDLE_TIMEOUT};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// Reads until the server closes the connection (or ten minutes pass); when it closed.
async fn closed_after(tcp: &mut TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = vec![0u8; 4096];
    timeout(Duration::from_secs(600), async {
        loop {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the connection is still open after ten minutes");
    started.elapsed()
}

async fn balancer() -> (MockProvider, MockProvider, Balancer) {
    two_providers(
        Reply::message("m", "from A"),
        Reply::message("m", "from B"),
        "  timeouts:\n    non_streaming:\n      read_timeout: 400\n",
    )
    .await
}

/// A connection that never sends a byte is closed at the first-request deadline, so idle sockets
/// cannot pile up until the process runs out of descriptors.
#[tokio::test(start_paused = true)]
async fn a_connection_that_never_speaks_is_closed() {
    let (_a, _b, bal) = balancer().await;
    let mut tcp = TcpStream::connect(bal.addr).await.unwrap();
    let took = closed_after(&mut tcp).await;
    assert!(took >= FIRST_REQUEST_TIMEOUT, "{took:?}");
    assert!(took <= FIRST_REQUEST_TIMEOUT + IDLE_TIMEOUT, "{took:?}");
}

/// HTTP/2: the preface alone, then nothing, is closed once idle.
#[tokio::test(start_paused = true)]
async fn an_http2_preface_alone_is_closed() {
    let (_a, _b, bal) = balancer().await;
    let mut tcp = TcpStream::connect(bal.addr).await.unwrap();
    tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let took = closed_after(&mut tcp).await;
    assert!(took <= FIRST_REQUEST_TIMEOUT + 2 * IDLE_TIMEOUT, "{took:?}");
}

/// A keep-alive connection with nothing in flight is closed after the idle timeout.
#[tokio::test(start_paused = true)]
async fn an_idle_keep_alive_connection_is_closed() {
    let (_a, _b, bal) = balancer().await;
    let mut tcp = TcpStream::connect(bal.addr).await.unwrap();
    tcp.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // hyper's header timeout closes an HTTP/1 connection that waits for its next request's
    // headers; the idle check is the bound behind it.
    let took = closed_after(&mut tcp).await;
    assert!(took <= 2 * IDLE_TIMEOUT, "{took:?}");
}

/// A request waiting on a slow provider is not idle: its connection stays open past the idle
/// timeout and gets its answer.
#[tokio::test(start_paused = true)]
async fn a_request_waiting_on_a_slow_provider_is_not_idle() {
    let (a, _b, bal) = balancer().await;
    a.push(Reply::message("m", "slow").with_delay(3 * IDLE_TIMEOUT));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-provider-used"], "A");
}

/// Member names are read as a JSON parser reads them: an escaped `"mod\u0065l"` is the model (it
/// is mapped, not passed through unmapped), an escaped `"str\u0065am"` asks for a stream, and a
/// body naming a top-level member twice (in any spelling) is refused with a 400 naming it.
#[tokio::test]
async fn escaped_member_names_cannot_bypass_routing_or_mapping() {
    let p = MockProvider::start(Reply::message("m", "ok"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n{}model_routes:\n  \"claude-*\":\n    - {{provider: P, model: vendor/mapped}}\n",
        provider_yaml("P", &p.url())
    );
    let bal = Balancer::start(&yaml).await;
    let post = |raw: &'static str| {
        bal.client
            .post(format!("{}/v1/messages", bal.url))
            .header("content-type", "application/json")
            .body(raw)
            .send()
    };
    let resp = post(
        r#"{"mod\u0065l":"claude-x","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#,
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let sent: serde_json::Value = serde_json::from_slice(&p.requests()[0].body).unwrap();
    assert_eq!(
        sent["model"], "vendor/mapped",
        "the escaped name was mapped"
    );

    for (raw, member) in [
        (
            r#"{"model":"claude-x","mod\u0065l":"other","max_tokens":5,"messages":[]}"#,
            "model",
        ),
        (
            r#"{"model":"claude-x","stream":false,"str\u0065am":true,"max_tokens":5,"messages":[]}"#,
            "stream",
        ),
        (
            r#"{"model":"claude-x","max_tokens":5,"max_tokens":9,"messages":[]}"#,
            "max_tokens",
        ),
    ] {
        let resp = post(raw).await.unwrap();
        assert_eq!(resp.status(), 400, "{raw}");
        let v: serde_json::Value = resp.json().await.unwrap();
        let message = v["error"]["message"].as_str().unwrap();
        assert!(message.contains(&format!("{member:?}")), "{raw}: {message}");
    }
    assert_eq!(p.request_count(), 1, "no refused body reached the provider");

    p.push(Reply::message_stream("m", "streamed"));
    let resp = post(r#"{"model":"claude-x","str\u0065am":true,"max_tokens":5,"messages":[{"role":"user","content":"hi"}]}"#)
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let content_type = resp.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
}

const KEY: &str = "sk-prov/ider+KEY-0123456789";

fn provider_with_key(kind: &str, url: &str) -> String {
    let base = if kind == "openai" {
        format!("{url}/v1")
    } else {
        url.to_owned()
    };
    format!(
        "providers:\n  - {{name: P, type: {kind}, base_url: \"{base}\", auth_type: api_key, auth_value: \"{KEY}\"}}\nmodel_routes:\n  \"*\":\n    - {{provider: P, model: passthrough}}\n"
    )
}

/// No part of the key may be left: not the key, not its JSON-escaped form, not a prefix.
fn assert_no_key(label: &str, text: &str) {
    let escaped = KEY.replace('/', "\\/");
    for leak in [KEY, escaped.as_str(), &KEY[..12]] {
        assert!(!text.contains(leak), "{label}: {leak:?} leaked in {text}");
    }
}

/// A provider that echoes its own key in an error (raw, JSON-escaped, or placed across the
/// point where the reason is cut short) never gets it to the client, the health book or the
/// admin views, for both provider types and for client faults and provider faults alike.
#[tokio::test]
async fn a_key_echoed_by_a_provider_is_masked_everywhere() {
    let filler = "x".repeat(190);
    let echoes = [
        format!("invalid key {KEY}"),
        format!("invalid key {}", KEY.replace('/', "\\/")),
        format!("{filler} {KEY}"),
    ];
    for kind in ["anthropic", "openai"] {
        for status in [400, 500] {
            for echo in &echoes {
                // Written by hand: the JSON-escaped form must reach the balancer as it is.
                let p = MockProvider::start(Reply::Full {
                    status,
                    headers: vec![("content-type".into(), "application/json".into())],
                    body: format!("{{\"type\":\"error\",\"error\":{{\"type\":\"api_error\",\"message\":\"{echo}\"}}}}").into_bytes(),
                    delay: Duration::ZERO,
                })
                .await
                .unwrap();
                let bal = Balancer::start(&provider_with_key(kind, &p.url())).await;
                let label = format!("{kind} {status} {}", &echo[..echo.len().min(30)]);
                let resp = bal.post("/v1/messages", &request(false)).await;
                assert_eq!(resp.status().as_u16(), status, "{label}");
                let body = resp.text().await.unwrap();
                assert_no_key(&label, &body);
                if status == 400 || echo.len() < 100 {
                    // A client fault's body is passed on whole; a short reason keeps the echo.
                    assert!(
                        body.contains("****"),
                        "{label}: masked, not dropped: {body}"
                    );
                }
                let (_, providers) = bal.get_json("/providers").await;
                assert_no_key(&label, &providers.to_string());
                let (_, dash) = bal.get_json("/dashboard/data").await;
                assert_no_key(&label, &dash.to_string());
            }
        }
    }
}
