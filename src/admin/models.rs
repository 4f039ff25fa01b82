//! `GET /v1/models` and `GET /v1/models/{id}`: the model names a client can use, in one shape
//! that both the Anthropic and the OpenAI SDKs accept (`data` with `id`, `type` and `object`,
//! `display_name`, `created_at` and `created`, `owned_by`; `has_more`, `first_id`, `last_id`).
//!
//! The names are the routes' exact patterns (those without `*` or `?`), then each provider's
//! `models:` (names behind glob routes), in file order, without repeats; a named client with a
//! model list sees only the names it may use. `limit`, `after_id` and `before_id` page the list
//! as the Anthropic API does.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Extension;
use axum::Json;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};

use crate::clients::Caller;
use crate::error::ApiError;
use crate::state::{AppState, Runtime};

/// The names `caller` may ask for, in order.
fn names(runtime: &Runtime, caller: &Caller) -> Vec<String> {
    let routes = runtime
        .config
        .routes
        .iter()
        .map(|r| r.pattern.as_str())
        .filter(|p| !p.contains(['*', '?']));
    let listed = runtime
        .config
        .providers
        .iter()
        .filter(|p| p.usable())
        .flat_map(|p| p.models.iter().map(String::as_str));
    let mut out: Vec<String> = Vec::new();
    for name in routes.chain(listed) {
        let name = name.trim();
        if name.is_empty() || out.iter().any(|n| n == name) {
            continue;
        }
        if caller.0.as_ref().is_some_and(|c| !c.may_use(name)) {
            continue;
        }
        out.push(name.to_owned());
    }
    out
}

/// One model object.
fn model(runtime: &Runtime, id: &str) -> Value {
    let created = runtime
        .loaded_at
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "id": id,
        "type": "model",
        "object": "model",
        "display_name": id,
        "created_at": humantime::format_rfc3339_seconds(runtime.loaded_at).to_string(),
        "created": created,
        "owned_by": "claude-balancer",
    })
}

pub async fn list(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let runtime = state.runtime();
    let all = names(&runtime, &caller);
    let limit = match params.get("limit").map(|l| l.trim().parse::<usize>()) {
        None => 1000,
        Some(Ok(n)) if (1..=1000).contains(&n) => n,
        Some(_) => {
            return ApiError::invalid_request("limit: expected a number from 1 to 1000")
                .into_response();
        }
    };
    let position = |key: &'static str| {
        params
            .get(key)
            .map(|id| all.iter().position(|n| n == id).ok_or(key))
            .transpose()
    };
    let (after, before) = match (position("after_id"), position("before_id")) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(key), _) | (_, Err(key)) => {
            return ApiError::invalid_request(format!("{key}: no such model in this list"))
                .into_response();
        }
    };
    // after_id: the page after it; before_id: the page that ends just before it.
    let (start, end) = match (after, before) {
        (Some(a), _) => (a + 1, (a + 1 + limit).min(all.len())),
        (None, Some(b)) => (b.saturating_sub(limit), b),
        (None, None) => (0, limit.min(all.len())),
    };
    let page = &all[start.min(end)..end];
    let has_more = match (after, before) {
        (None, Some(_)) => start > 0,
        _ => end < all.len(),
    };
    Json(json!({
        "object": "list",
        "data": page.iter().map(|id| model(&runtime, id)).collect::<Vec<_>>(),
        "has_more": has_more,
        "first_id": page.first(),
        "last_id": page.last(),
    }))
    .into_response()
}

pub async fn one(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Response {
    let runtime = state.runtime();
    let listed = names(&runtime, &caller).contains(&id);
    // A name behind a glob route is a model too, though not listed.
    let allowed = caller.0.as_ref().is_none_or(|c| c.may_use(&id));
    if listed || (allowed && runtime.routes.routes(&id)) {
        return Json(model(&runtime, &id)).into_response();
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found_error",
        format!("model {id:?} is not served by this balancer"),
    )
    .into_response()
}
