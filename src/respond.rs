//! The edge out: a typed [`Answer`] rendered in its front end's wire format (an Anthropic Messages
//! API response, or a Chat Completions one), and observed until its body ends. Every response to
//! `/v1/messages`, `count_tokens` and `/v1/chat/completions` is built here, and only here, from
//! the answer's typed facts.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::Response;
use futures_util::StreamExt;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;

use crate::adapter::Render;
use crate::adapter::chat::stream::ChunkState;
use crate::adapter::chat::{self, ChatContext};
use crate::adapter::responses::stream::EventState;
use crate::adapter::responses::{self, ResponsesContext};
use crate::dispatch::{Answer, Body, CacheStatus, ChatFront, Source, Wire};
use crate::observability::{self, Record};
use crate::state::AppState;

/// Renders `answer` for the client, stamps the request id and the balancer's overhead, and hands
/// the body to the observer that writes the summary line (and releases `permit`) when it ends.
pub fn respond(
    state: &Arc<AppState>,
    mut record: Record,
    permit: Option<OwnedSemaphorePermit>,
    mut answer: Answer,
) -> Response {
    record.fill(&mut answer);
    let response = anthropic(answer);
    finish(state, record, permit, response)
}

/// Stamps the request id and the balancer's overhead on a rendered response, and hands its body
/// to the observer.
fn finish(
    state: &Arc<AppState>,
    mut record: Record,
    permit: Option<OwnedSemaphorePermit>,
    mut response: Response,
) -> Response {
    // What the client got (an OpenAI front end maps some statuses: 529 is 503 there).
    record.status = response.status().as_u16();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&record.id) {
        headers.insert("x-request-id", v);
    }
    let overhead = record.overhead().as_secs_f64() * 1000.0;
    if let Ok(v) = HeaderValue::from_str(&format!("{overhead:.3}")) {
        headers.insert("x-balancer-overhead-ms", v);
    }
    let (parts, body) = response.into_parts();
    let body = observability::observe(state, record, permit, body);
    Response::from_parts(parts, body)
}

/// [`respond`] for the Chat Completions front end: the answer in the Chat Completions wire format.
/// An Anthropic event stream is observed as it is (its usage read from its own events), then
/// rendered as chunks.
pub fn respond_chat(
    state: &Arc<AppState>,
    mut record: Record,
    permit: Option<OwnedSemaphorePermit>,
    mut answer: Answer,
    front: &ChatFront,
) -> Response {
    record.fill(&mut answer);
    let render = answer.wire == Wire::Anthropic && answer.is_stream();
    let strip = answer.wire == Wire::Chat && answer.is_stream() && front.usage_added;
    let response = finish(
        state,
        record,
        permit,
        openai_response(answer, Openai::Chat(front)),
    );
    if !render && !strip {
        return response;
    }
    let (parts, body) = response.into_parts();
    let body = if render {
        chunks(body, front.context())
    } else {
        without_usage_chunk(body)
    };
    Response::from_parts(parts, body)
}

/// A Chat Completions stream without the usage chunk (`"choices":[]` and a `usage` object) the
/// balancer asked for on its client's behalf; the observer inside has read it already.
fn without_usage_chunk(body: axum::body::Body) -> axum::body::Body {
    let events = body.into_data_stream().map(|item| {
        let bytes = item.unwrap_or_default();
        if memchr::memmem::find(&bytes, b"\"usage\"").is_none() {
            return Ok::<_, Infallible>(bytes);
        }
        let text = String::from_utf8_lossy(&bytes);
        let mut kept = String::with_capacity(text.len());
        for event in text.split_inclusive("\n\n") {
            let usage_only = crate::upstream::sse::data_payloads(event.as_bytes())
                .iter()
                .any(|d| {
                    serde_json::from_str::<serde_json::Value>(d).is_ok_and(|v| {
                        v["choices"].as_array().is_some_and(Vec::is_empty) && v["usage"].is_object()
                    })
                });
            if !usage_only {
                kept.push_str(event);
            }
        }
        Ok(bytes::Bytes::from(kept))
    });
    axum::body::Body::from_stream(events)
}

/// An Anthropic event stream's body rendered as Chat Completions chunks.
fn chunks(body: axum::body::Body, ctx: ChatContext) -> axum::body::Body {
    let state = ChunkState::new(ctx, chat::completion_id(), chat::now_secs());
    rendered(body, state)
}

