//! Logs and metrics: one record per request, filled as it flows, written as one summary log line
//! and into the Prometheus metrics when its response body ends.

pub mod logging;
pub mod metrics;
pub mod recent;

use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use tokio::time::Instant;

use crate::state::AppState;

/// One attempt, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptLog {
    pub provider: String,
    pub upstream_model: String,
    /// `committed`, `client_fault`, `fault`, `unsupported`.
    pub outcome: &'static str,
    /// The fault class for a fault (`overloaded`, `credentials`, `timeout`, `transport`, `other`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    pub ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
}

/// The usage fields of an Anthropic `usage` object (read without building a JSON tree).
#[derive(Debug, Default, serde::Deserialize)]
struct UsageFields {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// A message or an event, as far as usage goes: `usage` at the top or inside `message`.
#[derive(Debug, Default, serde::Deserialize)]
struct WithUsage {
    usage: Option<UsageFields>,
    message: Option<Box<WithUsage>>,
}

impl Usage {
    /// Overwrites the fields present in an Anthropic `usage` object.
    fn merge(&mut self, u: UsageFields) {
        let set = |field: &mut u64, v: Option<u64>| {
            if let Some(n) = v {
                *field = n;
            }
        };
        set(&mut self.input_tokens, u.input_tokens);
        set(&mut self.output_tokens, u.output_tokens);
        set(&mut self.cache_read_input_tokens, u.cache_read_input_tokens);
        set(
            &mut self.cache_creation_input_tokens,
            u.cache_creation_input_tokens,
        );
    }

    /// Merges the usage of a message or event in JSON text, if it has any.
    fn merge_json(&mut self, json: &[u8]) {
        if let Ok(w) = serde_json::from_slice::<WithUsage>(json) {
            for u in [w.message.and_then(|m| m.usage), w.usage]
                .into_iter()
                .flatten()
            {
                self.merge(u);
            }
        }
    }
}

/// Everything the summary line says about one request.
#[derive(Debug)]
pub struct RequestRecord {
    pub id: String,
    pub session: Option<String>,
    pub model: String,
    pub stream: bool,
    pub started: Instant,
    pub route: Option<String>,
    pub attempts: Vec<AttemptLog>,
    /// Time spent waiting on providers before the response was committed.
    pub upstream_wait: Duration,
    /// When the response headers were ready (the balancer's time to first byte).
    pub headers_at: Option<Instant>,
    pub cache: &'static str,
    pub status: u16,
    pub usage: Usage,
    /// The provider that served the request.
    pub provider: Option<String>,
    finished: bool,
}

/// A request record shared by the stages that fill it.
#[derive(Debug, Clone)]
pub struct Record(Arc<Mutex<RequestRecord>>);

impl Record {
    pub fn new(id: String, session: Option<String>, model: String, stream: bool) -> Self {
        Self(Arc::new(Mutex::new(RequestRecord {
            id,
            session,
            model,
            stream,
            started: Instant::now(),
            route: None,
            attempts: Vec::new(),
            upstream_wait: Duration::ZERO,
            headers_at: None,
            cache: "off",
            status: 0,
            usage: Usage::default(),
            provider: None,
            finished: false,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, RequestRecord> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The balancer's own time so far: elapsed minus time spent waiting on providers.
    pub fn overhead(&self) -> Duration {
        let r = self.lock();
        let until = r.headers_at.unwrap_or_else(Instant::now);
        until
            .saturating_duration_since(r.started)
            .saturating_sub(r.upstream_wait)
    }
}

/// A request id: the client's `x-request-id` when it sent a sane one, else a new one.
pub fn request_id(headers: &http::HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("req_{}", &crate::adapter::ids::message_id()[4..]))
}

/// Replaces every secret in `text` with `****`.
pub fn redact(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_owned();
    for s in secrets.iter().filter(|s| s.len() >= 6) {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "****");
        }
    }
    out
}

/// The secrets a log line must never contain: configured keys and the client's credentials.
fn secrets(state: &AppState, client: &[String]) -> Vec<String> {
    let runtime = state.runtime();
    let mut out: Vec<String> = client.to_vec();
    for p in &runtime.config.providers {
        match &p.auth {
            crate::config::Auth::ApiKey(k) | crate::config::Auth::Bearer(k) => {
                out.push(k.expose().to_owned())
            }
            _ => {}
        }
        if let Some(proxy) = &p.proxy {
            out.push(proxy.expose().to_owned());
        }
    }
    let auth = &runtime.config.settings.auth;
    out.extend(
        auth.api_keys
            .iter()
            .chain(&auth.admin_keys)
            .map(|k| k.expose().to_owned()),
    );
    out
}

/// The client's credential values (for redaction).
pub fn client_secrets(headers: &http::HeaderMap) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(k) = headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        out.push(k.to_owned());
    }
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        out.push(a.trim_start_matches("Bearer ").trim().to_owned());
    }
    out
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Writes the summary line and the metrics of a finished request (once).
fn finish(state: &AppState, record: &Record, client: &[String]) {
    let mut r = record.lock();
    if r.finished {
        return;
    }
    r.finished = true;
    let now = Instant::now();
    let total = now.saturating_duration_since(r.started);
    let ttfb = r.headers_at.map(|t| t.saturating_duration_since(r.started));
    let overhead = r
        .headers_at
        .unwrap_or(now)
        .saturating_duration_since(r.started)
        .saturating_sub(r.upstream_wait);
    state.metrics.finish(&r, total, ttfb, overhead);
    state.recent.record(&r, ttfb, total);
    // Only a failure reason can carry a key (a provider echoing it): the list of secrets is built
    // only when there is one to clean.
    let attempts = if r.attempts.iter().any(|a| a.reason.is_some()) {
        let secrets = secrets(state, client);
        let cleaned: Vec<AttemptLog> = r
            .attempts
            .iter()
            .map(|a| AttemptLog {
                reason: a.reason.as_deref().map(|t| redact(t, &secrets)),
                ..a.clone()
            })
            .collect();
        serde_json::to_string(&cleaned)
    } else {
        serde_json::to_string(&r.attempts)
    }
    .unwrap_or_default();
    logging::request_line(&logging::RequestLine {
        request_id: &r.id,
        session_id: r.session.as_deref().unwrap_or(""),
        model: &r.model,
        route: r.route.as_deref().unwrap_or(""),
        provider: r.provider.as_deref().unwrap_or(""),
        attempts: &attempts,
        stream: r.stream,
        status: r.status,
        ttfb_ms: ttfb.map(ms).unwrap_or(-1.0),
        total_ms: ms(total),
        overhead_ms: ms(overhead),
        input_tokens: r.usage.input_tokens,
        output_tokens: r.usage.output_tokens,
        cache_read_input_tokens: r.usage.cache_read_input_tokens,
        cache_creation_input_tokens: r.usage.cache_creation_input_tokens,
        cache: r.cache,
    });
}

/// Ends the record when the body is done or dropped.
struct Finisher {
    state: Arc<AppState>,
    record: Record,
    client: Vec<String>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        finish(&self.state, &self.record, &self.client);
    }
}

