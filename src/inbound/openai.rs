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

use crate::adapter::chat::request::FrontOptions;
use crate::adapter::chat::{ChatContext, Refusal};
use crate::adapter::responses::ResponsesContext;
use crate::clients::Caller;
use crate::dispatch::{Answer, ChatFront, Endpoint, Front, Inbound, ResponsesFront};
use crate::error::ApiError;
use crate::observability::{self, Record};
use crate::respond::{respond_chat, respond_responses};
use crate::state::AppState;

/// What differs between the two OpenAI front ends.
trait OpenaiFront {
    /// What the rendering of an answer needs.
    type Context: Clone;
    const NAME: &'static str;
    /// The context of a request refused before it could be read.
    fn unknown() -> Self::Context;
    /// The Anthropic form of the request, the front it came by, and the rendering context.
    fn convert(value: &Value, raw: Bytes) -> Result<(Bytes, Front, Self::Context), Refusal>;
    fn respond(
        state: &Arc<AppState>,
        record: Record,
        permit: Option<OwnedSemaphorePermit>,
        answer: Answer,
        ctx: &Self::Context,
    ) -> Response;
}

struct Chat;

impl OpenaiFront for Chat {
    type Context = ChatContext;
    const NAME: &'static str = "openai_chat";

    fn unknown() -> ChatContext {
        ChatContext {
            model: String::new(),
            include_usage: false,
        }
    }

    fn convert(value: &Value, raw: Bytes) -> Result<(Bytes, Front, ChatContext), Refusal> {
        let c = crate::adapter::chat::request::to_anthropic(value, &FrontOptions::default())?;
        let context = ChatContext {
            model: value["model"].as_str().unwrap_or_default().to_owned(),
            include_usage: c.include_usage,
        };
        let front = Front::Chat(Arc::new(ChatFront {
            original: raw,
            context: context.clone(),
        }));
        Ok((crate::adapter::chat::request::to_bytes(&c), front, context))
    }

    fn respond(
        state: &Arc<AppState>,
        record: Record,
        permit: Option<OwnedSemaphorePermit>,
        answer: Answer,
        ctx: &ChatContext,
    ) -> Response {
        respond_chat(state, record, permit, answer, ctx)
    }
}

struct Responses;

impl OpenaiFront for Responses {
    type Context = ResponsesContext;
    const NAME: &'static str = "openai_responses";

    fn unknown() -> ResponsesContext {
        ResponsesContext {
            model: String::new(),
            echo: Value::Object(Default::default()),
            tools: Vec::new(),
        }
    }

    fn convert(value: &Value, raw: Bytes) -> Result<(Bytes, Front, ResponsesContext), Refusal> {
        let c = crate::adapter::responses::request::to_anthropic(value)?;
        let body = Bytes::from(serde_json::to_vec(&c.body).unwrap_or_default());
        let front = Front::Responses(Arc::new(ResponsesFront {
            original: raw,
            context: c.context.clone(),
        }));
        Ok((body, front, c.context))
    }

    fn respond(
        state: &Arc<AppState>,
        record: Record,
        permit: Option<OwnedSemaphorePermit>,
        answer: Answer,
        ctx: &ResponsesContext,
    ) -> Response {
        respond_responses(state, record, permit, answer, ctx)
    }
}

/// The session of an OpenAI request, for sticky routing: the Claude Code session header if
/// present, else OpenCode's `x-session-affinity` or `x-session-id`, else the client's
/// `prompt_cache_key` (Codex sets it to its conversation id).
fn session(headers: &HeaderMap, body: &Value) -> Option<String> {
    let header = ["x-session-affinity", "x-session-id"].iter().find_map(|h| {
        headers
            .get(*h)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
    });
    let key = body
        .get("prompt_cache_key")
        .and_then(Value::as_str)
        .filter(|k| !k.is_empty());
    super::session_id(headers, header.or(key))
}

pub async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve::<Chat>(state, caller, headers, body).await
}

pub async fn responses(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    serve::<Responses>(state, caller, headers, body).await
}

async fn serve<F: OpenaiFront>(
    state: Arc<AppState>,
    caller: Caller,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.started();
    let id = observability::request_id(&headers);
    let mut record = Record::new(id, Endpoint::Messages, None, String::new(), false);
    record.front = F::NAME;
    record.client = caller.0.as_ref().map(|c| Arc::clone(&c.name));
    let permit = match super::permit(&state) {
        Ok(p) => p,
        Err(busy) => return F::respond(&state, record, None, Answer::error(busy), &F::unknown()),
    };
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    let accepted = async {
        let raw = super::read_request_body(body, &headers, settings.max_request_bytes).await?;
        let value: Value = serde_json::from_slice(&raw).map_err(|e| {
            ApiError::invalid_request(format!("the request body is not valid JSON: {e}"))
        })?;
        let (anthropic, front, context) = F::convert(&value, raw).map_err(|r| {
            let e = ApiError::invalid_request(r.message);
            match r.param {
                Some(p) => e.with_param(p),
                None => e,
            }
        })?;
        let sign = settings.deduplication.enabled || settings.max_cache_size > 0;
        let envelope = super::body::parse_with(&anthropic, sign)?;
        let session = session(&headers, &value);
        let mut inbound = Inbound::new(envelope, anthropic, headers.clone(), None, session);
        inbound.front = front;
        Ok::<_, ApiError>((inbound, context))
    };
    let (inbound, ctx) = match accepted.await {
        Ok(x) => x,
        Err(e) => return F::respond(&state, record, permit, Answer::error(e), &F::unknown()),
    };
    drop(runtime);
    record.model = inbound.envelope.model.clone();
    record.stream = inbound.envelope.stream;
    record.session = inbound.session.clone();
    if let Some(client) = caller.0 {
        if let Err(refusal) =
            super::admit(&state, &client, &inbound.envelope.model, &mut record).await
        {
            return F::respond(&state, record, permit, Answer::error(refusal), &ctx);
        }
        record.charge_to = Some(client);
    }
    let answer = crate::dedup::serve(&state, inbound).await;
    F::respond(&state, record, permit, answer, &ctx)
}
