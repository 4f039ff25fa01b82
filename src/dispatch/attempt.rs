//! One attempt against one candidate: build the upstream request for the provider's type, send it,
//! classify the answer, and commit a success.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue};
use tokio::time::{Instant, timeout_at};

use super::relay::{self, Relay, Transform, Upstream};
use super::{
    Fault, FaultClass, Inbound, Outcome, body_fault, error_payload_fault, is_error_body, read_body,
    response_with, status_fault, transport_fault,
};
use crate::adapter::anthropic::strip_gateway_thinking;
use crate::adapter::openai::stream::{Step, StreamState, chunk_error};
use crate::adapter::openai::{self, Options, ReplyContext};
use crate::config::{ProviderKind, Settings, TimeoutSet};
use crate::inbound::body;
use crate::routing::Candidate;
use crate::state::{AppState, Runtime};
use crate::upstream::sse::{self, EventKind, Splitter};
use crate::upstream::{
    AuthStyle, TransportError, UpstreamResponse, anthropic_request_headers, apply_auth, retry_after,
};

/// Error bodies read from a provider are cut at this size.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// A non-streaming answer larger than this is a provider fault.
const MAX_RESPONSE_BODY: usize = 256 * 1024 * 1024;

/// Timing of one attempt.
struct Clock {
    started: Instant,
    t: TimeoutSet,
    /// The whole attempt (non-streaming: `timeout_seconds`).
    deadline: Instant,
}

impl Clock {
    fn new(settings: &Settings, stream: bool) -> Self {
        let started = Instant::now();
        let t = if stream {
            settings.timeouts.streaming
        } else {
            settings.timeouts.non_streaming
        };
        let deadline = if stream {
            started + Duration::from_secs(86_400 * 365)
        } else {
            started + settings.timeout
        };
        Self {
            started,
            t,
            deadline,
        }
    }

    /// Until the response headers (and, streaming, the first event).
    fn first_byte_deadline(&self) -> Instant {
        (self.started + self.t.connect + self.t.read).min(self.deadline)
    }
}

pub async fn attempt(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
) -> Outcome {
    match candidate.provider.config.kind {
        ProviderKind::Anthropic => anthropic(state, runtime, candidate, inbound).await,
        ProviderKind::Openai => openai(state, runtime, candidate, inbound).await,
    }
}

/// Sends the request and waits for the response headers.
async fn send(
    request: impl Future<Output = Result<UpstreamResponse, TransportError>>,
    clock: &Clock,
) -> Result<UpstreamResponse, Fault> {
    let deadline = clock.first_byte_deadline();
    match timeout_at(deadline, request).await {
        Err(_) => Err(Fault::new(
            FaultClass::Timeout,
            format!(
                "no response within {} s",
                (deadline - clock.started).as_secs()
            ),
        )),
        Ok(Err(e)) => Err(transport_fault(e)),
        Ok(Ok(r)) => Ok(r),
    }
}

/// A non-2xx answer: a provider fault, or `(status, headers, body)` of a client fault.
async fn error_status(
    mut resp: UpstreamResponse,
    settings: &Settings,
    clock: &Clock,
) -> Result<(u16, HeaderMap, Bytes), Fault> {
    let status = resp.status.as_u16();
    let headers = std::mem::take(&mut resp.headers);
    let retry = retry_after(&headers);
    let body = read_body(resp, clock.t.read, MAX_ERROR_BODY).await?;
    let text = String::from_utf8_lossy(&body);
    if settings.unhealthy_http_codes.contains(status)
        || settings
            .unhealthy_exception_patterns
            .iter()
            .any(|p| !p.is_empty() && text.contains(p.as_str()))
    {
        return Err(status_fault(status, &body, retry));
    }
    Ok((status, headers, body))
}

