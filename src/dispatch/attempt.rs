//! One attempt against one candidate: build the upstream request for the provider's type and
//! the endpoint, send it, classify the answer, and commit a success.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::{Instant, timeout_at};

use super::answer::{Body, FaultClass, Usage, Wire};
use super::classify::{
    Fault, FaultPolicy, error_payload_fault, is_error_body, status_fault, transport_fault,
};
use super::relay::{self, Relay, Transform, Upstream};
use super::{Endpoint, Front, Inbound, Outcome, Reply};
use crate::adapter::anthropic::strip_gateway_thinking;
use crate::adapter::openai::stream::{Step, StreamState, chunk_error};
use crate::adapter::openai::{self, Options, ReplyContext};
use crate::config::{Auth, ProviderKind, TimeoutSet};
use crate::inbound::body;
use crate::routing::Candidate;
use crate::state::{AppState, Runtime};
use crate::upstream::sse::{self, EventKind, Splitter, data_payloads};
use crate::upstream::{
    AuthStyle, TransportError, UpstreamResponse, anthropic_request_headers, apply_auth,
    client_response_headers, retry_after,
};

/// Error bodies read from a provider are cut at this size.
const MAX_ERROR_BODY: usize = 1024 * 1024;
/// A non-streaming answer larger than this is a provider fault.
const MAX_RESPONSE_BODY: usize = 256 * 1024 * 1024;
/// The most a stream may send before its first event that decides the commit (pings and
/// comments count): past it, a provider fault.
pub const MAX_PREFIX_BYTES: usize = 1024 * 1024;
/// A count_tokens answer larger than this is not an answer.
const MAX_COUNT_BODY: usize = 64 * 1024;

/// The deadlines of one attempt.
struct Deadlines {
    started: Instant,
    /// The longest silence while a body is read (`read_timeout`).
    gap: Duration,
    /// Until the response headers and, for a stream, its first event.
    first_byte: Instant,
    /// Until the whole answer (non-streaming: `timeout_seconds`; a stream has none).
    whole: Instant,
}

impl Deadlines {
    fn new(t: TimeoutSet, whole: Option<Duration>) -> Self {
        let started = Instant::now();
        let whole = started + whole.unwrap_or(Duration::from_secs(86_400 * 365));
        Self {
            started,
            gap: t.read,
            first_byte: (started + t.connect + t.read).min(whole),
            whole,
        }
    }

    /// One bound for everything (count_tokens' `timeout_override`).
    fn single(limit: Duration) -> Self {
        let started = Instant::now();
        Self {
            started,
            gap: limit,
            first_byte: started + limit,
            whole: started + limit,
        }
    }
}

/// One attempt against `candidate` with the credential `auth` (the provider's own, or the key of
/// its pool chosen for this attempt).
pub async fn attempt(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    endpoint: Endpoint,
    auth: &Auth,
) -> Outcome {
    match (endpoint, candidate.provider.config.kind) {
        (Endpoint::Messages, ProviderKind::Anthropic) => {
            anthropic(state, runtime, candidate, inbound, auth).await
        }
        (Endpoint::Messages, ProviderKind::Openai) => match &inbound.front {
            Front::Chat(chat) => {
                native(
                    state,
                    runtime,
                    candidate,
                    inbound,
                    Native::Chat {
                        add_usage: chat.usage_added,
                    },
                    &chat.original,
                    auth,
                )
                .await
            }
            Front::Responses(r) if candidate.provider.config.responses => {
                native(
                    state,
                    runtime,
                    candidate,
                    inbound,
                    Native::Responses,
                    &r.original,
                    auth,
                )
                .await
            }
            Front::Anthropic | Front::Responses(_) => {
                openai(state, runtime, candidate, inbound, auth).await
            }
        },
        (Endpoint::CountTokens, ProviderKind::Anthropic) => {
            count_tokens(runtime, candidate, inbound, auth).await
        }
        (Endpoint::CountTokens, ProviderKind::Openai) => Outcome::Unsupported(
            "OpenAI-compatible providers have no count_tokens endpoint".into(),
            None,
        ),
    }
}

