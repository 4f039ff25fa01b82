//! `claude-balancer explain` and `check` on the shipped scenario example, with recorded Claude Code
//! requests: the route chosen, every candidate and why it is kept, skipped or placed where it is.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

use std::path::Path;
use std::process::Command;

fn run(args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO_BIN_EXE_claude-balancer"))
        .current_dir(root)
        .args(args)
        // The example's keys come from variables that must not change the output.
        .env_remove("DEEPSEEK_API_KEY")
        .env_remove("OPENROUTER_API_KEY")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn explain(request: &str) -> String {
    run(&["explain", "--config", "examples/scenarios.yaml", request])
}

/// A saved request with headers: an image and about 180k tokens of text, sent with
/// `x-balancer-route: cheap`.
fn saved_request(dir: &Path) -> String {
    let words = "the quick brown fox jumps over the lazy dog ".repeat(14_000);
    let saved = serde_json::json!({
        "path": "/v1/messages",
        "headers": {"x-balancer-route": "cheap", "anthropic-version": "2023-06-01"},
        "body": {"model": "claude-sonnet-4-5", "max_tokens": 16000, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
            {"type": "text", "text": words}]}]}
    });
    let path = dir.join("request.json");
    std::fs::write(&path, serde_json::to_vec(&saved).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn explain_shows_the_route_every_candidate_and_why() {
    let fixture = |name: &str| explain(&format!("tests/fixtures/claude-code/{name}"));
    insta::assert_snapshot!("main_loop_request", fixture("2.1.332-main-first.json"));
    insta::assert_snapshot!(
        "background_request",
        fixture("2.1.332-background-title.json")
    );
    insta::assert_snapshot!("subagent_request", fixture("2.1.197-subagent.json"));
    let dir = tempfile::tempdir().unwrap();
    insta::assert_snapshot!(
        "long_image_request_with_a_header",
        explain(&saved_request(dir.path()))
    );
}

#[test]
fn check_shows_each_entry_s_conditions_and_capabilities() {
    let out = run(&["check", "--config", "examples/scenarios.yaml"]);
    for line in [
        "1. Ollama -> model qwen2.5-coder:latest, priority 1, when {background: true} [window 32k, output 8192, no images, no thinking]",
        "4. OpenRouter -> model qwen/qwen2.5-vl-72b-instruct, priority 1, when {images: true} [window 131k, output 8192, no thinking]",
        "6. DeepSeek -> model deepseek-chat, priority 1 [window 128k, output 8192, no images, no thinking]",
    ] {
        assert!(out.contains(line), "{line}\n---\n{out}");
    }
}
