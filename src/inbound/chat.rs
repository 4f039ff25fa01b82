//! `POST /v1/chat/completions`: the OpenAI Chat Completions front end.
//!
//! The request is converted once into its Anthropic form, which every later step reads as it
//! reads a `/v1/messages` request (routing, the client's limits, coalescing and the cache, the
//! failover loop); the client's own body rides along for openai-type providers, which get it
//! with only the model replaced. The answer is rendered in the Chat Completions wire format at
//! the edge (`respond::respond_chat`).

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use http::HeaderMap;
use serde_json::Value;

use crate::adapter::chat::ChatContext;
use crate::adapter::chat::request::{self, FrontOptions};
use crate::clients::Caller;
use crate::dispatch::{Answer, ChatFront, Endpoint, Front, Inbound};
use crate::error::ApiError;
use crate::observability::{self, Record};
use crate::respond::respond_chat;
use crate::state::AppState;

/// The session of a Chat Completions request, for sticky routing: the Claude Code session header
/// if present, else the client's `prompt_cache_key` (what OpenAI itself uses to keep a
/// conversation on one cache).
fn session(headers: &HeaderMap, body: &Value) -> Option<String> {
    super::session_id(
        headers,
        body.get("prompt_cache_key")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty()),
    )
}

pub async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.started();
    let id = observability::request_id(&headers);
    let mut record = Record::new(id, Endpoint::Messages, None, String::new(), false);
    record.front = "openai_chat";
    record.client = caller.0.as_ref().map(|c| Arc::clone(&c.name));
    let unknown = ChatContext {
        model: String::new(),
        include_usage: false,
    };
    let permit = match super::permit(&state) {
        Ok(p) => p,
        Err(busy) => return respond_chat(&state, record, None, Answer::error(busy), &unknown),
    };
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    let accepted = async {
        let raw = super::read_request_body(body, &headers, settings.max_request_bytes).await?;
        let value: Value = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::invalid_request(format!("the request body is not valid JSON: {e}"))
        })?;
        let opts = FrontOptions::default();
        let converted = request::to_anthropic(&value, &opts).map_err(|r| {
            let e = ApiError::invalid_request(r.message);
            match r.param {
                Some(p) => e.with_param(p),
                None => e,
            }
        })?;
        let anthropic = request::to_bytes(&converted);
        let sign = settings.deduplication.enabled || settings.max_cache_size > 0;
        let envelope = super::body::parse_with(&anthropic, sign)?;
        let context = ChatContext {
            model: envelope.model.clone(),
            include_usage: converted.include_usage,
        };
        let session = session(&headers, &value);
        let mut inbound = Inbound::new(envelope, anthropic, headers.clone(), None, session);
        inbound.front = Front::Chat(Arc::new(ChatFront {
            original: raw,
            context: context.clone(),
        }));
        Ok::<_, ApiError>((inbound, context))
    };
    let (inbound, ctx) = match accepted.await {
        Ok(x) => x,
        Err(e) => return respond_chat(&state, record, permit, Answer::error(e), &unknown),
    };
    record.model = inbound.envelope.model.clone();
    record.stream = inbound.envelope.stream;
    record.session = inbound.session.clone();
    if let Some(client) = caller.0 {
        if let Err(refusal) =
            super::admit(&state, &client, &inbound.envelope.model, &mut record).await
        {
            return respond_chat(&state, record, permit, Answer::error(refusal), &ctx);
        }
        record.charge_to = Some(client);
    }
    drop(runtime);
    let answer = crate::dedup::serve(&state, inbound).await;
    respond_chat(&state, record, permit, answer, &ctx)
}
