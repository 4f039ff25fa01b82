//! Coalescing of identical requests in flight, and the response cache.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::adapter::events::accumulate_sse;
use common::*;
use futures_util::StreamExt;
use mock_provider::{anthropic_stream, split_events};
use serde_json::{Value, json};

const SECS: Duration = Duration::from_secs(1);

/// A streamed answer with text and a tool call, one event a second.
fn slow_tool_stream() -> Reply {
    let mut events = split_events(&anthropic_stream("m", "let me run it"));
    let stop = events.split_off(events.len() - 3); // content_block_stop, message_delta, message_stop
    let mut all: Vec<String> = events;
    all.push(stop[0].clone());
    all.push("event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"Bash\",\"input\":{}}}\n\n".into());
    all.push("event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"command\\\":\\\"ls\\\"}\"}}\n\n".into());
    all.push(
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n".into(),
    );
    all.push("event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":9}}\n\n".into());
    all.push(stop[2].clone());
    Reply::sse_chunks(
        all.into_iter().map(|e| (SECS, e.into_bytes())).collect(),
        End::Complete,
    )
}

async fn setup(settings: &str) -> (MockProvider, Balancer) {
    let p = MockProvider::start(Reply::message("m", "default"))
        .await
        .unwrap();
    let bal = Balancer::start(&config_yaml(&[("P", &p.url(), 1)], settings)).await;
    (p, bal)
}

async fn body_and_cache(resp: reqwest::Response) -> (String, String) {
    let cache = resp
        .headers()
        .get("x-balancer-cache")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (resp.text().await.unwrap(), cache)
}

#[tokio::test(start_paused = true)]
async fn identical_requests_make_one_upstream_call_and_all_get_the_same_answer() {
    let (p, bal) = setup("").await;
    p.push(slow_tool_stream());
    let stream_req = request(true);
    let plain_req = request(false);
    let mut futs = Vec::new();
    let bal = &bal;
    for i in 0..6 {
        let body = if i % 2 == 0 { &stream_req } else { &plain_req };
        futs.push(async move { body_and_cache(bal.post("/v1/messages", body).await).await });
    }
    let results = futures_util::future::join_all(futs).await;
    assert_eq!(
        p.request_count(),
        1,
        "one upstream call for six identical requests"
    );
    let caches: Vec<&str> = results.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        caches.iter().filter(|c| **c == "miss").count(),
        1,
        "{caches:?}"
    );
    assert_eq!(
        caches.iter().filter(|c| **c == "coalesced").count(),
        5,
        "{caches:?}"
    );
    let streamed: Vec<&String> = results.iter().step_by(2).map(|(b, _)| b).collect();
    let plain: Vec<Value> = results
        .iter()
        .skip(1)
        .step_by(2)
        .map(|(b, _)| serde_json::from_str(b).unwrap())
        .collect();
    for s in &streamed {
        assert_eq!(*s, streamed[0], "streaming clients get identical bytes");
    }
    let rebuilt = accumulate_sse(streamed[0]).unwrap();
    for m in &plain {
        assert_eq!(
            m, &rebuilt,
            "non-streaming clients get the assembled message"
        );
    }
    assert_eq!(rebuilt["content"][1]["input"], json!({"command":"ls"}));
    assert_eq!(rebuilt["stop_reason"], "tool_use");
    assert_eq!(
        bal.get_json("/providers").await.1["deduplication"]["coalesced"],
        5
    );
}

