//! `POST /v1/messages/count_tokens`: asked of the anthropic-type providers of the model's route
//! through the same failover loop as `/v1/messages` (its own attempt, timeout and health book);
//! when none answers (or `token_counting.always_use_local`), counted locally.
//!
//! Count failures are kept apart from the main health book: a relay that does not implement
//! count_tokens must not lose its chat traffic. After `failure_threshold` consecutive failures a
//! provider is not asked again for `api_failure_cooldown`.

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use crate::dispatch::{self, Answer, Body, CacheStatus, Endpoint, Inbound, Source};
use crate::error::ApiError;
use crate::state::AppState;
use crate::tokens;

/// The token count of a request: a provider's, else the local one.
pub async fn count_tokens(state: &Arc<AppState>, inbound: Inbound) -> Answer {
    let runtime = state.runtime();
    let mut tried = None;
    if !runtime.config.settings.token_counting.always_use_local {
        if let Some(plan) = dispatch::plan(state, &runtime, &inbound).await {
            match dispatch::run(state, &runtime, &plan, &inbound, Endpoint::CountTokens).await {
                Ok(answer) if answer.status().is_success() => return answer,
                Ok(answer) => tried = Some((answer.route, answer.attempts)),
                Err(failed) => tried = Some((Some(failed.route), failed.attempts)),
            }
        }
    }
    let mut answer = local_count(state, inbound.body.clone()).await;
    if let Some((route, attempts)) = tried {
        answer.route = route;
        answer.attempts = attempts;
    }
    answer
}

/// Counts locally, on the blocking pool (one count per core at a time): a large body must not
/// hold a request thread. The work is bounded by `tokens::MAX_EXACT_BYTES`.
async fn local_count(state: &AppState, raw: Bytes) -> Answer {
    let counted = match Arc::clone(&state.counting).acquire_owned().await {
        Ok(permit) => {
            tokio::task::spawn_blocking(move || {
                let _permit = permit;
                tokens::count_body(&raw)
            })
            .await
        }
        Err(_) => return Answer::error(ApiError::internal("token counting is shut down")),
    };
    let Ok(n) = counted else {
        return Answer::error(ApiError::internal("token counting failed"));
    };
    Answer {
        status: StatusCode::OK,
        headers: HeaderMap::new(),
        source: Source::LocalCount,
        route: None,
        attempts: Vec::new(),
        cache: CacheStatus::Off,
        body: Body::Json(Bytes::from(
            serde_json::json!({ "input_tokens": n }).to_string(),
        )),
        wire: crate::dispatch::Wire::Anthropic,
        usage: None,
    }
}
