//! Routing that knows the request: candidates that cannot hold a request are skipped before any
//! call, `when:` conditions choose scenario entries, and a request too long for every candidate
//! gets the `prompt is too long` answer Claude Code compacts on.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use common::*;
use serde_json::{Value, json};

/// Providers (all anthropic-type, answering with their own name) and a route `m` whose entries
/// are given as YAML lines (after `- provider: NAME`).
async fn world(entries: &[(&str, &str)]) -> (Vec<MockProvider>, Balancer) {
    let mut providers = Vec::new();
    let mut yaml = String::from("providers:\n");
    for (name, _) in entries {
        let p = MockProvider::start(Reply::message("m", &format!("from {name}")))
            .await
            .unwrap();
        yaml.push_str(&provider_yaml(name, &p.url()));
        providers.push(p);
    }
    yaml.push_str("model_routes:\n  \"m\":\n");
    for (name, extra) in entries {
        yaml.push_str(&format!("    - provider: \"{name}\"\n"));
        for line in extra.lines() {
            yaml.push_str(&format!("      {line}\n"));
        }
    }
    (providers, Balancer::start(&yaml).await)
}

/// A request of about `kb` kilobytes of text.
fn long_request(kb: usize, max_tokens: u64) -> Value {
    let words = "the quick brown fox jumps over the lazy dog ".repeat(kb * 1024 / 44 + 1);
    json!({"model": "m", "max_tokens": max_tokens, "messages": [{"role": "user", "content": words}]})
}

async fn served_by(bal: &Balancer, body: &Value, headers: &[(&str, &str)]) -> (u16, String, Value) {
    let resp = bal.post_with("/v1/messages", body, headers).await;
    let status = resp.status().as_u16();
    let by = resp
        .headers()
        .get("x-provider-used")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    (status, by, resp.json().await.unwrap())
}

#[tokio::test]
async fn a_request_too_long_for_every_candidate_gets_prompt_is_too_long_and_costs_no_call() {
    let (p, bal) = world(&[
        ("Small", "context_window: 8000"),
        ("Tiny", "context_window: 4000"),
    ])
    .await;
    // 100 KB of English: about 25k tokens, far more than 8000.
    let (status, _, body) = served_by(&bal, &long_request(100, 1000), &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["type"], "error");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("prompt is too long: "), "{message}");
    // The estimate and the largest window: "prompt is too long: N tokens > 8000 maximum".
    let n: u64 = message["prompt is too long: ".len()..]
        .split(' ')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((20_000..40_000).contains(&n), "{message}");
    assert!(message.contains(" tokens > 8000 maximum"), "{message}");
    assert_eq!(p[0].request_count() + p[1].request_count(), 0);
    // No penalty: both are healthy, and a short request goes through.
    for name in ["Small", "Tiny"] {
        let h = bal.provider(name).await;
        assert_eq!(h["failures"], 0, "{h}");
        assert_eq!(h["state"], "healthy", "{h}");
    }
    let (status, by, _) = served_by(&bal, &long_request(1, 1000), &[]).await;
    assert_eq!((status, by.as_str()), (200, "Small"));
    let metrics = bal.get_text("/metrics").await;
    assert!(
        metrics.contains(r#"claude_balancer_attempts_total{provider="Small",outcome="skipped"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_candidate_that_cannot_hold_the_request_is_skipped_and_the_next_serves() {
    let (p, bal) = world(&[
        ("Small", "context_window: 16000\npriority: 1"),
        ("Big", "priority: 2"),
    ])
    .await;
    let (status, by, body) = served_by(&bal, &long_request(100, 1000), &[]).await;
    assert_eq!((status, by.as_str()), (200, "Big"), "{body}");
    assert_eq!(
        p[0].request_count(),
        0,
        "no call to the provider that cannot hold it"
    );
    assert_eq!(bal.provider("Small").await["failures"], 0);
    // The output asked for counts: 8 KB of input (about 2k tokens) and 32000 of output do not
    // fit 16000 ...
    let (_, by, _) = served_by(&bal, &long_request(8, 32_000), &[]).await;
    assert_eq!(by, "Big");
    assert_eq!(p[0].request_count(), 0);
    // ... while a short answer does.
    let (_, by, _) = served_by(&bal, &long_request(8, 1000), &[]).await;
    assert_eq!(by, "Small");
}

#[tokio::test]
async fn the_output_is_clamped_to_the_model_s_max_output_tokens_before_the_fit() {
    let (p, bal) = world(&[
        (
            "Small",
            "context_window: 16000\nmax_output_tokens: 4000\npriority: 1",
        ),
        ("Big", "priority: 2"),
    ])
    .await;
    // 8 KB of input and 32000 asked, clamped to 4000: fits 16000.
    let (_, by, _) = served_by(&bal, &long_request(8, 32_000), &[]).await;
    assert_eq!(by, "Small");
    assert_eq!(p[1].request_count(), 0);
}

fn image_request() -> Value {
    json!({"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo=".repeat(2000)}},
        {"type": "text", "text": "what is in the picture?"}
    ]}]})
}

