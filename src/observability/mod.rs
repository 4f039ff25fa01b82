//! Logs and metrics: one record per request, filled as it flows, written as one summary log line
//! and into the Prometheus metrics when its response body ends.

pub mod logging;
pub mod metrics;
pub mod recent;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use bytes::Bytes;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;

use crate::dispatch::{Answer, Attempt, CacheStatus, Endpoint, Usage};
use crate::state::AppState;

/// Everything the summary line says about one request: opened when its body has been read, filled
/// from its typed [`Answer`], finished when the response body ends or the client leaves.
#[derive(Debug)]
pub struct Record {
    pub id: String,
    pub endpoint: Endpoint,
    /// The API the request came in by (`Front::as_str`).
    pub front: &'static str,
    pub session: Option<String>,
    pub model: String,
    pub stream: bool,
    pub started: Instant,
    pub route: Option<Arc<str>>,
    pub attempts: Vec<Attempt>,
    /// When the response head was ready (the balancer's time to first byte).
    pub headers_at: Option<Instant>,
    pub cache: CacheStatus,
    pub status: u16,
    pub usage: Usage,
    /// The provider that served the request.
    pub provider: Option<String>,
    /// The model name the provider was asked for.
    pub upstream_model: Option<String>,
    /// The named client that sent it (its name: never its key).
    pub client: Option<Arc<str>>,
    /// The client whose limits are charged what the request used (a named client's admitted
    /// request).
    pub charge_to: Option<Arc<crate::clients::Client>>,
    /// The place among its client's concurrent requests, held until the record is finished.
    pub admission: Option<crate::clients::Admission>,
    /// The answer is an event stream (usage is read from its events as they pass).
    answer_is_stream: bool,
    /// In which wire format the answer's usage is written.
    wire: crate::dispatch::Wire,
}

impl Record {
    pub fn new(
        id: String,
        endpoint: Endpoint,
        session: Option<String>,
        model: String,
        stream: bool,
    ) -> Self {
        Self {
            id,
            endpoint,
            front: "anthropic",
            session,
            model,
            stream,
            started: Instant::now(),
            route: None,
            attempts: Vec::new(),
            headers_at: None,
            cache: CacheStatus::Off,
            status: 0,
            usage: Usage::default(),
            provider: None,
            upstream_model: None,
            client: None,
            charge_to: None,
            admission: None,
            answer_is_stream: false,
            wire: crate::dispatch::Wire::Anthropic,
        }
    }

    /// Takes the facts of an answer (its attempts move into the record).
    pub fn fill(&mut self, answer: &mut Answer) {
        self.status = answer.status().as_u16();
        self.headers_at = Some(Instant::now());
        self.route = answer.route.clone();
        self.attempts = std::mem::take(&mut answer.attempts);
        self.cache = answer.cache;
        self.provider = answer.source.provider().map(str::to_owned);
        if let crate::dispatch::Source::Provider { upstream_model, .. } = &answer.source {
            self.upstream_model = Some(upstream_model.clone());
        }
        self.answer_is_stream = answer.is_stream();
        self.wire = answer.wire;
        if let Some(u) = answer.usage {
            self.usage = u;
        }
    }

    /// The balancer's own time so far: elapsed minus the time its attempts spent waiting on
    /// providers.
    pub fn overhead(&self) -> Duration {
        let until = self.headers_at.unwrap_or_else(Instant::now);
        let upstream_wait: Duration = self.attempts.iter().map(|a| a.took).sum();
        until
            .saturating_duration_since(self.started)
            .saturating_sub(upstream_wait)
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

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1_000_000.0).round() / 1000.0
}

/// Writes the summary line and the metrics of a finished request.
///
/// Attempt reasons arrive masked already: the failover loop masks each one, with every configured
/// secret and the client's credentials, before anything else sees it.
fn finish(state: &AppState, r: &Record) {
    let now = Instant::now();
    charge(state, r, now);
    let total = now.saturating_duration_since(r.started);
    let ttfb = r.headers_at.map(|t| t.saturating_duration_since(r.started));
    let overhead = r.overhead();
    state.metrics.finish(r, total, ttfb, overhead);
    if r.endpoint == Endpoint::Messages {
        state.recent.record(r, ttfb, total);
    }
    let attempts = serde_json::to_string(&r.attempts).unwrap_or_default();
    logging::request_line(&logging::RequestLine {
        request_id: &r.id,
        endpoint: r.endpoint.as_str(),
        front: r.front,
        session_id: r.session.as_deref().unwrap_or(""),
        client: r.client.as_deref().unwrap_or(""),
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
        cache: r.cache.as_str(),
    });
}

