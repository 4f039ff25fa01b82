//! The streaming relay: byte-exact, event by event, the commit point, and what happens after it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::adapter::events::accumulate_sse;
use common::*;
use futures_util::StreamExt;
use mock_provider::anthropic_stream;
use tokio::time::Instant;

const SECS: Duration = Duration::from_secs(1);

async fn two(settings: &str) -> (MockProvider, MockProvider, Balancer) {
    two_providers(
        Reply::message_stream("m", "from A"),
        Reply::message_stream("m", "from B"),
        settings,
    )
    .await
}

#[tokio::test]
async fn relay_is_byte_exact_whatever_the_chunking() {
    let (a, _b, bal) = two("").await;
    let full = anthropic_stream("claude-sonnet-4-6", "one two three four five");
    let bytes = full.as_bytes();
    // Cut at awkward places: mid-line, mid-boundary, mid-UTF-8 is impossible here (ASCII), one byte.
    let cuts = [5, 6, 7, 100, 101, 250, 251, 252, bytes.len() - 3];
    let mut chunks = Vec::new();
    let mut last = 0;
    for c in cuts {
        chunks.push((Duration::ZERO, bytes[last..c].to_vec()));
        last = c;
    }
    chunks.push((Duration::ZERO, bytes[last..].to_vec()));
    a.push(Reply::sse_chunks(chunks, End::Complete));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers()["content-type"],
        "text/event-stream; charset=utf-8"
    );
    assert_eq!(resp.headers()["x-provider-used"], "A");
    let body = resp.bytes().await.unwrap();
    assert_eq!(String::from_utf8_lossy(&body), full);
}

#[tokio::test(start_paused = true)]
async fn events_are_forwarded_as_they_arrive() {
    let (a, _b, bal) = two("").await;
    let events = mock_provider::split_events(&anthropic_stream("m", "hello world"));
    let mut chunks: Vec<(Duration, Vec<u8>)> = events
        .iter()
        .map(|e| (Duration::ZERO, e.clone().into_bytes()))
        .collect();
    // The rest of the stream comes 10 s after the first two events.
    chunks[2].0 = 10 * SECS;
    a.push(Reply::sse_chunks(chunks, End::Complete));
    let started = Instant::now();
    let resp = bal.post("/v1/messages", &request(true)).await;
    let mut body = resp.bytes_stream();
    let first = body.next().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).starts_with("event: message_start"));
    assert!(
        started.elapsed() < 10 * SECS,
        "the first event waited for later ones"
    );
    let mut rest = Vec::new();
    while let Some(c) = body.next().await {
        rest.extend_from_slice(&c.unwrap());
    }
    assert!(started.elapsed() >= 10 * SECS);
    assert!(
        String::from_utf8_lossy(&rest)
            .ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
    );
}

#[tokio::test]
async fn an_error_as_first_event_fails_over() {
    let (a, b, bal) = two("").await;
    a.push(Reply::sse("event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n"));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(ev.first().unwrap().0, "message_start");
    assert_eq!(ev.last().unwrap().0, "message_stop");
    assert_eq!(b.request_count(), 1);
    assert_eq!(bal.provider("A").await["state"], "cooling_down");
}

#[tokio::test]
async fn a_cut_before_the_first_event_fails_over() {
    let (a, b, bal) = two("").await;
    a.push(Reply::sse_chunks(
        vec![(
            Duration::ZERO,
            b"event: message_start\ndata: {\"ty".to_vec(),
        )],
        End::Cut,
    ));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    let ev = events(&resp.text().await.unwrap());
    assert_eq!(names(&ev).last(), Some(&"message_stop"));
    assert_eq!(b.request_count(), 1);
}

#[tokio::test]
async fn body_patterns_apply_to_the_first_events() {
    let (a, b, bal) = two("  failure_cooldown: 0\n  unhealthy_response_body_patterns: [\"\\\"model\\\":\\\"bad-relay\\\"\"]\n").await;
    a.push(Reply::message_stream("bad-relay", "x"));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert_eq!(b.request_count(), 1);
    // After commit the patterns are never applied: generated text may contain anything.
    a.push(Reply::message_stream("m", "\"model\":\"bad-relay\""));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
}

#[tokio::test]
async fn a_cut_after_commit_ends_with_an_error_event() {
    let (a, b, bal) = two("").await;
    let events_a = mock_provider::split_events(&anthropic_stream("m", "partial answer here"));
    let chunks = events_a[..4]
        .iter()
        .map(|e| (Duration::ZERO, e.clone().into_bytes()))
        .collect();
    a.push(Reply::sse_chunks(chunks, End::Cut));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.status(), 200);
    let ev = events(&resp.text().await.unwrap());
    let n = names(&ev);
    assert_eq!(n[0], "message_start");
    assert_eq!(*n.last().unwrap(), "error", "{n:?}");
    assert!(!n.contains(&"message_stop"));
    assert_eq!(ev.last().unwrap().1["error"]["type"], "api_error");
    // No failover after commit, and the break counts against A.
    assert_eq!(b.request_count(), 0);
    assert_eq!(bal.provider("A").await["failures"], 1);
}

