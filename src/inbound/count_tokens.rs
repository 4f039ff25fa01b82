//! `POST /v1/messages/count_tokens`: asked of the anthropic-type providers of the model's route,
//! in plan order; when none answers (or `token_counting.always_use_local`), counted locally.
//!
//! Count failures are kept apart from the main health book: a relay that does not implement
//! count_tokens must not lose its chat traffic. After `failure_threshold` consecutive failures a
//! provider is not asked again for `api_failure_cooldown`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::{Instant, timeout};

use crate::config::ProviderKind;
use crate::error::ApiError;
use crate::inbound::body::{self, Envelope};
use crate::routing::PlanContext;
use crate::state::AppState;
use crate::tokens;
use crate::upstream::{anthropic_request_headers, client_response_headers};

/// Per provider: consecutive count_tokens failures and when it may be asked again.
#[derive(Debug, Default)]
pub struct CountTokensBook {
    map: Mutex<HashMap<String, (u32, Option<Instant>)>>,
}

impl CountTokensBook {
    fn allowed(&self, provider: &str, now: Instant) -> bool {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(provider)
            .and_then(|(_, until)| *until)
            .is_none_or(|until| until <= now)
    }

    fn record(
        &self,
        provider: &str,
        ok: bool,
        now: Instant,
        threshold: u32,
        cooldown: std::time::Duration,
    ) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let e = map.entry(provider.to_owned()).or_default();
        if ok {
            *e = (0, None);
        } else {
            e.0 += 1;
            if e.0 >= threshold {
                e.1 = Some(now + cooldown);
                e.0 = 0;
            }
        }
    }
}

const MAX_COUNT_BODY: usize = 64 * 1024;

pub async fn count_tokens(
    state: &Arc<AppState>,
    envelope: &Envelope,
    raw: Bytes,
    headers: &HeaderMap,
    query: Option<&str>,
) -> Response {
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    let tc = &settings.token_counting;
    if !tc.always_use_local {
        let ctx = PlanContext {
            providers: &runtime.providers,
            health: &state.health,
            strategy: settings.selection_strategy,
            now: Instant::now(),
        };
        let candidates = runtime
            .routes
            .plan(&envelope.model, &ctx)
            .map(|p| p.candidates)
            .unwrap_or_default();
        for c in candidates
            .iter()
            .filter(|c| c.provider.config.kind == ProviderKind::Anthropic)
        {
            let name = c.provider.config.name.as_str();
            if !state.count_tokens.allowed(name, Instant::now()) {
                continue;
            }
            let body = body::rewrite(
                &raw,
                &c.upstream_model,
                &envelope.model,
                envelope.provider.is_some(),
            );
            let req = c.provider.post_count_tokens(
                query,
                anthropic_request_headers(headers, &c.provider.config.auth),
                body,
            );
            let answer = timeout(tc.timeout, async {
                let mut resp = req.await.ok()?;
                if !resp.status.is_success() {
                    return None;
                }
                let upstream_headers = std::mem::take(&mut resp.headers);
                // The whole exchange is bounded by `tc.timeout` already.
                let buf = crate::dispatch::read_body(resp, tc.timeout, MAX_COUNT_BODY)
                    .await
                    .ok()?;
                // Only a real, positive count is an answer: a 0 would stop Claude Code from compacting.
                let v: serde_json::Value = serde_json::from_slice(&buf).ok()?;
                (v.get("input_tokens")?.as_u64()? > 0).then_some((upstream_headers, buf))
            })
            .await
            .ok()
            .flatten();
            let ok = answer.is_some();
            state.count_tokens.record(
                name,
                ok,
                Instant::now(),
                tc.failure_threshold,
                tc.api_failure_cooldown,
            );
            if let Some((upstream_headers, buf)) = answer {
                let mut resp = Response::new(Body::from(buf));
                *resp.headers_mut() = client_response_headers(&upstream_headers);
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
                resp.headers_mut()
                    .insert("x-provider-used", crate::dispatch::provider_header(name));
                return resp;
            }
            tracing::debug!(
                provider = name,
                "count_tokens not answered; trying the next provider or counting locally"
            );
        }
    }
    local_count(&raw)
}

fn local_count(raw: &[u8]) -> Response {
    match serde_json::from_slice::<serde_json::Value>(raw) {
        Ok(v) => {
            let n = tokens::count_request(&v);
            let mut resp = (
                StatusCode::OK,
                axum::Json(serde_json::json!({ "input_tokens": n })),
            )
                .into_response();
            resp.headers_mut()
                .insert("x-token-count", HeaderValue::from_static("local"));
            resp
        }
        Err(e) => ApiError::invalid_request(format!("request body is not valid JSON: {e}"))
            .into_response(),
    }
}