/// An Anthropic event stream's body rendered by `state`. When the rendering has finished, the
/// inner stream is still read to its end (the relay ends right after `message_stop`): ending it
/// is what completes a coalesced flight and puts the answer into the cache.
fn rendered(body: axum::body::Body, state: impl Render) -> axum::body::Body {
    let events = body.into_data_stream();
    let rendered = futures_util::stream::unfold(
        (events, state, false),
        |(mut events, mut state, ended)| async move {
            if ended {
                return None;
            }
            if state.is_finished() {
                while events.next().await.is_some() {}
                return None;
            }
            loop {
                match events.next().await {
                    Some(Ok(bytes)) => {
                        state.push_sse(&bytes);
                        let out = state.take();
                        if !out.is_empty() {
                            return Some((
                                Ok::<_, Infallible>(bytes::Bytes::from(out)),
                                (events, state, false),
                            ));
                        }
                    }
                    _ => {
                        state.end();
                        let out = state.take();
                        return (!out.is_empty())
                            .then(|| (Ok(bytes::Bytes::from(out)), (events, state, true)));
                    }
                }
            }
        },
    );
    axum::body::Body::from_stream(rendered)
}

/// [`respond`] for the Responses front end: the answer as a `response` object or its typed
/// events. A streaming request refused for its length still gets a stream, ending in
/// `response.failed` with `context_length_exceeded`: the one form on which Codex compacts.
pub fn respond_responses(
    state: &Arc<AppState>,
    mut record: Record,
    permit: Option<OwnedSemaphorePermit>,
    mut answer: Answer,
    ctx: &ResponsesContext,
) -> Response {
    record.fill(&mut answer);
    let render = answer.wire == Wire::Anthropic && answer.is_stream();
    let stream = record.stream;
    let response = finish(
        state,
        record,
        permit,
        openai_response(answer, Openai::Responses(ctx, stream)),
    );
    if !render {
        return response;
    }
    let (parts, body) = response.into_parts();
    let state = EventState::new(ctx.clone(), responses::response_id(), chat::now_secs());
    Response::from_parts(parts, rendered(body, state))
}

/// An error for a Responses client: a stream ending in `response.failed` for a streaming request
/// too long for the model, else an OpenAI error response (an overloaded provider without the
/// code on which Codex gives up at once).
fn responses_error(
    status: http::StatusCode,
    kind: &str,
    message: &str,
    mut headers: HeaderMap,
    ctx: &ResponsesContext,
    stream: bool,
) -> (http::StatusCode, HeaderMap, axum::body::Body) {
    if stream && responses::failure_code(kind, message) == "context_length_exceeded" {
        let mut events = EventState::new(ctx.clone(), responses::response_id(), chat::now_secs());
        events.fail(kind, message);
        sse_headers(&mut headers);
        return (
            http::StatusCode::OK,
            headers,
            axum::body::Body::from(events.take()),
        );
    }
    let (s, mut v) = chat::errors::openai_error(status.as_u16(), kind, message);
    if v["error"]["code"] == "server_is_overloaded" {
        v["error"]["code"] = serde_json::Value::Null;
    }
    openai_error((s, v), headers)
}

/// The type and message of an Anthropic error body a provider wrote.
fn anthropic_error_of(status: u16, body: &[u8]) -> (String, String) {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let kind = v
        .pointer("/error/type")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_else(|| crate::error::error_type_for_status(status));
    let (_, openai) = chat::errors::from_anthropic_body(status, body);
    let message = openai["error"]["message"].as_str().unwrap_or("").to_owned();
    (kind.to_owned(), message)
}

/// A complete Anthropic message rendered by `render` as a 200 JSON answer (a 502 when the
/// provider's answer is not JSON).
fn rendered_message(
    bytes: &[u8],
    mut headers: HeaderMap,
    render: impl FnOnce(&serde_json::Value) -> serde_json::Value,
) -> (http::StatusCode, HeaderMap, axum::body::Body) {
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(message) => {
            headers.insert(CONTENT_TYPE, json());
            (
                http::StatusCode::OK,
                headers,
                axum::body::Body::from(render(&message).to_string()),
            )
        }
        Err(_) => openai_error(
            chat::errors::openai_error(502, "api_error", "the provider's answer is not JSON"),
            headers,
        ),
    }
}

/// An OpenAI error response.
fn openai_error(
    (status, body): (http::StatusCode, serde_json::Value),
    mut headers: HeaderMap,
) -> (http::StatusCode, HeaderMap, axum::body::Body) {
    headers.insert(CONTENT_TYPE, json());
    (status, headers, axum::body::Body::from(body.to_string()))
}

