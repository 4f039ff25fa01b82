//! The edge out: a typed [`Answer`] rendered as an Anthropic Messages API response, and observed
//! until its body ends. Every response to `/v1/messages` and `count_tokens` is built here, and
//! only here, from the answer's typed facts.

use std::convert::Infallible;
use std::sync::Arc;

use axum::response::Response;
use futures_util::StreamExt;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderMap, HeaderValue};
use tokio::sync::OwnedSemaphorePermit;

use crate::dispatch::{Answer, Body, CacheStatus, Source};
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
    let mut response = anthropic(answer);
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
    match &source {
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
    let mut response = Response::new(body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}
