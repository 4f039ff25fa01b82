//! `GET /v1/models` and `GET /v1/models/{id}`: the names a client can use, in one shape both SDKs
//! accept, paged as the Anthropic API pages.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests fail loudly

mod common;

use common::*;
use serde_json::Value;

/// Routes `claude-sonnet-4-6` (exact), `*opus*` (glob) and `gpt-5` (exact); provider B lists
/// `claude-opus-4-5` and `claude-sonnet-4-6` (a repeat) as models behind its routes.
async fn balancer(clients: &str) -> (MockProvider, Balancer) {
    let p = MockProvider::start(Reply::message("m", "hi"))
        .await
        .unwrap();
    let yaml = format!(
        "providers:\n  - {{name: A, type: anthropic, base_url: \"{u}\", auth_type: api_key, auth_value: k}}\n  - {{name: B, type: anthropic, base_url: \"{u}\", auth_type: api_key, auth_value: k, models: [claude-opus-4-5, claude-sonnet-4-6]}}\nmodel_routes:\n  \"claude-sonnet-4-6\":\n    - {{provider: A}}\n  \"*opus*\":\n    - {{provider: B}}\n  \"gpt-5\":\n    - {{provider: A}}\nsettings:\n  log_level: INFO\n{clients}",
        u = p.url()
    );
    (p, Balancer::start(&yaml).await)
}

fn ids(v: &Value) -> Vec<&str> {
    v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect()
}

#[tokio::test]
async fn the_list_has_exact_routes_and_listed_models_in_a_shape_both_sdks_read() {
    let (_p, bal) = balancer("").await;
    let (status, v) = bal.get_json("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(ids(&v), ["claude-sonnet-4-6", "gpt-5", "claude-opus-4-5"]);
    assert_eq!(v["object"], "list");
    // The Anthropic SDK pages until has_more is false.
    assert_eq!(v["has_more"], false);
    assert_eq!(v["first_id"], "claude-sonnet-4-6");
    assert_eq!(v["last_id"], "claude-opus-4-5");
    let m = &v["data"][0];
    for field in ["id", "display_name", "created_at", "owned_by"] {
        assert!(m[field].is_string(), "{field}: {m}");
    }
    assert_eq!(
        (m["type"].as_str(), m["object"].as_str()),
        (Some("model"), Some("model"))
    );
    assert!(m["created"].as_u64().unwrap() > 1_700_000_000);
    assert!(humantime::parse_rfc3339(m["created_at"].as_str().unwrap()).is_ok());
}

#[tokio::test]
async fn one_model_is_found_by_its_id_or_by_a_route_that_takes_it() {
    let (_p, bal) = balancer("").await;
    let (status, m) = bal.get_json("/v1/models/gpt-5").await;
    assert_eq!((status, m["id"].as_str()), (200, Some("gpt-5")));
    // Behind the glob route `*opus*`, not listed: still a model of this balancer.
    let (status, m) = bal.get_json("/v1/models/claude-opus-4-1").await;
    assert_eq!((status, m["type"].as_str()), (200, Some("model")));
    let (status, e) = bal.get_json("/v1/models/llama-3").await;
    assert_eq!(status, 404);
    assert_eq!(e["error"]["type"], "not_found_error");
}

#[tokio::test]
async fn limit_after_id_and_before_id_page_the_list() {
    let (_p, bal) = balancer("").await;
    let (_, first) = bal.get_json("/v1/models?limit=2").await;
    assert_eq!(ids(&first), ["claude-sonnet-4-6", "gpt-5"]);
    assert_eq!(first["has_more"], true);
    let (_, next) = bal.get_json("/v1/models?limit=2&after_id=gpt-5").await;
    assert_eq!(ids(&next), ["claude-opus-4-5"]);
    assert_eq!(next["has_more"], false);
    let (_, back) = bal.get_json("/v1/models?limit=1&before_id=gpt-5").await;
    assert_eq!(ids(&back), ["claude-sonnet-4-6"]);
    assert_eq!(back["has_more"], false);
    let (status, e) = bal.get_json("/v1/models?after_id=nope").await;
    assert_eq!(status, 400);
    assert!(e["error"]["message"].as_str().unwrap().contains("after_id"));
}

#[tokio::test]
async fn a_named_client_sees_only_the_models_it_may_use() {
    let (_p, bal) = balancer(
        "clients:\n  - name: alice\n    key: sk-alice-models\n    models: [\"*sonnet*\", \"*opus*\"]\n",
    )
    .await;
    let v: Value = bal
        .get_with_key("/v1/models", "sk-alice-models")
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(ids(&v), ["claude-sonnet-4-6", "claude-opus-4-5"]);
    let gpt = bal
        .get_with_key("/v1/models/gpt-5", "sk-alice-models")
        .await;
    assert_eq!(gpt.status(), 404);
}