/// Sends the request and waits for the response headers.
async fn send(
    request: impl Future<Output = Result<UpstreamResponse, TransportError>>,
    deadlines: &Deadlines,
) -> Result<UpstreamResponse, Fault> {
    let deadline = deadlines.first_byte;
    match timeout_at(deadline, request).await {
        Err(_) => Err(Fault::new(
            FaultClass::Timeout,
            format!(
                "no response within {} s",
                (deadline - deadlines.started).as_secs()
            ),
        )),
        Ok(Err(e)) => Err(transport_fault(e)),
        Ok(Ok(r)) => Ok(r),
    }
}

/// Reads a whole upstream body, each gap between chunks bounded by `gap`, at most `limit` bytes.
async fn read_upstream_body(
    mut resp: UpstreamResponse,
    gap: Duration,
    limit: usize,
) -> Result<Bytes, Fault> {
    let mut out = BytesMut::new();
    loop {
        match tokio::time::timeout(gap, resp.chunk()).await {
            Err(_) => {
                return Err(Fault::new(
                    FaultClass::Timeout,
                    format!("no data for {} s while reading the body", gap.as_secs()),
                ));
            }
            Ok(None) => return Ok(out.freeze()),
            Ok(Some(Err(e))) => return Err(transport_fault(e)),
            Ok(Some(Ok(chunk))) => {
                if out.len() + chunk.len() > limit {
                    return Err(Fault::new(
                        FaultClass::Other,
                        format!("body larger than {limit} bytes"),
                    ));
                }
                out.extend_from_slice(&chunk);
            }
        }
    }
}

/// A non-2xx answer: a provider fault, or `(status, headers, body)` of a client fault.
///
/// The body is masked of every configured secret and the client's credentials before anything
/// reads it: a provider that echoes a key in its error must not pass it on.
async fn error_status(
    mut resp: UpstreamResponse,
    faults: &FaultPolicy,
    deadlines: &Deadlines,
    runtime: &Runtime,
    inbound: &Inbound,
) -> Result<(StatusCode, HeaderMap, Bytes), Fault> {
    let status = resp.status;
    let headers = std::mem::take(&mut resp.headers);
    if status.is_redirection() {
        // Never followed (the request would go where the configuration did not send it) and never
        // passed on (a bare redirect means nothing to an API client): the provider is misconfigured
        // or moved. The location is redacted with every reason.
        let location = headers
            .get(http::header::LOCATION)
            .map(|l| String::from_utf8_lossy(l.as_bytes()).into_owned())
            .unwrap_or_default();
        let location = crate::secret::mask_url_credentials(&location);
        return Err(Fault {
            status: Some(status.as_u16()),
            ..Fault::new(
                FaultClass::Other,
                format!(
                    "HTTP {}: redirected to {location:?}, not followed",
                    status.as_u16()
                ),
            )
        });
    }
    let retry = retry_after(&headers);
    let body = read_upstream_body(resp, deadlines.gap, MAX_ERROR_BODY).await?;
    let body = super::request_redactor(runtime, inbound).bytes(body);
    if faults.is_unhealthy(status.as_u16(), &body) {
        let mut fault = status_fault(status.as_u16(), &body, retry);
        for (name, value) in &headers {
            if name.as_str().starts_with("anthropic-ratelimit-") {
                fault.rate_limits.append(name.clone(), value.clone());
            }
        }
        return Err(fault);
    }
    Ok((status, headers, body))
}

/// Reads a whole answer within the attempt's deadlines.
async fn read_whole(
    resp: UpstreamResponse,
    deadlines: &Deadlines,
    limit: usize,
) -> Result<Bytes, Fault> {
    match timeout_at(
        deadlines.whole,
        read_upstream_body(resp, deadlines.gap, limit),
    )
    .await
    {
        Err(_) => Err(Fault::new(
            FaultClass::Timeout,
            format!(
                "no complete answer within {} s",
                (deadlines.whole - deadlines.started).as_secs()
            ),
        )),
        Ok(r) => r,
    }
}