#[tokio::test]
async fn an_image_goes_to_the_image_capable_candidate() {
    // `deepseek-chat` takes no images by the shipped defaults; `Vision` says it does.
    let (p, bal) = world(&[
        ("Text", "model: deepseek-chat\npriority: 1"),
        (
            "Vision",
            "model: some-vision-model\nimages: true\npriority: 2",
        ),
    ])
    .await;
    let (status, by, _) = served_by(&bal, &image_request(), &[]).await;
    assert_eq!((status, by.as_str()), (200, "Vision"));
    assert_eq!(p[0].request_count(), 0);
    let (_, by, _) = served_by(&bal, &long_request(1, 100), &[]).await;
    assert_eq!(by, "Text");
    // With no image-capable candidate: a 400 naming the reason, no call.
    let (p, bal) = world(&[("Text", "images: false")]).await;
    let (status, _, body) = served_by(&bal, &image_request(), &[]).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("Text: skipped: needs images"), "{message}");
    assert_eq!(p[0].request_count(), 0);
}

#[tokio::test]
async fn when_conditions_send_each_kind_of_request_to_its_entry() {
    let (_p, bal) = world(&[
        ("Default", "priority: 1"),
        ("Think", "when: { thinking: true }"),
        ("Long", "when: { min_input_tokens: 20000 }"),
        ("Pictures", "when: { images: true }"),
        ("Cheap", "when: { header: { x-balancer-route: cheap } }"),
    ])
    .await;
    type Case<'a> = (&'a str, Value, Vec<(&'a str, &'a str)>);
    let cases: Vec<Case> = vec![
        ("Default", long_request(1, 100), vec![]),
        (
            "Think",
            json!({"model": "m", "max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 1024},
                   "messages": [{"role": "user", "content": "think"}]}),
            vec![],
        ),
        ("Long", long_request(200, 100), vec![]),
        ("Pictures", image_request(), vec![]),
        (
            "Cheap",
            long_request(1, 100),
            vec![("x-balancer-route", "cheap")],
        ),
        (
            "Default",
            long_request(1, 100),
            vec![("x-balancer-route", "other")],
        ),
    ];
    for (want, body, headers) in cases {
        let (status, by, answer) = served_by(&bal, &body, &headers).await;
        assert_eq!((status, by.as_str()), (200, want), "{answer}");
    }
}

#[tokio::test]
async fn a_scenario_entry_falls_back_to_the_default_entries() {
    let (p, bal) = world(&[("Default", ""), ("Think", "when: { thinking: true }")]).await;
    p[1].push(Reply::error(529, "overloaded_error", "busy"));
    let body = json!({"model": "m", "max_tokens": 2000, "thinking": {"type": "adaptive"},
                      "messages": [{"role": "user", "content": "think"}]});
    let (status, by, _) = served_by(&bal, &body, &[]).await;
    assert_eq!((status, by.as_str()), (200, "Default"));
    assert_eq!(p[1].request_count(), 1);
}