#[tokio::test(start_paused = true)]
async fn a_late_joiner_gets_the_whole_replay() {
    let (p, bal) = setup("").await;
    p.push(slow_tool_stream());
    let first = bal.post("/v1/messages", &request(true));
    let late = async {
        tokio::time::sleep(5 * SECS).await;
        body_and_cache(bal.post("/v1/messages", &request(true)).await).await
    };
    let (a, (b, cache)) = tokio::join!(async { first.await.text().await.unwrap() }, late);
    assert_eq!(cache, "coalesced");
    assert_eq!(a, b);
    assert!(b.starts_with("event: message_start"));
    assert_eq!(p.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn different_clients_and_different_bodies_never_coalesce() {
    let (p, bal) = setup("").await;
    p.set_default(Reply::message("m", "x").with_delay(3 * SECS));
    let a = bal.post_with(
        "/v1/messages",
        &request(false),
        &[("x-api-key", "user-one")],
    );
    let b = bal.post_with(
        "/v1/messages",
        &request(false),
        &[("x-api-key", "user-two")],
    );
    let mut other = request(false);
    other["temperature"] = json!(0.5);
    let c = bal.post_with("/v1/messages", &other, &[("x-api-key", "user-one")]);
    let (ra, rb, rc) = tokio::join!(a, b, c);
    for r in [ra, rb, rc] {
        assert_eq!(r.headers()["x-balancer-cache"], "miss");
    }
    assert_eq!(p.request_count(), 3);
}

#[tokio::test(start_paused = true)]
async fn key_order_and_whitespace_do_not_matter() {
    let (p, bal) = setup("").await;
    p.set_default(Reply::message("m", "x").with_delay(3 * SECS));
    let a = r#"{"model":"claude-sonnet-4-6","max_tokens":100,"messages":[{"role":"user","content":"hello"}]}"#;
    let b = "{ \"messages\": [ {\"content\": \"hello\", \"role\": \"user\"} ],\n \"max_tokens\": 200, \"model\": \"claude-sonnet-4-6\", \"stream\": false }";
    let send = |body: &'static str| {
        bal.client
            .post(format!("{}/v1/messages", bal.url))
            .body(body)
            .send()
    };
    let (ra, rb) = tokio::join!(send(a), send(b));
    let caches = [
        ra.unwrap().headers()["x-balancer-cache"].clone(),
        rb.unwrap().headers()["x-balancer-cache"].clone(),
    ];
    assert!(caches.contains(&"coalesced".parse().unwrap()), "{caches:?}");
    assert_eq!(p.request_count(), 1);
}

#[tokio::test(start_paused = true)]
async fn the_first_client_leaving_does_not_break_the_others_and_the_last_cancels() {
    let (p, bal) = setup("").await;
    p.push(slow_tool_stream());
    // The first client reads one chunk and hangs up.
    let first = bal.post("/v1/messages", &request(true)).await;
    let mut s = first.bytes_stream();
    s.next().await.unwrap().unwrap();
    let second = bal.post("/v1/messages", &request(true)).await;
    drop(s);
    let text = second.text().await.unwrap();
    assert!(accumulate_sse(&text).is_ok(), "{text}");
    assert_eq!(p.request_count(), 1);
    assert_eq!(p.client_closed(), 0);

    // Now everyone leaves mid-stream: the upstream connection is closed.
    p.push(slow_tool_stream());
    let mut body = request(true);
    body["messages"][0]["content"] = json!("another question");
    let a = bal.post("/v1/messages", &body).await;
    let b = bal.post("/v1/messages", &body).await;
    let mut sa = a.bytes_stream();
    sa.next().await.unwrap().unwrap();
    drop(sa);
    drop(b);
    tokio::time::sleep(3 * SECS).await;
    assert_eq!(p.request_count(), 2);
    assert_eq!(
        p.client_closed(),
        1,
        "the upstream call was cancelled when the last client left"
    );
}

#[tokio::test(start_paused = true)]
async fn an_upstream_failure_reaches_every_subscriber_in_its_own_form() {
    let (p, bal) = setup("").await;
    // Before commit: an error status for everyone.
    p.push(Reply::error(400, "invalid_request_error", "bad thing").with_delay(2 * SECS));
    let (a, b) = tokio::join!(
        bal.post("/v1/messages", &request(true)),
        bal.post("/v1/messages", &request(false))
    );
    assert_eq!((a.status().as_u16(), b.status().as_u16()), (400, 400));
    assert_eq!(p.request_count(), 1);
    // After commit: the stream ends with an error event; a non-streaming subscriber gets an error status.
    let events = split_events(&anthropic_stream("m", "partial words here"));
    let chunks = events[..4]
        .iter()
        .map(|e| (SECS, e.clone().into_bytes()))
        .collect();
    p.push(Reply::sse_chunks(chunks, End::Cut));
    let mut body = request(true);
    body["messages"][0]["content"] = json!("second");
    let mut plain = body.clone();
    plain["stream"] = json!(false);
    let (a, b) = tokio::join!(
        bal.post("/v1/messages", &body),
        bal.post("/v1/messages", &plain)
    );
    let text = a.text().await.unwrap();
    assert!(
        text.contains("event: error") && !text.contains("message_stop"),
        "{text}"
    );
    assert_eq!(b.status().as_u16(), 502);
    let v: Value = b.json().await.unwrap();
    assert_eq!(v["type"], "error");
}

#[tokio::test(start_paused = true)]
async fn a_waiter_past_the_deduplication_timeout_makes_its_own_attempt() {
    let (p, bal) = setup("  timeouts:\n    caching:\n      deduplication_timeout: 5\n").await;
    p.push(Reply::message("m", "slow").with_delay(30 * SECS));
    p.push(Reply::message("m", "own attempt"));
    let first = bal.post("/v1/messages", &request(false));
    let second = async {
        tokio::time::sleep(SECS).await;
        bal.post("/v1/messages", &request(false)).await
    };
    let started = tokio::time::Instant::now();
    let (a, b) = tokio::join!(first, second);
    let b_cache = b.headers()["x-balancer-cache"].to_str().unwrap().to_owned();
    let b_text: Value = b.json().await.unwrap();
    assert_eq!(b_cache, "miss");
    assert_eq!(b_text["content"][0]["text"], "own attempt");
    assert_eq!(
        a.json::<Value>().await.unwrap()["content"][0]["text"],
        "slow"
    );
    assert_eq!(p.request_count(), 2);
    assert!(started.elapsed() >= 30 * SECS);
}

#[tokio::test(start_paused = true)]
async fn the_cache_serves_hits_as_stream_or_json_and_expires() {
    let (p, bal) = setup("  max_cache_size: 10\n  cache_ttl_seconds: 60\n").await;
    p.push(Reply::message_stream("m", "cached answer"));
    let (first, cache) = body_and_cache(bal.post("/v1/messages", &request(true)).await).await;
    assert_eq!(cache, "miss");
    let original = accumulate_sse(&first).unwrap();
    // A hit as JSON.
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-balancer-cache"], "hit");
    let m: Value = resp.json().await.unwrap();
    assert_eq!(m["content"], original["content"]);
    assert_ne!(m["id"], original["id"], "a hit is a new message");
    // A hit as a stream.
    let (text, cache) = body_and_cache(bal.post("/v1/messages", &request(true)).await).await;
    assert_eq!(cache, "hit");
    assert_eq!(
        accumulate_sse(&text).unwrap()["content"],
        original["content"]
    );
    assert_eq!(p.request_count(), 1);
    let stats = bal.get_json("/providers").await.1["deduplication"].clone();
    assert_eq!(stats["cache_hits"], 2);
    assert_eq!(stats["cache_entries"], 1);
    // Expiry.
    tokio::time::sleep(61 * SECS).await;
    p.push(Reply::message("m", "fresh"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-balancer-cache"], "miss");
    assert_eq!(p.request_count(), 2);
    // Clearing.
    let r = bal.clear_cache().await;
    assert_eq!(r["entries_removed"], 1);
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.headers()["x-balancer-cache"],
        "miss"
    );
}

#[tokio::test]
async fn errors_and_broken_streams_are_never_cached() {
    let (p, bal) = setup("  max_cache_size: 10\n").await;
    p.push(Reply::error(400, "invalid_request_error", "no"));
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.status(),
        400
    );
    let events = split_events(&anthropic_stream("m", "partial"));
    p.push(Reply::sse_chunks(
        events[..3]
            .iter()
            .map(|e| (Duration::ZERO, e.clone().into_bytes()))
            .collect(),
        End::Cut,
    ));
    bal.post("/v1/messages", &request(true))
        .await
        .text()
        .await
        .unwrap();
    p.push(Reply::message("m", "good"));
    let resp = bal.post("/v1/messages", &request(false)).await;
    assert_eq!(resp.headers()["x-balancer-cache"], "miss");
    assert_eq!(p.request_count(), 3);
    assert_eq!(
        bal.post("/v1/messages", &request(false)).await.headers()["x-balancer-cache"],
        "hit"
    );
}

#[tokio::test]
async fn the_cache_is_bounded_by_entries() {
    let (_p, bal) = setup("  max_cache_size: 2\n").await;
    for i in 0..5 {
        let mut body = request(false);
        body["messages"][0]["content"] = json!(format!("question {i}"));
        bal.post("/v1/messages", &body).await;
    }
    assert_eq!(
        bal.get_json("/providers").await.1["deduplication"]["cache_entries"],
        2
    );
}

#[tokio::test(start_paused = true)]
async fn a_replay_buffer_past_its_bound_takes_no_new_joiners_and_stays_bounded() {
    let (p, bal) = setup("").await;
    // 24 events of 1 MiB each, then, 10 s later, the end.
    let big = "x".repeat(1024 * 1024);
    let head = split_events(&anthropic_stream("m", "a"));
    let mut chunks: Vec<(Duration, Vec<u8>)> = head[..2]
        .iter()
        .map(|e| (Duration::ZERO, e.clone().into_bytes()))
        .collect();
    for _ in 0..24 {
        let e = format!(
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":0,\"delta\":{{\"type\":\"text_delta\",\"text\":\"{big}\"}}}}\n\n"
        );
        chunks.push((Duration::ZERO, e.into_bytes()));
    }
    for (n, e) in head[head.len() - 3..].iter().enumerate() {
        chunks.push((
            if n == 0 { 10 * SECS } else { Duration::ZERO },
            e.clone().into_bytes(),
        ));
    }
    p.push(Reply::sse_chunks(chunks, End::Complete));
    let resp = bal.post("/v1/messages", &request(true)).await;
    let mut s = resp.bytes_stream();
    let mut read = 0usize;
    let mut max_held = 0usize;
    let mut joined = false;
    while let Some(chunk) = s.next().await {
        read += chunk.unwrap().len();
        max_held = max_held.max(bal.state.dedup.stats().in_flight_bytes);
        if read > 20 * 1024 * 1024 && !joined {
            joined = true;
            // Past the bound, an identical request makes its own attempt.
            p.push(Reply::message_stream("m", "separately"));
            let late = bal.post("/v1/messages", &request(true)).await;
            assert_eq!(late.headers()["x-balancer-cache"], "miss");
            assert!(late.text().await.unwrap().contains("separately"));
        }
    }
    assert!(joined && read > 24 * 1024 * 1024);
    assert_eq!(p.request_count(), 2);
    assert!(
        max_held <= claude_balancer::dedup::MAX_REPLAY_BYTES + 2 * 1024 * 1024,
        "held {max_held}"
    );
}

/// Eight identical requests released together by a barrier, fifty times over: joining a flight or
/// starting one is a single step, so exactly one of each eight reaches the provider.
#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn identical_requests_released_together_make_exactly_one_upstream_call() {
    let (p, bal) = setup("").await;
    p.set_default(Reply::message("m", "x").with_delay(Duration::from_millis(200)));
    for round in 0..50 {
        let before = p.request_count();
        let mut body = request(false);
        body["messages"][0]["content"] = json!(format!("round {round}"));
        let raw = bytes::Bytes::from(serde_json::to_vec(&body).unwrap());
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(8));
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let (state, raw, barrier) = (bal.state.clone(), raw.clone(), barrier.clone());
            tasks.push(tokio::spawn(async move {
                barrier.wait().await;
                serve_in_process(&state, raw).await
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), 200);
        }
        assert_eq!(
            p.request_count() - before,
            1,
            "round {round}: eight identical requests made more than one upstream call"
        );
    }
}