/// Charges a named client what its request used: the usage the provider reported (for a stream,
/// what passed before it ended or the client left), priced by the upstream model. Answers that
/// made no provider call (cache hits, coalesced duplicates, refusals) cost nothing.
fn charge(state: &AppState, r: &Record, now: Instant) {
    if r.endpoint != Endpoint::Messages || !matches!(r.cache, CacheStatus::Off | CacheStatus::Miss)
    {
        return;
    }
    let (Some(provider), Some(model), Some(route)) = (&r.provider, &r.upstream_model, &r.route)
    else {
        return;
    };
    let u = &r.usage;
    let priced = state.runtime().pricing.cost(model, u);
    if let Some(usage) = &state.usage {
        usage.record(&crate::usage::Charge {
            client: r.client.clone().unwrap_or_else(|| Arc::from("")),
            route: Arc::clone(route),
            provider: provider.clone(),
            model: model.clone(),
            usage: *u,
            cost: priced,
            at: std::time::SystemTime::now(),
        });
    }
    if let Some(client) = &r.charge_to {
        let cost = priced.unwrap_or(0.0);
        state.ledger.charge(client, u.total(), cost, now, now);
        if let Some(cluster) = &state.cluster {
            cluster.charge_client(client, u.total(), cost);
        }
        state.metrics.client_charged(&client.name, u, cost);
    }
}

/// Ends the record when the body is done or dropped, and releases the request's concurrency
/// permit with it.
struct Finisher {
    state: Arc<AppState>,
    record: Record,
    _permit: Option<OwnedSemaphorePermit>,
}

impl Drop for Finisher {
    fn drop(&mut self) {
        finish(&self.state, &self.record);
    }
}

/// Whether JSON text holds a `usage` object (not `"usage":null`, which Chat Completions chunks
/// carry when the client asked for usage).
fn has_usage(text: &[u8]) -> bool {
    memchr::memmem::find_iter(text, b"\"usage\":").any(|at| {
        let rest = &text[at + 8..];
        rest.iter().find(|b| **b != b' ') == Some(&b'{')
    })
}

/// Reads usage from the whole events passing by (Anthropic events, Chat Completions chunks or
/// Responses events).
fn sniff_usage(record: &mut Record, chunk: &[u8]) {
    if !has_usage(chunk) {
        return;
    }
    let text = String::from_utf8_lossy(chunk);
    for (_, data) in crate::upstream::sse::parse_all(&text) {
        if has_usage(data.as_bytes()) {
            match record.wire {
                crate::dispatch::Wire::Anthropic => record.usage.merge_json(data.as_bytes()),
                crate::dispatch::Wire::Chat => record.usage.merge_chat_json(data.as_bytes()),
                crate::dispatch::Wire::Responses => {
                    record.usage.merge_responses_json(data.as_bytes());
                }
            }
        }
    }
}

/// Wraps a response body so that the record is finished, with the usage seen, when the body ends
/// or the client goes away; the concurrency permit is released at the same moment.
pub fn observe(
    state: &Arc<AppState>,
    record: Record,
    permit: Option<OwnedSemaphorePermit>,
    body: Body,
) -> Body {
    let sniff = record.answer_is_stream;
    let finisher = Finisher {
        state: Arc::clone(state),
        record,
        _permit: permit,
    };
    Body::new(Observed {
        inner: body,
        finisher: Some(finisher),
        sniff,
    })
}

/// A response body that reads usage from the events that pass and finishes the record when it
/// ends or is dropped. It keeps the inner body's size, so a complete JSON answer goes out with its
/// `content-length` and nothing is polled after its last byte.
struct Observed {
    inner: Body,
    finisher: Option<Finisher>,
    /// An event stream, whose usage is read as it passes (a JSON answer's is known already).
    sniff: bool,
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
                if let (true, Some(data), Some(f)) =
                    (this.sniff, frame.data_ref(), &mut this.finisher)
                {
                    sniff_usage(&mut f.record, data);
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