/// Reads usage from Anthropic events or a message passing by.
fn sniff_usage(record: &Record, chunk: &[u8], sse: bool) {
    if memchr::memmem::find(chunk, b"\"usage\"").is_none() {
        return;
    }
    let mut r = record.lock();
    if sse {
        let text = String::from_utf8_lossy(chunk);
        for (_, data) in crate::upstream::sse::parse_all(&text) {
            if data.contains("\"usage\"") {
                r.usage.merge_json(data.as_bytes());
            }
        }
    } else {
        r.usage.merge_json(chunk);
    }
}

/// Stamps the response (`x-request-id`, `x-balancer-overhead-ms`) and wraps its body so that the
/// record is finished, with the usage seen, when the body ends or the client goes away.
pub fn observe(
    state: &Arc<AppState>,
    record: Record,
    client: Vec<String>,
    mut response: Response,
) -> Response {
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-balancer-cache")
        .and_then(|v| v.to_str().ok())
        .map(|c| match c {
            "hit" => "hit",
            "coalesced" => "coalesced",
            _ => "miss",
        });
    let provider = response
        .headers()
        .get("x-provider-used")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    {
        let mut r = record.lock();
        r.status = status;
        r.headers_at.get_or_insert_with(Instant::now);
        if let Some(c) = cache {
            r.cache = c;
        }
        if provider.is_some() {
            r.provider = provider;
        }
    }
    let overhead = record.overhead();
    let id = record.lock().id.clone();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&id) {
        headers.insert("x-request-id", v);
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{:.3}", overhead.as_secs_f64() * 1000.0)) {
        headers.insert("x-balancer-overhead-ms", v);
    }
    let sse = headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let (parts, body) = response.into_parts();
    let finisher = Finisher {
        state: Arc::clone(state),
        record,
        client,
    };
    let observed = Observed {
        inner: body,
        finisher: Some(finisher),
        sse,
    };
    Response::from_parts(parts, Body::new(observed))
}

/// A response body that reads usage from what passes and finishes the record when it ends or is
/// dropped. It keeps the inner body's size, so a complete JSON answer goes out with its
/// `content-length` and nothing is polled after its last byte.
struct Observed {
    inner: Body,
    finisher: Option<Finisher>,
    sse: bool,
}

impl hyper::body::Body for Observed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Infallible>>> {
        use std::task::Poll;
        let this = &mut *self;
        match std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(f)) = (frame.data_ref(), &this.finisher) {
                    sniff_usage(&f.record, data, this.sse);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            // End (or a body error, which only our own streams could raise): the record is
            // finished when the finisher drops here.
            Poll::Ready(_) => {
                this.finisher = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}