async fn read_whole(
    resp: UpstreamResponse,
    clock: &Clock,
    settings: &Settings,
) -> Result<Bytes, Fault> {
    match timeout_at(
        clock.deadline,
        read_body(resp, clock.t.read, MAX_RESPONSE_BODY),
    )
    .await
    {
        Err(_) => Err(Fault::new(
            FaultClass::Timeout,
            format!(
                "no complete answer within {} s (timeout_seconds)",
                settings.timeout.as_secs()
            ),
        )),
        Ok(r) => r,
    }
}

fn sse_headers(response: &mut Response) {
    let h = response.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
}

/// Commits a complete JSON answer.
fn commit_json(
    clock: &Clock,
    status: u16,
    upstream_headers: &HeaderMap,
    body: Body,
    name: &str,
) -> Outcome {
    let ttfb = clock.started.elapsed();
    let mut response = response_with(status, upstream_headers, body, name);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Outcome::Committed { response, ttfb }
}

/// Commits a stream: `first` goes out at once, the rest through the relay.
#[allow(clippy::too_many_arguments)]
fn commit_stream(
    state: &Arc<AppState>,
    clock: &Clock,
    status: u16,
    upstream_headers: &HeaderMap,
    name: &str,
    first: Bytes,
    upstream: Upstream,
    splitter: Splitter,
    transform: Transform,
) -> Outcome {
    let ttfb = clock.started.elapsed();
    let relay = Relay {
        first: Some(first),
        upstream,
        splitter,
        read_timeout: clock.t.read,
        state: Arc::clone(state),
        provider: name.to_owned(),
        transform,
    };
    let mut response = response_with(
        status,
        upstream_headers,
        Body::from_stream(relay::relay(relay)),
        name,
    );
    sse_headers(&mut response);
    Outcome::Committed { response, ttfb }
}

/// Reads upstream events until `decide` accepts or rejects them. Returns the events read so far
/// and the splitter holding any partial event.
async fn first_events(
    upstream: &mut Upstream,
    clock: &Clock,
    mut decide: impl FnMut(&Bytes, &[EventKind]) -> Option<Result<(), Fault>>,
) -> Result<(BytesMut, Splitter), Fault> {
    let mut splitter = Splitter::new();
    let mut prefix = BytesMut::new();
    let deadline = clock.first_byte_deadline();
    loop {
        match timeout_at(deadline, upstream.next()).await {
            Err(_) => {
                return Err(Fault::new(
                    FaultClass::Timeout,
                    format!("no event within {} s", (deadline - clock.started).as_secs()),
                ));
            }
            Ok(None) => {
                let mut seen = prefix.to_vec();
                seen.extend_from_slice(splitter.pending());
                if is_error_body(&seen) {
                    return Err(error_payload_fault(&String::from_utf8_lossy(&seen)));
                }
                return Err(Fault::new(
                    FaultClass::Other,
                    "stream ended before its first event",
                ));
            }
            Ok(Some(Err(e))) => return Err(transport_fault(e)),
            Ok(Some(Ok(chunk))) => {
                let events = splitter.push(chunk);
                if events.bytes.is_empty() {
                    continue;
                }
                prefix.extend_from_slice(&events.bytes);
                let all = prefix.clone().freeze();
                match decide(&all, &events.kinds) {
                    None => continue,
                    Some(Ok(())) => return Ok((prefix, splitter)),
                    Some(Err(f)) => return Err(f),
                }
            }
        }
    }
}