/// Reads a whole 2xx answer within the attempt's deadlines; a body matching the fault patterns is
/// a provider fault.
async fn read_answer(
    resp: UpstreamResponse,
    deadlines: &Deadlines,
    faults: &FaultPolicy,
) -> Result<Bytes, Fault> {
    let body = read_whole(resp, deadlines, MAX_RESPONSE_BODY).await?;
    match faults.body_fault(&body) {
        Some(f) => Err(f),
        None => Ok(body),
    }
}

/// Commits a complete JSON answer; `usage` is read from it when it is a message.
fn commit_json(
    deadlines: &Deadlines,
    status: StatusCode,
    upstream_headers: &HeaderMap,
    body: Bytes,
    message: bool,
) -> Outcome {
    Outcome::Committed(Reply {
        status,
        headers: client_response_headers(upstream_headers),
        usage: message.then(|| Usage::of_message(&body)),
        body: Body::Json(body),
        wire: Wire::Anthropic,
        ttfb: Some(deadlines.started.elapsed()),
    })
}

/// Commits a stream: the first bytes go out at once, the rest through the relay.
#[allow(clippy::too_many_arguments)]
fn commit_stream(
    state: &Arc<AppState>,
    runtime: &Runtime,
    deadlines: &Deadlines,
    status: StatusCode,
    upstream_headers: &HeaderMap,
    name: &str,
    prefix: Prefix,
    upstream: Upstream,
    transform: Transform,
) -> Outcome {
    let wire = match &transform {
        Transform::Native(watch) => watch.wire(),
        Transform::Passthrough | Transform::Openai(_) => Wire::Anthropic,
    };
    let ttfb = deadlines.started.elapsed();
    let relay = Relay {
        first: Some(prefix.bytes),
        ended: prefix.ended,
        upstream,
        splitter: prefix.splitter,
        read_timeout: deadlines.gap,
        state: Arc::clone(state),
        health: runtime.health_policy,
        redactor: Arc::clone(&runtime.redactor),
        provider: name.to_owned(),
        transform,
    };
    Outcome::Committed(Reply {
        status,
        headers: client_response_headers(upstream_headers),
        body: Body::Stream(Box::pin(relay::relay(relay))),
        wire,
        usage: None,
        ttfb: Some(ttfb),
    })
}