#[tokio::test]
async fn a_partial_event_at_the_cut_is_not_forwarded() {
    let (a, _b, bal) = two("").await;
    let mut events_a = mock_provider::split_events(&anthropic_stream("m", "abc"));
    events_a.truncate(3);
    events_a.push("event: content_block_delta\ndata: {\"type\":\"content_bl".into());
    let chunks = events_a
        .iter()
        .map(|e| (Duration::ZERO, e.clone().into_bytes()))
        .collect();
    a.push(Reply::sse_chunks(chunks, End::Cut));
    let text = bal
        .post("/v1/messages", &request(true))
        .await
        .text()
        .await
        .unwrap();
    assert!(
        !text.contains("content_bl\n"),
        "half an event reached the client: {text}"
    );
    let ev = events(&text);
    assert!(
        ev.iter().all(|(_, d)| !d.is_null()),
        "every event is valid JSON: {text}"
    );
    assert_eq!(names(&ev).last(), Some(&"error"));
}

#[tokio::test(start_paused = true)]
async fn silence_after_commit_gets_pings_then_an_error() {
    let (a, _b, bal) = two("  timeouts:\n    streaming:\n      read_timeout: 40\n").await;
    let first = mock_provider::split_events(&anthropic_stream("m", "x"))[0].clone();
    a.push(Reply::sse_chunks(
        vec![(Duration::ZERO, first.into_bytes())],
        End::Hang,
    ));
    let started = Instant::now();
    let resp = bal.post("/v1/messages", &request(true)).await;
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    assert_eq!(
        names(&ev),
        vec!["message_start", "ping", "ping", "error"],
        "{text}"
    );
    assert!(
        ev[3].1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("read_timeout")
    );
    let elapsed = started.elapsed();
    assert!(elapsed >= 40 * SECS && elapsed < 41 * SECS, "{elapsed:?}");
    // The balancer closed the upstream connection.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(a.client_closed(), 1);
}

#[tokio::test(start_paused = true)]
async fn pings_and_the_idle_timeout_count_from_the_last_event() {
    // Events every 10 s keep a 40 s read_timeout from firing; after the last one, pings follow
    // 15 s after the last output and the error 40 s after the last event.
    let (a, _b, bal) = two("  timeouts:\n    streaming:\n      read_timeout: 40\n").await;
    let chunks: Vec<(Duration, Vec<u8>)> =
        mock_provider::split_events(&anthropic_stream("m", "x y z"))
            .into_iter()
            .take(4)
            .enumerate()
            .map(|(i, e)| {
                (
                    if i == 0 { Duration::ZERO } else { 10 * SECS },
                    e.into_bytes(),
                )
            })
            .collect();
    let sent: Vec<String> = chunks
        .iter()
        .map(|(_, e)| events(&String::from_utf8_lossy(e))[0].0.clone())
        .collect();
    a.push(Reply::sse_chunks(chunks, End::Hang));
    let started = Instant::now();
    let resp = bal.post("/v1/messages", &request(true)).await;
    let text = resp.text().await.unwrap();
    let ev = events(&text);
    let mut want: Vec<&str> = sent.iter().map(String::as_str).collect();
    want.extend(["ping", "ping", "error"]);
    assert_eq!(names(&ev), want, "{text}");
    let elapsed = started.elapsed();
    assert!(elapsed >= 70 * SECS && elapsed < 71 * SECS, "{elapsed:?}");
}

#[tokio::test(start_paused = true)]
async fn the_stream_ends_at_message_stop_even_if_the_provider_lingers() {
    let (a, _b, bal) = two("").await;
    let chunks = mock_provider::split_events(&anthropic_stream("m", "done"))
        .into_iter()
        .map(|e| (Duration::ZERO, e.into_bytes()))
        .collect();
    a.push(Reply::sse_chunks(chunks, End::Hang));
    let started = Instant::now();
    let text = bal
        .post("/v1/messages", &request(true))
        .await
        .text()
        .await
        .unwrap();
    assert_eq!(names(&events(&text)).last(), Some(&"message_stop"));
    assert!(started.elapsed() < SECS);
}

#[tokio::test]
async fn a_final_event_without_its_blank_line_is_completed() {
    let (a, _b, bal) = two("").await;
    let full = anthropic_stream("m", "ok");
    let trimmed = full.trim_end().to_owned();
    a.push(Reply::sse_chunks(
        vec![(Duration::ZERO, trimmed.clone().into_bytes())],
        End::Complete,
    ));
    let text = bal
        .post("/v1/messages", &request(true))
        .await
        .text()
        .await
        .unwrap();
    assert!(text.starts_with(&trimmed));
    assert_eq!(names(&events(&text)).last(), Some(&"message_stop"));
    assert!(!text.contains("event: error"));
}

#[tokio::test(start_paused = true)]
async fn a_provider_silent_before_its_first_event_fails_over() {
    let (a, b, bal) = two("  timeouts:\n    streaming:\n      read_timeout: 20\n").await;
    a.push(Reply::sse_chunks(vec![], End::Hang));
    let started = Instant::now();
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    assert!(started.elapsed() >= 20 * SECS);
    assert_eq!(b.request_count(), 1);
}