async fn anthropic(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
) -> Outcome {
    let settings = &runtime.config.settings;
    let provider = &candidate.provider;
    let name = provider.config.name.as_str();
    let stream = inbound.envelope.stream;
    let clock = Clock::new(settings, stream);
    // History from an OpenAI-compatible route may hold thinking blocks this gateway signed.
    let source = inbound
        .envelope
        .gateway_signed
        .then(|| strip_gateway_thinking(&inbound.body))
        .flatten()
        .unwrap_or_else(|| inbound.body.clone());
    let body = body::rewrite(
        &source,
        &candidate.upstream_model,
        &inbound.envelope.model,
        inbound.envelope.provider.is_some(),
    );
    let headers = anthropic_request_headers(&inbound.headers, &provider.config.auth);
    let mut resp = match send(
        provider.post_messages(inbound.query.as_deref(), headers, body),
        &clock,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    let status = resp.status.as_u16();
    if !resp.status.is_success() {
        return match error_status(resp, settings, &clock).await {
            Err(f) => Outcome::Fault(f),
            Ok((status, headers, body)) => {
                Outcome::ClientFault(response_with(status, &headers, Body::from(body), name))
            }
        };
    }
    let upstream_headers = std::mem::take(&mut resp.headers);
    if !stream {
        let body = match read_whole(resp, &clock, settings).await {
            Ok(b) => b,
            Err(f) => return Outcome::Fault(f),
        };
        if let Some(f) = body_fault(settings, &body) {
            return Outcome::Fault(f);
        }
        if is_error_body(&body) {
            return Outcome::Fault(error_payload_fault(&String::from_utf8_lossy(&body)));
        }
        if !crate::inbound::canonical::is_json(&body) {
            return Outcome::Fault(Fault::new(FaultClass::Other, "answer is not JSON"));
        }
        return commit_json(&clock, status, &upstream_headers, Body::from(body), name);
    }

    // Streaming: commit on the first complete event that is not a ping.
    let mut upstream: Upstream = resp.into_stream();
    let decided = first_events(&mut upstream, &clock, |all, kinds| {
        match kinds.iter().find(|k| **k != EventKind::Ping) {
            None => None,
            Some(EventKind::Error) => {
                let text = String::from_utf8_lossy(all);
                let payload = sse::parse_all(&text)
                    .into_iter()
                    .find(|(n, _)| n.as_deref() == Some("error"))
                    .map(|(_, d)| d)
                    .unwrap_or_default();
                Some(Err(error_payload_fault(&payload)))
            }
            Some(_) => {
                // The events before commit must be readable: a broken first event fails over.
                if let Some(bad) = sse::parse_all(&String::from_utf8_lossy(all))
                    .into_iter()
                    .find(|(_, d)| serde_json::from_str::<serde::de::IgnoredAny>(d).is_err())
                {
                    return Some(Err(Fault::new(
                        FaultClass::Other,
                        format!(
                            "event {:?} before commit is not JSON",
                            bad.0.unwrap_or_default()
                        ),
                    )));
                }
                Some(body_fault(settings, all).map_or(Ok(()), Err))
            }
        }
    })
    .await;
    let (prefix, splitter) = match decided {
        Ok(x) => x,
        Err(f) => return Outcome::Fault(f),
    };
    commit_stream(
        state,
        &clock,
        status,
        &upstream_headers,
        name,
        prefix.freeze(),
        upstream,
        splitter,
        Transform::Passthrough,
    )
}

/// The `data:` payloads of complete events, comments and `event:` lines ignored.
pub fn data_payloads(events: &[u8]) -> Vec<String> {
    sse::parse_all(&String::from_utf8_lossy(events))
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| !d.trim().is_empty())
        .collect()
}

