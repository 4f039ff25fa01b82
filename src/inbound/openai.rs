//! The OpenAI front end: `POST /v1/chat/completions` and `POST /v1/responses`.
//!
//! A request is converted once into its Anthropic form, which every later step reads as it reads
//! a `/v1/messages` request (routing, the client's limits, coalescing and the cache, the failover
//! loop). A Chat Completions request also keeps the client's own body, which openai-type
//! providers get with only the model replaced. The answer is rendered in the front end's wire
//! format at the edge (`respond::respond_chat`, `respond::respond_responses`).

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderMap;
use serde_json::Value;
use tokio::sync::OwnedSemaphorePermit;

use crate::adapter::chat::Refusal;
use crate::adapter::responses::ResponsesContext;
use crate::clients::Caller;
use crate::dispatch::{Answer, ChatFront, Endpoint, Front, Inbound, ResponsesFront};
use crate::error::ApiError;
use crate::observability::{self, Record};
use crate::respond::{respond_chat, respond_responses};
use crate::state::AppState;

/// The session of an OpenAI request, for sticky routing: the Claude Code session header if
/// present, else OpenCode's `x-session-affinity` or `x-session-id`, else the client's
/// `prompt_cache_key` (Codex sets it to its conversation id).
fn session(headers: &HeaderMap, prompt_cache_key: Option<&str>) -> Option<String> {
    let header = ["x-session-affinity", "x-session-id"].iter().find_map(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    });
    super::session_id(headers, header.or(prompt_cache_key))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let (record, permit) = match open(&state, &caller, &headers, "openai_chat") {
        (record, Ok(permit)) => (record, permit),
        (record, Err(busy)) => {
            let nobody = ChatFront::new(Bytes::new(), String::new(), false);
            return respond_chat(&state, record, None, Answer::error(busy), &nobody);
        }
    };
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    // The client's own body is what the balancer reads (scanned, never parsed): an openai-type
    // provider gets it as it is, and its Anthropic form is made only if a candidate needs it.
    let accepted = async {
        let raw = super::read_request_body(body, &headers, settings.max_request_bytes).await?;
        let envelope = super::body::parse_with(&raw, settings.signs_requests())?;
        let front = Arc::new(ChatFront::new(
            raw.clone(),
            envelope.model.clone(),
            envelope.stream,
        ));
        let session = session(&headers, None);
        let mut inbound = Inbound::new(envelope, raw, headers.clone(), None, session);
        inbound.front = Front::Chat(Arc::clone(&front));
        Ok::<_, ApiError>((inbound, front))
    };
    let accepted = accepted.await;
    drop(runtime);
    match accepted {
        Ok((inbound, front)) => {
            serve(
                &state,
                caller,
                record,
                permit,
                inbound,
                |state, record, permit, answer| respond_chat(state, record, permit, answer, &front),
            )
            .await
        }
        Err(e) => {
            let nobody = ChatFront::new(Bytes::new(), String::new(), false);
            respond_chat(&state, record, permit, Answer::error(e), &nobody)
        }
    }
}

pub async fn responses(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let unknown = || ResponsesContext {
        model: String::new(),
        echo: Value::Object(Default::default()),
        tools: Vec::new(),
    };
    let (record, permit) = match open(&state, &caller, &headers, "openai_responses") {
        (record, Ok(permit)) => (record, permit),
        (record, Err(busy)) => {
            return respond_responses(&state, record, None, Answer::error(busy), &unknown());
        }
    };
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    // Converted at once: every provider type but one that speaks the API reads the Anthropic form.
    let accepted = async {
        let raw = super::read_request_body(body, &headers, settings.max_request_bytes).await?;
        let value: Value = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::invalid_request(format!("the request body is not valid JSON: {e}"))
        })?;
        let c = crate::adapter::responses::request::to_anthropic(&value).map_err(refusal)?;
        let anthropic = Bytes::from(serde_json::to_vec(&c.body).unwrap_or_default());
        let envelope = super::body::parse_with(&anthropic, settings.signs_requests())?;
        let key = value
            .get("prompt_cache_key")
            .and_then(Value::as_str)
            .filter(|k| !k.is_empty());
        let session = session(&headers, key);
        let mut inbound = Inbound::new(envelope, anthropic, headers.clone(), None, session);
        inbound.front = Front::Responses(Arc::new(ResponsesFront {
            original: raw,
            context: c.context.clone(),
        }));
        Ok::<_, ApiError>((inbound, c.context))
    };
    let accepted = accepted.await;
    drop(runtime);
    match accepted {
        Ok((inbound, ctx)) => {
            serve(
                &state,
                caller,
                record,
                permit,
                inbound,
                |state, record, permit, answer| {
                    respond_responses(state, record, permit, answer, &ctx)
                },
            )
            .await
        }
        Err(e) => respond_responses(&state, record, permit, Answer::error(e), &unknown()),
    }
}

/// A front end's refusal as the balancer's 400 naming the parameter.
fn refusal(r: Refusal) -> ApiError {
    let e = ApiError::invalid_request(r.message);
    match r.param {
        Some(p) => e.with_param(p),
        None => e,
    }
}

/// Counts the request and takes its concurrency permit: its record, and its permit or the 529
/// that says none is left.
fn open(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    front: &'static str,
) -> (Record, Result<Option<OwnedSemaphorePermit>, ApiError>) {
    state.metrics.started();
    let id = observability::request_id(headers);
    let mut record = Record::new(id, Endpoint::Messages, None, String::new(), false);
    record.front = front;
    record.client = caller.0.as_ref().map(|c| Arc::clone(&c.name));
    (record, super::permit(state))
}

/// An accepted request: the client's model list and limits, then coalescing, the cache and the
/// failover loop, then the front end's rendering.
async fn serve(
    state: &Arc<AppState>,
    caller: Caller,
    mut record: Record,
    permit: Option<OwnedSemaphorePermit>,
    inbound: Inbound,
    respond: impl FnOnce(&Arc<AppState>, Record, Option<OwnedSemaphorePermit>, Answer) -> Response,
) -> Response {
    record.model = inbound.envelope.model.clone();
    record.stream = inbound.envelope.stream;
    record.session = inbound.session.clone();
    if let Some(client) = caller.0 {
        if let Err(refusal) =
            super::admit(state, &client, &inbound.envelope.model, &mut record).await
        {
            return respond(state, record, permit, Answer::error(refusal));
        }
        record.charge_to = Some(client);
    }
    let answer = crate::dedup::serve(state, inbound).await;
    respond(state, record, permit, answer)
}