/// A client fault passed on as the provider wrote it.
fn client_fault(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Outcome {
    Outcome::ClientFault(Reply {
        status,
        headers: client_response_headers(headers),
        body: Body::Json(body),
        wire: Wire::Anthropic,
        usage: None,
        ttfb: None,
    })
}

/// The events read before commit: what the client gets first.
struct Prefix {
    /// Their bytes (for a converted stream, the events they were converted to).
    bytes: Bytes,
    /// The splitter, holding any partial event.
    splitter: Splitter,
    /// A `message_stop` or `error` was among them: the stream has ended.
    ended: bool,
}

/// Reads upstream events until `decide` accepts or rejects them.
async fn first_events(
    upstream: &mut Upstream,
    deadlines: &Deadlines,
    mut decide: impl FnMut(&Bytes, &[EventKind]) -> Option<Result<(), Fault>>,
) -> Result<Prefix, Fault> {
    let mut splitter = Splitter::new();
    let mut prefix = BytesMut::new();
    let mut ended = false;
    let deadline = deadlines.first_byte;
    loop {
        match timeout_at(deadline, upstream.next()).await {
            Err(_) => {
                return Err(Fault::new(
                    FaultClass::Timeout,
                    format!(
                        "no event within {} s",
                        (deadline - deadlines.started).as_secs()
                    ),
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
                // An incomplete event counts too: one without an end must not grow unbounded.
                if prefix.len() + events.bytes.len() + splitter.pending().len() > MAX_PREFIX_BYTES {
                    return Err(Fault::new(
                        FaultClass::Other,
                        format!(
                            "more than {} KiB before the first event (pings, comments or an event without an end)",
                            MAX_PREFIX_BYTES / 1024
                        ),
                    ));
                }
                if events.bytes.is_empty() {
                    continue;
                }
                prefix.extend_from_slice(&events.bytes);
                // Keep-alives decide nothing: only events with content are looked at, so a flood
                // of pings costs what reading them costs, not a re-scan of all before them.
                if events.kinds.iter().all(|k| k.is_keepalive()) {
                    continue;
                }
                ended |= events
                    .kinds
                    .iter()
                    .any(|k| matches!(k, EventKind::MessageStop | EventKind::Error));
                let all = prefix.clone().freeze();
                match decide(&all, &events.kinds) {
                    None => continue,
                    Some(Ok(())) => {
                        return Ok(Prefix {
                            bytes: prefix.freeze(),
                            splitter,
                            ended,
                        });
                    }
                    Some(Err(f)) => return Err(f),
                }
            }
        }
    }
}

/// The deadlines of a `/v1/messages` attempt.
fn message_deadlines(runtime: &Runtime, stream: bool) -> Deadlines {
    let settings = &runtime.config.settings;
    if stream {
        Deadlines::new(settings.timeouts.streaming, None)
    } else {
        Deadlines::new(settings.timeouts.non_streaming, Some(settings.timeout))
    }
}

/// The request body for an anthropic-type provider: the client's bytes with the model replaced
/// and the `provider` member removed, after removing thinking this gateway signed (history from an
/// OpenAI-compatible route may hold some).
fn passthrough_body(inbound: &Inbound, candidate: &Candidate) -> Bytes {
    let source = inbound
        .envelope
        .gateway_signed
        .then(|| strip_gateway_thinking(&inbound.body))
        .flatten()
        .unwrap_or_else(|| inbound.body.clone());
    body::rewrite(
        &source,
        &candidate.upstream_model,
        &inbound.envelope.model,
        inbound.envelope.provider.is_some(),
    )
}

/// The Anthropic request body for an anthropic-type provider: for a Chat Completions request its
/// converted form (made now, once), or why it has none (the candidate is then skipped).
fn anthropic_body<'a>(
    inbound: &'a Inbound,
    candidate: &Candidate,
) -> Result<Bytes, &'a crate::adapter::chat::Refusal> {
    let Front::Chat(chat) = &inbound.front else {
        return Ok(passthrough_body(inbound, candidate));
    };
    match chat.converted() {
        Ok(c) => Ok(body::rewrite(
            &c.body,
            &candidate.upstream_model,
            &inbound.envelope.model,
            false,
        )),
        Err(r) => Err(r),
    }
}

async fn anthropic(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    auth: &Auth,
) -> Outcome {
    let faults = &runtime.faults;
    let provider = &candidate.provider;
    let name = provider.config.name.as_str();
    let stream = inbound.envelope.stream;
    let deadlines = message_deadlines(runtime, stream);
    let body = match anthropic_body(inbound, candidate) {
        Ok(b) => b,
        Err(r) => return Outcome::Unsupported(r.message.clone(), r.param.clone()),
    };
    let headers = anthropic_request_headers(&inbound.headers, auth);
    let mut resp = match send(
        provider.post_messages(inbound.query.as_deref(), headers, body),
        &deadlines,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    let status = resp.status;
    if !status.is_success() {
        return match error_status(resp, faults, &deadlines, runtime, inbound).await {
            Err(f) => Outcome::Fault(f),
            Ok((status, headers, body)) => {
                // A relay's context overflow in other words: the wording Claude Code compacts on.
                let estimate = inbound.needs().input_tokens();
                match (status == StatusCode::BAD_REQUEST)
                    .then(|| crate::adapter::anthropic::context_overflow(&body, estimate))
                    .flatten()
                {
                    Some(e) => Outcome::ClientFault(Reply {
                        status,
                        headers: client_response_headers(&headers),
                        body: Body::Error(e),
                        wire: Wire::Anthropic,
                        usage: None,
                        ttfb: None,
                    }),
                    None => client_fault(status, &headers, body),
                }
            }
        };
    }
    let upstream_headers = std::mem::take(&mut resp.headers);
    if !stream {
        let body = match read_answer(resp, &deadlines, faults).await {
            Ok(b) => b,
            Err(f) => return Outcome::Fault(f),
        };
        if is_error_body(&body) {
            return Outcome::Fault(error_payload_fault(&String::from_utf8_lossy(&body)));
        }
        if !crate::inbound::canonical::is_json(&body) {
            return Outcome::Fault(Fault::new(FaultClass::Other, "answer is not JSON"));
        }
        return commit_json(&deadlines, status, &upstream_headers, body, true);
    }

    // Streaming: commit on the first complete event that is not a ping.
    let mut upstream: Upstream = resp.into_stream();
    let decided = first_events(&mut upstream, &deadlines, |all, kinds| {
        match kinds.iter().find(|k| !k.is_keepalive()) {
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
                Some(faults.body_fault(all).map_or(Ok(()), Err))
            }
        }
    })
    .await;
    let prefix = match decided {
        Ok(x) => x,
        Err(f) => return Outcome::Fault(f),
    };
    commit_stream(
        state,
        runtime,
        &deadlines,
        status,
        &upstream_headers,
        name,
        prefix,
        upstream,
        Transform::Passthrough,
    )
}

/// The class of an error a Chat Completions answer carries inside a 200.
fn chunk_error_class(kind: &str) -> FaultClass {
    if kind == "overloaded_error" {
        FaultClass::Overloaded
    } else {
        FaultClass::Other
    }
}

/// A non-2xx answer of an openai-type provider: a provider fault, or the client's error mapped as
/// Anthropic errors are (context overflow in the words agents act on, the provider's refusal of
/// the balancer's key never a 401), rendered by the client's front end.
async fn openai_error(
    resp: UpstreamResponse,
    deadlines: &Deadlines,
    runtime: &Runtime,
    inbound: &Inbound,
    name: &str,
    estimate: u64,
) -> Outcome {
    match error_status(resp, &runtime.faults, deadlines, runtime, inbound).await {
        Err(f) => Outcome::Fault(f),
        Ok((status, headers, body)) => {
            let error = openai::errors::to_anthropic(status.as_u16(), &body, name, estimate);
            Outcome::ClientFault(Reply {
                status: error.status,
                headers: client_response_headers(&headers),
                body: Body::Error(error),
                wire: Wire::Anthropic,
                usage: None,
                ttfb: None,
            })
        }
    }
}

/// The commit decision on the first Chat Completions chunks: none yet, the first one that parses
/// (an error in it, or `[DONE]` before any content, is a provider fault).
fn decide_chunks(faults: &FaultPolicy, all: &Bytes) -> Option<Result<(), Fault>> {
    let payloads = data_payloads(all);
    let first = payloads.iter().find(|d| {
        d.trim() == "[DONE]" || serde_json::from_str::<serde::de::IgnoredAny>(d).is_ok()
    })?;
    if first.trim() == "[DONE]" {
        return Some(Err(Fault::new(
            FaultClass::Other,
            "stream ended before any content",
        )));
    }
    let chunk: serde_json::Value = serde_json::from_str(first).unwrap_or_default();
    if let Some((kind, message)) = chunk_error(&chunk) {
        return Some(Err(Fault::new(
            chunk_error_class(kind),
            format!("error before the first event: {message}"),
        )));
    }
    Some(faults.body_fault(all).map_or(Ok(()), Err))
}

/// The request headers for an openai-type provider.
fn openai_headers(inbound: &Inbound, auth: &Auth, stream: bool) -> HeaderMap {
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
    apply_auth(&mut headers, &inbound.headers, auth, AuthStyle::Openai);
    headers
}

/// The OpenAI API a request speaks natively to an openai-type provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Native {
    /// Chat Completions (`/chat/completions`); asking the provider for the stream's usage when
    /// the client did not.
    Chat { add_usage: bool },
    /// Responses (`/responses`), for a provider configured with `responses: true`.
    Responses,
}