/// A provider whose whole stream arrives in one read (a short answer, a buffering relay): the
/// events read before commit count toward the ending, so the client gets the stream exactly as
/// sent, with no error after `message_stop`, and the provider is not put into cooldown.
#[tokio::test]
async fn a_stream_that_arrives_in_one_read_ends_cleanly() {
    for end in [End::Complete, End::Hang] {
        let (a, _b, bal) = two("  failure_cooldown: 600\n").await;
        let full = anthropic_stream("claude-sonnet-4-6", "short");
        a.push(Reply::sse_chunks(
            vec![(Duration::ZERO, full.clone().into_bytes())],
            end.clone(),
        ));
        let resp = bal.post("/v1/messages", &request(true)).await;
        assert_eq!(resp.headers()["x-provider-used"], "A");
        let text = tokio::time::timeout(Duration::from_secs(20), resp.text())
            .await
            .unwrap_or_else(|_| panic!("{end:?}: the stream never ended"))
            .unwrap();
        assert_eq!(text, full, "{end:?}: the stream as sent, nothing added");
        let p = bal.provider("A").await;
        assert_eq!(p["state"], "healthy", "{end:?}: {p}");
        assert_eq!(p["consecutive_failures"], 0, "{end:?}: {p}");
    }
}

/// Pings and comments before the first event decide nothing: a comment does not commit the
/// stream (the error that follows it still fails over), and a flood of them past the prefix bound
/// is a provider fault instead of a buffer that grows for the whole first-event timeout.
#[tokio::test]
async fn keep_alives_before_the_first_event_never_commit_and_are_bounded() {
    let (a, _b, bal) = two("").await;
    a.push(Reply::sse_chunks(
        vec![
            (Duration::ZERO, b": OPENROUTER PROCESSING\n\n".to_vec()),
            (
                Duration::from_millis(5),
                b"event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"busy\"}}\n\n".to_vec(),
            ),
        ],
        End::Complete,
    ));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(
        resp.headers()["x-provider-used"],
        "B",
        "the comment did not commit A"
    );
    let text = resp.text().await.unwrap();
    assert_eq!(
        accumulate_sse(&text).unwrap()["content"][0]["text"],
        "from B"
    );

    let ping = "event: ping\ndata: {\"type\": \"ping\"}\n\n";
    let flood = ping.repeat(claude_balancer::dispatch::attempt::MAX_PREFIX_BYTES / ping.len() + 10);
    let mut chunks: Vec<(Duration, Vec<u8>)> = flood
        .as_bytes()
        .chunks(64 * 1024)
        .map(|c| (Duration::ZERO, c.to_vec()))
        .collect();
    chunks.push((Duration::ZERO, anthropic_stream("m", "late").into_bytes()));
    a.push(Reply::sse_chunks(chunks, End::Complete));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "B");
    let text = resp.text().await.unwrap();
    assert_eq!(
        accumulate_sse(&text).unwrap()["content"][0]["text"],
        "from B"
    );
    let last_error = bal.provider("A").await["last_error"].to_string();
    assert!(
        last_error.contains("before the first event"),
        "{last_error}"
    );
}

/// One upstream event that never ends is cut off at the event bound: before commit a provider
/// fault (the next candidate serves), after commit one `event: error`, instead of a buffer that
/// grows without bound.
#[tokio::test]
async fn an_event_without_an_end_is_bounded() {
    let (a, _b, bal) = two("").await;
    let endless = |head: &str| {
        let mut chunks = vec![(Duration::ZERO, head.as_bytes().to_vec())];
        let mb = vec![b'a'; 1 << 20];
        let n = claude_balancer::dispatch::relay::MAX_EVENT_BYTES / (1 << 20) + 2;
        chunks.extend((0..n).map(|_| (Duration::ZERO, mb.clone())));
        Reply::sse_chunks(chunks, End::Hang)
    };
    a.push(endless("event: message_start\ndata: "));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(
        resp.headers()["x-provider-used"],
        "B",
        "before commit: failed over"
    );
    resp.text().await.unwrap();

    let (a, _b, bal) = two("").await;
    let full = anthropic_stream("m", "x");
    let start = full.split_inclusive("\n\n").next().unwrap().to_owned();
    a.push(endless(&format!(
        "{start}event: content_block_delta\ndata: "
    )));
    let resp = bal.post("/v1/messages", &request(true)).await;
    assert_eq!(resp.headers()["x-provider-used"], "A");
    let text = tokio::time::timeout(Duration::from_secs(30), resp.text())
        .await
        .expect("the stream never ended")
        .unwrap();
    let evs = events(&text);
    assert_eq!(
        names(&evs),
        vec!["message_start", "error"],
        "{}",
        &text[..200.min(text.len())]
    );
    assert!(
        evs[1].1["error"]["message"]
            .as_str()
            .unwrap()
            .contains("larger than 16 MiB")
    );
}