/// The OpenAI API an answer is rendered in, and what its rendering needs.
#[derive(Clone, Copy)]
enum Openai<'a> {
    Chat(&'a ChatFront),
    /// A Responses request, and whether it streams.
    Responses(&'a ResponsesContext, bool),
}

/// An answer in an OpenAI wire format: the provider's own answer as it is, an Anthropic message
/// rendered, errors in OpenAI's shape (an Anthropic stream is left to [`rendered`]).
fn openai_response(answer: Answer, api: Openai<'_>) -> Response {
    let Answer {
        status,
        mut headers,
        source,
        cache,
        body,
        wire,
        ..
    } = answer;
    let (status, mut headers, body) = match body {
        Body::Error(e) => {
            if let Some(secs) = e.retry_after {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            match (api, &e.param) {
                (Openai::Responses(ctx, stream), None) => {
                    responses_error(e.status, e.error_type, &e.message, headers, ctx, stream)
                }
                // A refusal of the request itself names the parameter.
                (_, param) => {
                    let (s, mut v) =
                        chat::errors::openai_error(e.status.as_u16(), e.error_type, &e.message);
                    if let Some(p) = param {
                        v["error"]["param"] = serde_json::json!(p);
                    }
                    openai_error((s, v), headers)
                }
            }
        }
        Body::Stream(events) => {
            sse_headers(&mut headers);
            (
                status,
                headers,
                axum::body::Body::from_stream(events.map(Ok::<_, Infallible>)),
            )
        }
        // The provider's own answer in the client's API, as it wrote it.
        Body::Json(bytes) if wire != Wire::Anthropic => {
            if status.is_success() || !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, json());
            }
            (status, headers, axum::body::Body::from(bytes))
        }
        Body::Json(bytes) if status.is_success() => {
            rendered_message(&bytes, headers, |m| match api {
                Openai::Chat(front) => chat::response::completion(
                    m,
                    &front.context(),
                    &chat::completion_id(),
                    chat::now_secs(),
                ),
                Openai::Responses(ctx, _) => {
                    responses::response(m, ctx, &responses::response_id(), chat::now_secs())
                }
            })
        }
        Body::Json(bytes) => match api {
            Openai::Chat(_) => openai_error(
                chat::errors::from_anthropic_body(status.as_u16(), &bytes),
                headers,
            ),
            Openai::Responses(ctx, stream) => {
                let (kind, message) = anthropic_error_of(status.as_u16(), &bytes);
                responses_error(status, &kind, &message, headers, ctx, stream)
            }
        },
    };
    provenance(&mut headers, &source, cache);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// Who answered: the provider's name, a local count, the cache's part.
fn provenance(headers: &mut HeaderMap, source: &Source, cache: CacheStatus) {
    match source {
        Source::Provider { name, .. } => {
            let v = HeaderValue::from_str(name).unwrap_or(HeaderValue::from_static("invalid-name"));
            headers.insert("x-provider-used", v);
        }
        Source::LocalCount => {
            headers.insert("x-token-count", HeaderValue::from_static("local"));
        }
        Source::Balancer => {}
    }
    if cache != CacheStatus::Off {
        headers.insert("x-balancer-cache", HeaderValue::from_static(cache.as_str()));
    }
}

/// The headers of an event stream.
fn sse_headers(h: &mut HeaderMap) {
    h.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

fn json() -> HeaderValue {
    HeaderValue::from_static("application/json")
}

/// An answer in the Anthropic wire format.
pub fn anthropic(answer: Answer) -> Response {
    let Answer {
        status,
        mut headers,
        source,
        cache,
        body,
        ..
    } = answer;
    let (status, body) = match body {
        Body::Json(bytes) => {
            // A client fault keeps the content type the provider gave its error body.
            if status.is_success() || !headers.contains_key(CONTENT_TYPE) {
                headers.insert(CONTENT_TYPE, json());
            }
            (status, axum::body::Body::from(bytes))
        }
        Body::Stream(events) => {
            sse_headers(&mut headers);
            (
                status,
                axum::body::Body::from_stream(events.map(Ok::<_, Infallible>)),
            )
        }
        Body::Error(error) => {
            headers.insert(CONTENT_TYPE, json());
            if let Some(secs) = error.retry_after {
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
            }
            (error.status, axum::body::Body::from(error.body()))
        }
    };
    provenance(&mut headers, &source, cache);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