/// The commit decision on the first Responses events: the first one that parses (an `error` or
/// `response.failed` event is a provider fault).
fn decide_responses(faults: &FaultPolicy, all: &Bytes) -> Option<Result<(), Fault>> {
    let payloads = data_payloads(all);
    let first = payloads
        .iter()
        .find_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())?;
    match first.get("type").and_then(serde_json::Value::as_str) {
        Some("error" | "response.failed") => {
            let message = first
                .pointer("/response/error/message")
                .or_else(|| first.get("message"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("an error event")
                .to_owned();
            Some(Err(Fault::new(
                FaultClass::Other,
                format!("error before the first event: {message}"),
            )))
        }
        _ => Some(faults.body_fault(all).map_or(Ok(()), Err)),
    }
}

/// A Chat Completions body with `"stream_options":{"include_usage":true}` added as its last
/// member (the body is a JSON object, checked when it was read).
fn with_usage_asked(body: &Bytes) -> Bytes {
    let Some(end) = body.iter().rposition(|b| *b == b'}') else {
        return body.clone();
    };
    let mut out = BytesMut::with_capacity(body.len() + 48);
    out.extend_from_slice(&body[..end]);
    out.extend_from_slice(b",\"stream_options\":{\"include_usage\":true}");
    out.extend_from_slice(&body[end..]);
    out.freeze()
}

/// A request to an openai-type provider in its own API (the fast path: Chat Completions, or
/// Responses to a provider that speaks it): the client's own body with only the model replaced,
/// the answer relayed as the provider wrote it, under the same commit and failover rules as every
/// attempt. An error the client would get is mapped as the converting path maps it (context
/// overflow in the words agents act on, the provider's refusal of the balancer's key never a
/// 401).
async fn native(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    api: Native,
    original: &Bytes,
    auth: &Auth,
) -> Outcome {
    let faults = &runtime.faults;
    let name = candidate.provider.config.name.as_str();
    let stream = inbound.envelope.stream;
    let deadlines = message_deadlines(runtime, stream);
    // Reasoning this gateway carried for an Anthropic-native provider means nothing to one that
    // speaks the Responses API itself.
    let stripped = (api == Native::Responses)
        .then(|| crate::adapter::responses::strip_gateway_reasoning(original))
        .flatten();
    let body = body::rewrite(
        stripped.as_ref().unwrap_or(original),
        &candidate.upstream_model,
        &inbound.envelope.model,
        inbound.envelope.provider.is_some(),
    );
    let body = match api {
        Native::Chat { add_usage: true } => with_usage_asked(&body),
        _ => body,
    };
    let headers = openai_headers(inbound, auth, stream);
    let provider = &candidate.provider;
    let request = async {
        match api {
            Native::Chat { .. } => provider.post_messages(None, headers, body).await,
            Native::Responses => provider.post_responses(headers, body).await,
        }
    };
    let mut resp = match send(request, &deadlines).await {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    if !resp.status.is_success() {
        let estimate = inbound.body.len() as u64 / 4;
        return openai_error(resp, &deadlines, runtime, inbound, name, estimate).await;
    }
    let upstream_headers = std::mem::take(&mut resp.headers);
    if !stream {
        let body = match read_answer(resp, &deadlines, faults).await {
            Ok(b) => b,
            Err(f) => return Outcome::Fault(f),
        };
        // One reading of the answer: its error, its content and its usage.
        #[derive(serde::Deserialize)]
        struct Head {
            error: Option<serde_json::Value>,
            choices: Option<serde::de::IgnoredAny>,
            output: Option<serde::de::IgnoredAny>,
            usage: Option<serde_json::Value>,
        }
        let reported = match serde_json::from_slice::<Head>(&body) {
            Err(e) => {
                return Outcome::Fault(Fault::new(
                    FaultClass::Other,
                    format!("answer is not JSON: {e}"),
                ));
            }
            Ok(Head { error: Some(e), .. }) if !e.is_null() => {
                let v = serde_json::json!({ "error": e });
                let (kind, message) = chunk_error(&v).unwrap_or(("api_error", e.to_string()));
                return Outcome::Fault(Fault::new(
                    chunk_error_class(kind),
                    format!("error inside a 200: {message}"),
                ));
            }
            Ok(Head { choices: None, .. }) if matches!(api, Native::Chat { .. }) => {
                return Outcome::Fault(Fault::new(FaultClass::Other, "answer has no choices"));
            }
            Ok(Head { output: None, .. }) if api == Native::Responses => {
                return Outcome::Fault(Fault::new(FaultClass::Other, "answer has no output"));
            }
            Ok(head) => head.usage.unwrap_or_default(),
        };
        let mut usage = Usage::default();
        let wire = match api {
            Native::Chat { .. } => {
                usage.merge_chat(&reported);
                Wire::Chat
            }
            Native::Responses => {
                usage.merge_responses(&reported);
                Wire::Responses
            }
        };
        return Outcome::Committed(Reply {
            status: StatusCode::OK,
            headers: client_response_headers(&upstream_headers),
            usage: Some(usage),
            body: Body::Json(body),
            wire,
            ttfb: Some(deadlines.started.elapsed()),
        });
    }
    let mut upstream: Upstream = resp.into_stream();
    let decided = first_events(&mut upstream, &deadlines, |all, _| match api {
        Native::Chat { .. } => decide_chunks(faults, all),
        Native::Responses => decide_responses(faults, all),
    })
    .await;
    let prefix = match decided {
        Ok(p) => p,
        Err(f) => return Outcome::Fault(f),
    };
    let mut relay = match api {
        Native::Chat { .. } => relay::NativeRelay::chat(),
        Native::Responses => relay::NativeRelay::responses(),
    };
    let prefix = Prefix {
        ended: relay.observe(&prefix.bytes),
        ..prefix
    };
    commit_stream(
        state,
        runtime,
        &deadlines,
        StatusCode::OK,
        &upstream_headers,
        name,
        prefix,
        upstream,
        Transform::Native(relay),
    )
}

async fn openai(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    auth: &Auth,
) -> Outcome {
    let faults = &runtime.faults;
    let provider = &candidate.provider;
    let name = provider.config.name.as_str();
    let stream = inbound.envelope.stream;
    let Some((request_value, estimate)) = inbound.parsed() else {
        return Outcome::Fault(Fault::new(
            FaultClass::Other,
            "request body could not be parsed for conversion",
        ));
    };
    // The output asked for, clamped to the provider's cap and the model's `max_output_tokens`.
    let max_tokens_cap = crate::routing::fit::with_output_cap(
        runtime.routes.capabilities_of(candidate),
        provider.config.max_tokens_cap,
    )
    .max_output_tokens;
    let opts = Options {
        dialect: provider.config.dialect,
        max_tokens_cap,
        sanitize_schemas: provider.config.sanitize_schemas,
    };
    let converted =
        match openai::request::convert(request_value, &candidate.upstream_model, stream, &opts) {
            Ok(v) => v,
            Err(u) => return Outcome::Unsupported(u.to_string(), None),
        };
    if tracing::enabled!(tracing::Level::DEBUG) {
        let betas: Vec<&str> = inbound
            .headers
            .get_all("anthropic-beta")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let adjusted = openai::hygiene::review(request_value, &betas);
        if !adjusted.is_empty() {
            tracing::debug!(provider = %name, adjusted = %adjusted.join("; "), "request adjusted for an OpenAI-compatible provider");
        }
    }
    let ctx = ReplyContext::from_request(request_value, estimate);
    let deadlines = message_deadlines(runtime, stream);
    let headers = openai_headers(inbound, auth, stream);
    let body = serde_json::to_vec(&converted).unwrap_or_default();
    let mut resp = match send(
        provider.post_messages(None, headers, Bytes::from(body)),
        &deadlines,
    )
    .await
    {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    if !resp.status.is_success() {
        return openai_error(resp, &deadlines, runtime, inbound, name, estimate).await;
    }
    // The provider's request-id names a Chat Completions request, not an Anthropic message.
    let mut upstream_headers = std::mem::take(&mut resp.headers);
    upstream_headers.remove("request-id");
    if !stream {
        let body = match read_answer(resp, &deadlines, faults).await {
            Ok(b) => b,
            Err(f) => return Outcome::Fault(f),
        };
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
            return Outcome::Fault(Fault::new(
                chunk_error_class(kind),
                format!("error inside a 200: {message}"),
            ));
        }
        let Some(message) = openai::response::to_message(&answer, &ctx) else {
            return Outcome::Fault(Fault::new(FaultClass::Other, "answer has no choices"));
        };
        return commit_json(
            &deadlines,
            StatusCode::OK,
            &upstream_headers,
            Bytes::from(message.to_string()),
            true,
        );
    }

    // Streaming: commit on the first chunk that parses and is not an error.
    let mut upstream: Upstream = resp.into_stream();
    let decided = first_events(&mut upstream, &deadlines, |all, _| {
        decide_chunks(faults, all)
    })
    .await;
    let prefix = match decided {
        Ok(x) => x,
        Err(f) => return Outcome::Fault(f),
    };
    let mut converter = StreamState::new(ctx);
    converter.start();
    for data in data_payloads(&prefix.bytes) {
        if converter.push_data(&data) != Step::Continue {
            break;
        }
    }
    let converted = Prefix {
        bytes: Bytes::from(converter.take()),
        // The chunks read before commit may hold the whole answer.
        ended: converter.is_finished(),
        splitter: prefix.splitter,
    };
    commit_stream(
        state,
        runtime,
        &deadlines,
        StatusCode::OK,
        &upstream_headers,
        name,
        converted,
        upstream,
        Transform::Openai(Box::new(converter)),
    )
}

/// `count_tokens` on an anthropic-type provider. Only a positive count is an answer (a 0 would
/// stop Claude Code from compacting); anything else is a fault of this provider's count_tokens
/// (kept in its own book) and the loop moves on, in the end to the local count.
async fn count_tokens(
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    auth: &Auth,
) -> Outcome {
    let provider = &candidate.provider;
    let deadlines = Deadlines::single(runtime.config.settings.token_counting.timeout);
    let body = passthrough_body(inbound, candidate);
    let headers = anthropic_request_headers(&inbound.headers, auth);
    let request = provider.post_count_tokens(inbound.query.as_deref(), headers, body);
    let mut resp = match send(request, &deadlines).await {
        Ok(r) => r,
        Err(f) => return Outcome::Fault(f),
    };
    if !resp.status.is_success() {
        return match error_status(resp, &runtime.count_faults, &deadlines, runtime, inbound).await {
            Err(f) => Outcome::Fault(f),
            Ok((status, headers, body)) => client_fault(status, &headers, body),
        };
    }
    let upstream_headers = std::mem::take(&mut resp.headers);
    let body = match read_whole(resp, &deadlines, MAX_COUNT_BODY).await {
        Ok(b) => b,
        Err(f) => return Outcome::Fault(f),
    };
    #[derive(serde::Deserialize)]
    struct Count {
        input_tokens: u64,
    }
    match serde_json::from_slice::<Count>(&body) {
        Ok(c) if c.input_tokens > 0 => {
            commit_json(&deadlines, StatusCode::OK, &upstream_headers, body, false)
        }
        _ => Outcome::Fault(Fault::new(
            FaultClass::Other,
            "count_tokens answered without a positive input_tokens",
        )),
    }
}