/// One `/v1/messages` request served in-process through the coalescer; its status.
async fn serve_in_process(
    state: &std::sync::Arc<claude_balancer::state::AppState>,
    raw: bytes::Bytes,
) -> u16 {
    let envelope = claude_balancer::inbound::body::parse(&raw).unwrap();
    let inbound =
        claude_balancer::dispatch::Inbound::new(envelope, raw, http::HeaderMap::new(), None, None);
    claude_balancer::dedup::serve(state, inbound)
        .await
        .status()
        .as_u16()
}

/// The client that started a flight hangs up before the provider's first event: a client that
/// joined still gets the whole answer from the same upstream call; with nobody else waiting, the
/// upstream call is dropped at once.
#[tokio::test(start_paused = true)]
async fn the_first_client_leaving_before_the_answer_hands_the_call_to_the_others() {
    let (p, bal) = setup("").await;
    p.push(slow_tool_stream());
    let first = tokio::time::timeout(SECS / 2, bal.post("/v1/messages", &request(true)));
    let second = async {
        tokio::time::sleep(SECS / 4).await;
        bal.post("/v1/messages", &request(true)).await
    };
    let (first, second) = tokio::join!(first, second);
    assert!(first.is_err(), "the first client gave up before any event");
    assert_eq!(second.headers()["x-balancer-cache"], "coalesced");
    let text = second.text().await.unwrap();
    let message = accumulate_sse(&text).unwrap();
    assert_eq!(message["content"][1]["name"], "Bash", "{text}");
    assert_eq!(p.request_count(), 1);
    assert_eq!(p.client_closed(), 0);

    // Alone, the first client hanging up cancels the upstream call.
    p.push(slow_tool_stream());
    let mut body = request(true);
    body["messages"][0]["content"] = json!("alone");
    let gave_up = tokio::time::timeout(SECS / 2, bal.post("/v1/messages", &body)).await;
    assert!(gave_up.is_err());
    tokio::time::sleep(3 * SECS).await;
    assert_eq!(p.request_count(), 2);
    assert_eq!(p.client_closed(), 1, "the upstream call was dropped");
    assert_eq!(bal.state.dedup.stats().in_flight, 0);
}
