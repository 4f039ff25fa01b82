//! The fault matrix: every fault the fake provider can inject × streaming or not × anthropic or
//! openai provider × one or two candidates. Every client gets either a complete, valid answer or a
//! well-formed Anthropic error with the right status, in bounded time.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use std::time::Duration;

use claude_balancer::adapter::events::accumulate_sse;
use common::*;
use serde_json::{Value, json};

const FAULTS: &[(&str, &str)] = &[
    ("status 500", r#"{"kind":"status","status":500}"#),
    (
        "status 529",
        r#"{"kind":"status","status":529,"retry_after":"2"}"#,
    ),
    (
        "status 429",
        r#"{"kind":"status","status":429,"retry_after":"3"}"#,
    ),
    ("status 401", r#"{"kind":"status","status":401}"#),
    ("status 400", r#"{"kind":"status","status":400}"#),
    ("drop before headers", r#"{"kind":"drop_before_headers"}"#),
    ("drop mid-stream", r#"{"kind":"drop_mid_stream","after":3}"#),
    ("hang", r#"{"kind":"hang"}"#),
    ("error inside a 200", r#"{"kind":"error_in_stream"}"#),
    ("malformed JSON", r#"{"kind":"malformed_json"}"#),
    ("truncated SSE", r#"{"kind":"truncated_sse"}"#),
];

fn provider_yaml_of(kind: &str, name: &str, url: &str) -> String {
    let base = if kind == "openai" {
        format!("{url}/v1")
    } else {
        url.to_owned()
    };
    format!(
        "  - {{name: \"{name}\", type: {kind}, base_url: \"{base}\", auth_type: api_key, auth_value: \"k\"}}\n"
    )
}

/// What the client received: a valid answer, or an Anthropic error with its status.
enum Got {
    Answer,
    Error(u16, String),
}

async fn classify(resp: reqwest::Response, stream: bool) -> Result<Got, String> {
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let text = resp.text().await.map_err(|e| format!("body: {e}"))?;
    if status != 200 {
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| format!("error body not JSON ({e}): {text}"))?;
        if v["type"] != "error"
            || !v["error"]["type"].is_string()
            || !v["error"]["message"].is_string()
            || v.get("message").is_some()
        {
            return Err(format!("not an Anthropic error: {text}"));
        }
        return Ok(Got::Error(
            status,
            v["error"]["type"].as_str().unwrap().to_owned(),
        ));
    }
    if stream {
        if !content_type.starts_with("text/event-stream") {
            return Err(format!("a stream was asked for, got {content_type}"));
        }
        return match accumulate_sse(&text) {
            Ok(_) => Ok(Got::Answer),
            // A stream that broke after commit must end with exactly one error event.
            Err(e) if e.starts_with("error event") => {
                let events = events(&text);
                let errors = events.iter().filter(|(n, _)| n == "error").count();
                if errors == 1 && events.last().is_some_and(|(n, _)| n == "error") {
                    Ok(Got::Error(200, "stream error".into()))
                } else {
                    Err(format!("malformed stream ending: {text}"))
                }
            }
            Err(e) => Err(format!("invalid stream ({e}): {text}")),
        };
    }
    let v: Value =
        serde_json::from_str(&text).map_err(|e| format!("answer not JSON ({e}): {text}"))?;
    if v["type"] != "message" || !v["content"].is_array() || v["stop_reason"].is_null() {
        return Err(format!("not a message: {text}"));
    }
    Ok(Got::Answer)
}

#[tokio::test(start_paused = true)]
async fn every_fault_ends_in_an_answer_or_a_well_formed_error() {
    let settings = "settings:\n  failure_cooldown: 0\n  deduplication:\n    enabled: false\n  timeouts:\n    streaming:\n      read_timeout: 20\n    non_streaming:\n      read_timeout: 20\n";
    let mut failures = Vec::new();
    let mut cases = 0;
    for kind in ["anthropic", "openai"] {
        for two in [false, true] {
            let primary = MockProvider::start(Reply::Model).await.unwrap();
            let backup = MockProvider::start(Reply::Model).await.unwrap();
            let mut yaml = String::from("providers:\n");
            yaml.push_str(&provider_yaml_of(kind, "P", &primary.url()));
            yaml.push_str(&provider_yaml_of("anthropic", "B", &backup.url()));
            yaml.push_str(
                "model_routes:\n  \"*\":\n    - {provider: P, model: passthrough, priority: 1}\n",
            );
            if two {
                yaml.push_str("    - {provider: B, model: passthrough, priority: 2}\n");
            }
            yaml.push_str(settings);
            let bal = Balancer::start(&yaml).await;
            for (name, spec) in FAULTS {
                for stream in [false, true] {
                    cases += 1;
                    let label = format!(
                        "{kind} provider, {} candidate(s), {name}, stream={stream}",
                        if two { 2 } else { 1 }
                    );
                    // Each case starts clean: no cooldown left, nothing queued.
                    tokio::time::sleep(Duration::from_secs(10)).await;
                    primary.clear_script();
                    primary.push(
                        mock_provider::Reply::from_spec(&serde_json::from_str(spec).unwrap())
                            .unwrap(),
                    );
                    let mut body = request(stream);
                    body["messages"][0]["content"] = json!(format!("case {cases}"));
                    let started = tokio::time::Instant::now();
                    let outcome = tokio::time::timeout(Duration::from_secs(120), async {
                        let resp = bal.post("/v1/messages", &body).await;
                        classify(resp, stream).await
                    })
                    .await;
                    let took = started.elapsed();
                    match outcome {
                        Err(_) => failures.push(format!("{label}: no answer within 120 s")),
                        Ok(Err(e)) => failures.push(format!("{label}: {e}")),
                        Ok(Ok(got)) => {
                            // What the right answer is, per fault.
                            let client_fault = *name == "status 400";
                            let after_commit =
                                stream && matches!(*name, "drop mid-stream" | "truncated SSE");
                            let expect = match (&got, client_fault, two, after_commit) {
                                (Got::Error(400, _), true, _, _) => true,
                                (Got::Error(200, _), false, _, true) => true, // broken after commit: error event
                                (Got::Answer, false, true, false) => true, // failed over to the backup
                                (Got::Error(s, t), false, false, false) => match *name {
                                    // One provider, one status: answered with it.
                                    "status 529" => *s == 529 && t == "overloaded_error",
                                    "status 429" => *s == 429 && t == "rate_limit_error",
                                    "status 500" => *s == 500 && t == "api_error",
                                    "hang" => *s == 504 && t == "timeout_error",
                                    "error inside a 200" => {
                                        (*s == 529 && t == "overloaded_error")
                                            || (*s == 502 && t == "api_error")
                                    }
                                    _ => *s == 502 && t == "api_error",
                                },
                                // A non-streaming cut mid-body or malformed body with a backup: answered by it.
                                _ => false,
                            };
                            if !expect {
                                let what = match got {
                                    Got::Answer => "an answer".to_owned(),
                                    Got::Error(s, t) => format!("error {s} {t}"),
                                };
                                failures.push(format!("{label}: unexpected {what}"));
                            }
                        }
                    }
                    assert!(took < Duration::from_secs(120));
                }
            }
        }
    }
    assert_eq!(cases, 2 * 2 * FAULTS.len() * 2);
    assert!(
        failures.is_empty(),
        "{} of {cases} cases went wrong:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_that_leaves_mid_stream_cancels_its_upstream_request() {
    let p = MockProvider::start(Reply::Model).await.unwrap();
    p.set_latency(Duration::ZERO, Duration::from_secs(1));
    let bal = Balancer::start(&config_yaml(
        &[("P", &p.url(), 1)],
        "  deduplication:\n    enabled: false\n",
    ))
    .await;
    let resp = bal.post("/v1/messages", &request(true)).await;
    let mut s = resp.bytes_stream();
    futures_util::StreamExt::next(&mut s)
        .await
        .unwrap()
        .unwrap();
    drop(s);
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        p.client_closed(),
        1,
        "the provider saw the connection closed"
    );
}