/// The recorded Claude Code requests (2.1.197 and 2.1.332), with the kind their file name says.
fn fixtures() -> Vec<(String, &'static str, Value)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/claude-code");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let kind = if name.contains("-background-") {
            "background"
        } else if name.contains("-subagent") {
            "subagent"
        } else {
            assert!(name.contains("-main-"), "{name}");
            "main"
        };
        let saved: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        out.push((name, kind, saved));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(out.len(), 20);
    for version in ["2.1.197", "2.1.332"] {
        for kind in ["main", "background", "subagent"] {
            assert!(
                out.iter()
                    .any(|(n, k, _)| n.starts_with(version) && *k == kind),
                "{version} {kind}"
            );
        }
    }
    out
}

#[tokio::test]
async fn recorded_claude_code_requests_are_told_apart_as_main_background_and_subagent() {
    let (p, bal) = world(&[
        ("Main", ""),
        ("Background", "when: { background: true }"),
        ("Subagent", "when: { subagent: true }"),
    ])
    .await;
    for (name, kind, saved) in fixtures() {
        let mut body = saved["body"].clone();
        // The fake providers answer JSON; the model names vary between versions.
        body["stream"] = json!(false);
        body["model"] = json!("m");
        let mut headers = Vec::new();
        for h in [
            "anthropic-beta",
            "anthropic-version",
            "x-claude-code-session-id",
            "x-claude-code-agent-id",
            "x-app",
            "user-agent",
        ] {
            if let Some(v) = saved["headers"][h].as_str() {
                headers.push((h, v.to_owned()));
            }
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let (status, by, answer) = served_by(&bal, &body, &headers).await;
        assert_eq!(status, 200, "{name}: {answer}");
        let want = match kind {
            "main" => "Main",
            "background" => "Background",
            _ => "Subagent",
        };
        assert_eq!(by, want, "{name}");
    }
    // The subagent's marks are two, each enough alone: the agent-id header and the billing header.
    let (_, _, saved) = fixtures()
        .into_iter()
        .find(|(n, _, _)| n == "2.1.332-subagent.json")
        .unwrap();
    let mut body = saved["body"].clone();
    body["stream"] = json!(false);
    body["model"] = json!("m");
    let (_, by, _) = served_by(&bal, &body, &[]).await;
    assert_eq!(by, "Subagent", "by the billing header alone");
    assert!(p[0].request_count() > 0 && p[1].request_count() > 0);
}

#[test]
fn the_byte_bound_holds_on_recorded_claude_code_requests() {
    // The fit check trusts "tokens <= bytes * 3/5" (no tokenizer run) when that settles it; on
    // every recorded request the tokenizer (with its margin) must count well below it.
    for (name, _, saved) in fixtures() {
        let body = serde_json::to_vec(&saved["body"]).unwrap();
        let counted = claude_balancer::tokens::count_body(&body);
        let per_byte = counted as f64 / body.len() as f64;
        println!(
            "{name}: {} bytes, {counted} tokens, {per_byte:.3} a byte",
            body.len()
        );
        assert!(per_byte < 0.45, "{name}: {per_byte}");
    }
}

#[tokio::test]
async fn a_request_whose_input_fits_but_not_its_output_gets_the_max_tokens_wording() {
    let (p, bal) = world(&[("Small", "context_window: 16000")]).await;
    // 8 KB of input (about 2k tokens) and 32000 asked: the input fits, the output does not.
    let (status, _, body) = served_by(&bal, &long_request(8, 32_000), &[]).await;
    assert_eq!(status, 400, "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("input length and `max_tokens` exceed context limit: "),
        "{message}"
    );
    assert!(message.contains(" + 32000 > 16000"), "{message}");
    assert_eq!(p[0].request_count(), 0);
}

#[tokio::test]
async fn a_route_of_conditional_entries_only_answers_400_when_none_applies() {
    let (p, bal) = world(&[("Think", "when: { thinking: true }")]).await;
    let (status, _, body) = served_by(&bal, &long_request(1, 100), &[]).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`when:` conditions do not hold"),
        "{body}"
    );
    assert_eq!(p[0].request_count(), 0);
}