async fn openai(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
) -> Outcome {
    let settings = &runtime.config.settings;
    let provider = &candidate.provider;
    let name = provider.config.name.as_str();
    let stream = inbound.envelope.stream;
    let Some((request_value, estimate)) = inbound.parsed() else {
        return Outcome::Fault(Fault::new(
            FaultClass::Other,
            "request body could not be parsed for conversion",
        ));
    };
    let opts = Options {
        dialect: provider.config.dialect,
        max_tokens_cap: provider.config.max_tokens_cap,
        sanitize_schemas: provider.config.sanitize_schemas,
    };
    let converted =
        match openai::request::convert(request_value, &candidate.upstream_model, stream, &opts) {
            Ok(v) => v,
            Err(u) => return Outcome::Unsupported(u.to_string()),
        };
    let ctx = ReplyContext::from_request(request_value, estimate);
    let clock = Clock::new(settings, stream);
    let mut headers = HeaderMap::new();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        http::header::ACCEPT,
        HeaderValue::from_static(if stream {
            "text/event-stream"
        } else {
            "application/json"
        }),
    );
    apply_auth(
        &mut headers,
        &inbound.headers,
        &provider.config.auth,
        AuthStyle::Openai,
    );
    let body = serde_json::to_vec(&converted).unwrap_or_default();
    let mut resp = match send(
        provider.post_messages(None, headers, Bytes::from(body)),
        &clock,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    if !resp.status.is_success() {
        return match error_status(resp, settings, &clock).await {
            Err(f) => Outcome::Fault(f),
            Ok((status, headers, body)) => {
                let mut r =
                    openai::errors::to_anthropic(status, &body, name, estimate).into_response();
                for (k, v) in crate::upstream::client_response_headers(&headers) {
                    if let Some(k) = k {
                        if k != http::header::CONTENT_TYPE {
                            r.headers_mut().insert(k, v);
                        }
                    }
                }
                r.headers_mut()
                    .insert("x-provider-used", super::provider_header(name));
                Outcome::ClientFault(r)
            }
        };
    }
    let upstream_headers = std::mem::take(&mut resp.headers);
    if !stream {
        let body = match read_whole(resp, &clock, settings).await {
            Ok(b) => b,
            Err(f) => return Outcome::Fault(f),
        };
        if let Some(f) = body_fault(settings, &body) {
            return Outcome::Fault(f);
        }
        let answer: serde_json::Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return Outcome::Fault(Fault::new(
                    FaultClass::Other,
                    format!("answer is not JSON: {e}"),
                ));
            }
        };
        if let Some((kind, message)) = chunk_error(&answer) {
            let class = if kind == "overloaded_error" {
                FaultClass::Overloaded
            } else {
                FaultClass::Other
            };
            return Outcome::Fault(Fault::new(class, format!("error inside a 200: {message}")));
        }
        let Some(message) = openai::response::to_message(&answer, &ctx) else {
            return Outcome::Fault(Fault::new(FaultClass::Other, "answer has no choices"));
        };
        return commit_json(
            &clock,
            200,
            &upstream_headers,
            Body::from(message.to_string()),
            name,
        );
    }

    // Streaming: commit on the first chunk that parses and is not an error.
    let mut upstream: Upstream = resp.into_stream();
    let decided = first_events(&mut upstream, &clock, |all, _| {
        let payloads = data_payloads(all);
        let first = payloads.iter().find(|d| {
            d.trim() == "[DONE]" || serde_json::from_str::<serde_json::Value>(d).is_ok()
        })?;
        if first.trim() == "[DONE]" {
            return Some(Err(Fault::new(
                FaultClass::Other,
                "stream ended before any content",
            )));
        }
        let chunk: serde_json::Value = serde_json::from_str(first).unwrap_or_default();
        if let Some((kind, message)) = chunk_error(&chunk) {
            let class = if kind == "overloaded_error" {
                FaultClass::Overloaded
            } else {
                FaultClass::Other
            };
            return Some(Err(Fault::new(
                class,
                format!("error before the first event: {message}"),
            )));
        }
        Some(body_fault(settings, all).map_or(Ok(()), Err))
    })
    .await;
    let (prefix, splitter) = match decided {
        Ok(x) => x,
        Err(f) => return Outcome::Fault(f),
    };
    let mut converter = StreamState::new(ctx);
    converter.start();
    for data in data_payloads(&prefix) {
        if converter.push_data(&data) != Step::Continue {
            break;
        }
    }
    let first = Bytes::from(converter.take());
    let transform = Transform::Openai(Box::new(converter));
    // The provider's request-id names a Chat Completions request, not an Anthropic message.
    let mut headers = upstream_headers;
    headers.remove("request-id");
    commit_stream(
        state, &clock, 200, &headers, name, first, upstream, splitter, transform,
    )
}