#[tokio::test]
async fn session_affinity_does_not_overtake_a_scenario_entry() {
    let (p, bal) = world(&[
        ("Default", ""),
        ("Background", "when: { background: true }"),
    ])
    .await;
    let session = [("x-claude-code-session-id", "s-affinity")];
    // The main loop sticks the session to Default ...
    let (_, by, _) = served_by(&bal, &long_request(1, 100), &session).await;
    assert_eq!(by, "Default");
    // ... and its background request still goes to its own entry, which it does not make sticky.
    let (_, _, saved) = fixtures()
        .into_iter()
        .find(|(n, _, _)| n == "2.1.332-background-title.json")
        .unwrap();
    let mut background = saved["body"].clone();
    background["stream"] = json!(false);
    background["model"] = json!("m");
    let (_, by, _) = served_by(&bal, &background, &session).await;
    assert_eq!(by, "Background");
    let (_, by, _) = served_by(&bal, &long_request(2, 100), &session).await;
    assert_eq!(by, "Default");
    assert_eq!(p[1].request_count(), 1);
}

#[tokio::test]
async fn a_header_that_picks_an_entry_is_part_of_the_cache_key() {
    let (_p, bal) = world(&[
        ("Default", ""),
        ("Cheap", "when: { header: { x-balancer-route: cheap } }"),
    ])
    .await;
    bal.write_config(&format!(
        "{}  max_cache_size: 100\n",
        std::fs::read_to_string(bal.config_file.path()).unwrap()
    ));
    bal.state.reload().await.unwrap();
    let body = long_request(1, 100);
    let (_, by, _) = served_by(&bal, &body, &[]).await;
    assert_eq!(by, "Default");
    let (_, by, _) = served_by(&bal, &body, &[("x-balancer-route", "cheap")]).await;
    assert_eq!(by, "Cheap", "not the cached answer of the default entry");
}

#[tokio::test]
async fn thinking_with_a_budget_tries_a_model_that_cannot_think_last() {
    let (p, bal) = world(&[
        ("Plain", "priority: 1\nthinking: false"),
        ("Thinker", "priority: 2"),
    ])
    .await;
    let body = json!({"model": "m", "max_tokens": 4000, "thinking": {"type": "enabled", "budget_tokens": 2048},
                      "messages": [{"role": "user", "content": "think"}]});
    // The model that thinks first, although its priority comes second ...
    let (status, by, _) = served_by(&bal, &body, &[]).await;
    assert_eq!((status, by.as_str()), (200, "Thinker"));
    assert_eq!(p[0].request_count(), 0);
    // ... and when it fails, the request is served without thinking rather than refused.
    p[1].push(Reply::error(529, "overloaded_error", "busy"));
    let (status, by, _) = served_by(&bal, &body, &[]).await;
    assert_eq!((status, by.as_str()), (200, "Plain"));
    // Adaptive thinking needs no thinker: priority order.
    let adaptive = json!({"model": "m", "max_tokens": 4000, "thinking": {"type": "adaptive"},
                          "messages": [{"role": "user", "content": "think"}]});
    let (_, by, _) = served_by(&bal, &adaptive, &[]).await;
    assert_eq!(by, "Plain");
}

#[tokio::test]
async fn a_model_too_small_is_skipped_for_its_size_even_when_it_also_cannot_think() {
    let (p, bal) = world(&[
        (
            "Plain",
            "priority: 1\nthinking: false\ncontext_window: 16000",
        ),
        ("Thinker", "priority: 2\ncontext_window: 8000"),
    ])
    .await;
    let mut body = long_request(100, 1000);
    body["thinking"] = json!({"type": "enabled", "budget_tokens": 512});
    let (status, _, answer) = served_by(&bal, &body, &[]).await;
    assert_eq!(status, 400, "{answer}");
    // The largest window that was too small is the one the client hears of.
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains(" tokens > 16000 maximum"), "{message}");
    assert!(message.starts_with("prompt is too long: "), "{message}");
    assert_eq!(p[0].request_count() + p[1].request_count(), 0);
}
