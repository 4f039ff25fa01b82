//! The one failover loop: try the planned candidates in order until one commits.
//!
//! An *attempt* ends in one of three outcomes: **committed** (the provider answered 2xx and, for a
//! stream, its first complete event arrived: the response goes to the client and no other
//! candidate is tried), a **client fault** (a status outside `unhealthy_http_codes`: returned to the
//! client unchanged, no penalty), or a **provider fault** (transport error, timeout, unhealthy
//! status, an error or a matching pattern before commit: counted against the provider, next
//! candidate). When every candidate faults, the client gets one Anthropic-shaped error listing each
//! attempt.

pub mod attempt;
pub mod relay;

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::response::{IntoResponse, Response};
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::{Instant, timeout};

use crate::config::Settings;
use crate::error::ApiError;
use crate::inbound::body::Envelope;
use crate::routing::PlanContext;
use crate::routing::health::Verdict;
use crate::state::AppState;
use crate::upstream::{TransportError, UpstreamResponse, client_response_headers};

/// One inbound `/v1/messages` request, validated.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub envelope: Envelope,
    pub body: Bytes,
    pub headers: HeaderMap,
    /// The query string, forwarded as is (`beta=true`).
    pub query: Option<String>,
    /// `X-Claude-Code-Session-Id`, or the session inside `metadata.user_id`.
    pub session: Option<String>,
    /// The body as a JSON value with a local token estimate, parsed on first use (only conversion
    /// needs it; passthrough never does).
    pub parsed: std::sync::OnceLock<Option<(serde_json::Value, u64)>>,
    /// The log record the dispatcher fills (route, attempts).
    pub record: Option<crate::observability::Record>,
}

impl Inbound {
    pub fn new(
        envelope: Envelope,
        body: Bytes,
        headers: HeaderMap,
        query: Option<String>,
        session: Option<String>,
    ) -> Self {
        Self {
            envelope,
            body,
            headers,
            query,
            session,
            parsed: std::sync::OnceLock::new(),
            record: None,
        }
    }

    /// The parsed body and its token estimate.
    pub fn parsed(&self) -> Option<(&serde_json::Value, u64)> {
        self.parsed
            .get_or_init(|| {
                let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
                let estimate = crate::tokens::estimate_request(&v);
                Some((v, estimate))
            })
            .as_ref()
            .map(|(v, e)| (v, *e))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// 429, 503, 529 or an overloaded/rate-limit error event.
    Overloaded,
    /// 401 or 403: the provider refused the balancer's credentials.
    Credentials,
    Timeout,
    /// Connection, DNS or TLS failure.
    Transport,
    /// Any other unhealthy status, error body or matching pattern.
    Other,
}

impl FaultClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultClass::Overloaded => "overloaded",
            FaultClass::Credentials => "credentials",
            FaultClass::Timeout => "timeout",
            FaultClass::Transport => "transport",
            FaultClass::Other => "other",
        }
    }
}

/// Why an attempt failed over.
#[derive(Debug, Clone)]
pub struct Fault {
    pub class: FaultClass,
    pub reason: String,
    pub retry_after: Option<Duration>,
    /// The provider's status, for an unhealthy status.
    pub status: Option<u16>,
}

impl Fault {
    pub fn new(class: FaultClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
            retry_after: None,
            status: None,
        }
    }
}

pub enum Outcome {
    Committed {
        response: Response,
        ttfb: Duration,
    },
    ClientFault(Response),
    Fault(Fault),
    /// The request cannot be expressed for this provider (e.g. a server tool on an OpenAI-compatible
    /// route): the candidate is skipped without penalty.
    Unsupported(String),
}

pub(crate) fn transport_fault(e: TransportError) -> Fault {
    let class = if e.is_timeout() {
        FaultClass::Timeout
    } else {
        FaultClass::Transport
    };
    Fault::new(class, e.to_string())
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    // Prefer the Anthropic or OpenAI error message over the raw body.
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let err = v.get("error").unwrap_or(&v);
        let kind = err.get("type").and_then(|t| t.as_str());
        let msg = err.get("message").and_then(|m| m.as_str());
        match (kind, msg) {
            (Some(k), Some(m)) => return truncate(&format!("{k}: {m}")),
            (None, Some(m)) => return truncate(m),
            _ => {}
        }
    }
    truncate(text)
}

fn truncate(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_owned();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

pub(crate) fn status_fault(status: u16, body: &[u8], retry: Option<Duration>) -> Fault {
    let class = match status {
        429 | 503 | 529 => FaultClass::Overloaded,
        401 | 403 => FaultClass::Credentials,
        408 | 504 => FaultClass::Timeout,
        _ => FaultClass::Other,
    };
    let detail = snippet(body);
    let reason = if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    };
    Fault {
        class,
        reason,
        retry_after: retry,
        status: Some(status),
    }
}

/// Whether a successful-looking body is really an error (`{"type":"error",…}`) or matches
/// `unhealthy_response_body_patterns`.
pub(crate) fn body_fault(settings: &Settings, body: &[u8]) -> Option<Fault> {
    let text = String::from_utf8_lossy(body);
    if let Some(set) = &settings.unhealthy_response_body_patterns {
        if set.is_match(&text) {
            return Some(Fault::new(
                FaultClass::Other,
                format!(
                    "response matched unhealthy_response_body_patterns: {}",
                    truncate(text.trim())
                ),
            ));
        }
    }
    None
}

/// The class of an error event or `{"type":"error"}` body.
pub(crate) fn error_payload_fault(payload: &str) -> Fault {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    let kind = v
        .pointer("/error/type")
        .and_then(|t| t.as_str())
        .unwrap_or("error");
    let class = match kind {
        "overloaded_error" | "rate_limit_error" => FaultClass::Overloaded,
        "authentication_error" | "permission_error" => FaultClass::Credentials,
        "timeout_error" => FaultClass::Timeout,
        _ => FaultClass::Other,
    };
    Fault::new(
        class,
        format!(
            "error before the first event: {}",
            snippet(payload.as_bytes())
        ),
    )
}

pub(crate) fn provider_header(name: &str) -> HeaderValue {
    HeaderValue::from_bytes(name.as_bytes()).unwrap_or(HeaderValue::from_static("invalid-name"))
}

pub(crate) fn response_with(
    status: u16,
    upstream: &HeaderMap,
    body: Body,
    provider: &str,
) -> Response {
    let mut resp = Response::new(body);
    *resp.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
    *resp.headers_mut() = client_response_headers(upstream);
    resp.headers_mut()
        .insert("x-provider-used", provider_header(provider));
    resp
}

/// Reads a whole body, each gap between chunks bounded by `gap`, at most `limit` bytes.
pub(crate) async fn read_body(
    mut resp: UpstreamResponse,
    gap: Duration,
    limit: usize,
) -> Result<Bytes, Fault> {
    let mut out = BytesMut::new();
    loop {
        match timeout(gap, resp.chunk()).await {
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

/// Serves one `/v1/messages` request: plan, then the failover loop.
pub async fn messages(state: &Arc<AppState>, inbound: Inbound) -> Response {
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    let now = Instant::now();
    let ctx = PlanContext {
        providers: &runtime.providers,
        health: &state.health,
        strategy: settings.selection_strategy,
        now,
    };
    let model = &inbound.envelope.model;
    let Some(mut plan) = runtime.routes.plan(model, &ctx) else {
        return ApiError::not_found(format!("model {model:?} matches no entry of model_routes"))
            .into_response();
    };
    if plan.candidates.is_empty() {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!(
                "route {:?} for model {model:?} has no enabled provider",
                &*plan.route
            ),
        )
        .into_response();
    }
    let sticky = settings.sticky_provider_duration > Duration::ZERO;
    if let (true, Some(session)) = (sticky, &inbound.session) {
        if let Some(p) = state.affinity.get(session, &plan.route, now) {
            if state.health.standing(&p, now).available {
                plan.promote(&p);
            }
        }
    }
    if let Some(forced) = &inbound.envelope.provider {
        plan.promote(forced);
    }

    let mut failures: Vec<(String, Fault)> = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    if let Some(r) = &inbound.record {
        r.lock().route = Some(plan.route.to_string());
    }
    for candidate in &plan.candidates {
        let name = candidate.provider.config.name.clone();
        let ticket = state.health.begin(&name, Instant::now());
        let attempt_started = Instant::now();
        let mut outcome = attempt::attempt(state, &runtime, candidate, &inbound).await;
        if let Outcome::Fault(f) = &mut outcome {
            // Some providers echo the key they refused: it must not reach a log or the client.
            if let crate::config::Auth::ApiKey(k) | crate::config::Auth::Bearer(k) =
                &candidate.provider.config.auth
            {
                f.reason = crate::observability::redact(&f.reason, &[k.expose().to_owned()]);
            }
            let client = crate::observability::client_secrets(&inbound.headers);
            f.reason = crate::observability::redact(&f.reason, &client);
        }
        if let Some(r) = &inbound.record {
            let took = attempt_started.elapsed();
            let (label, class, status, reason) = match &outcome {
                Outcome::Committed { response, .. } => {
                    ("committed", None, Some(response.status().as_u16()), None)
                }
                Outcome::ClientFault(response) => {
                    ("client_fault", None, Some(response.status().as_u16()), None)
                }
                Outcome::Fault(f) => (
                    "fault",
                    Some(f.class.as_str()),
                    f.status,
                    Some(f.reason.clone()),
                ),
                Outcome::Unsupported(reason) => ("unsupported", None, None, Some(reason.clone())),
            };
            let mut r = r.lock();
            r.upstream_wait += took;
            r.attempts.push(crate::observability::AttemptLog {
                provider: name.clone(),
                upstream_model: candidate.upstream_model.clone(),
                outcome: label,
                class,
                status,
                ms: (took.as_secs_f64() * 1_000_000.0).round() / 1000.0,
                reason,
            });
        }
        match outcome {
            Outcome::Committed { response, ttfb } => {
                log_change(
                    &name,
                    state.health.resolve(
                        ticket,
                        Verdict::Up { ttfb: Some(ttfb) },
                        Instant::now(),
                        settings,
                    ),
                );
                if let (true, Some(session)) = (sticky, &inbound.session) {
                    state.affinity.set(
                        session,
                        &plan.route,
                        &name,
                        Instant::now(),
                        settings.sticky_provider_duration,
                    );
                }
                if !failures.is_empty() {
                    tracing::info!(model = %model, provider = %name, failed_over = failures.len(), "request succeeded after failover");
                }
                return response;
            }
            Outcome::ClientFault(response) => {
                log_change(
                    &name,
                    state.health.resolve(
                        ticket,
                        Verdict::Up { ttfb: None },
                        Instant::now(),
                        settings,
                    ),
                );
                return response;
            }
            Outcome::Fault(fault) => {
                tracing::warn!(provider = %name, model = %candidate.upstream_model, reason = %fault.reason, "attempt failed");
                let verdict = Verdict::Fault {
                    reason: fault.reason.clone(),
                    retry_after: fault.retry_after,
                };
                log_change(
                    &name,
                    state
                        .health
                        .resolve(ticket, verdict, Instant::now(), settings),
                );
                failures.push((name, fault));
            }
            Outcome::Unsupported(reason) => {
                drop(ticket);
                tracing::info!(provider = %name, %reason, "candidate cannot serve this request; skipped");
                unsupported.push(format!("{name}: {reason}"));
            }
        }
    }
    if failures.is_empty() && !unsupported.is_empty() {
        return ApiError::invalid_request(format!(
            "no provider of this route can serve the request: {}",
            unsupported.join("; ")
        ))
        .into_response();
    }
    all_failed(state, model, &failures).into_response()
}

fn log_change(
    provider: &str,
    change: Option<(
        crate::routing::health::HealthState,
        crate::routing::health::HealthState,
    )>,
) {
    if let Some((from, to)) = change {
        tracing::warn!(
            provider,
            from = from.as_str(),
            to = to.as_str(),
            "provider state changed"
        );
    }
}

/// The error for a request on which every candidate faulted.
pub fn all_failed(state: &AppState, model: &str, failures: &[(String, Fault)]) -> ApiError {
    let list: Vec<String> = failures
        .iter()
        .map(|(p, f)| format!("{p}: {}", f.reason))
        .collect();
    let n = failures.len();
    let plural = if n == 1 { "" } else { "s" };
    let message = format!(
        "all {n} provider{plural} failed for model {model}: {}",
        list.join("; ")
    );
    let all = |c: FaultClass| failures.iter().all(|(_, f)| f.class == c);
    if all(FaultClass::Overloaded) {
        let now = Instant::now();
        let shortest = failures
            .iter()
            .map(|(p, _)| state.health.standing(p, now).remaining)
            .filter(|d| !d.is_zero())
            .min()
            .unwrap_or(Duration::from_secs(1));
        let secs = shortest.as_secs_f64().ceil().max(1.0) as u64;
        ApiError::new(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            message,
        )
        .with_retry_after(secs)
    } else if all(FaultClass::Timeout) {
        ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message)
    } else {
        // Credential refusals land here too: never a 401, or Claude Code would blame the user's key.
        ApiError::new(StatusCode::BAD_GATEWAY, "api_error", message)
    }
}

/// `{"type":"error",…}` at the top level.
pub(crate) fn is_error_body(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let trimmed = body.trim_ascii_start();
    trimmed.starts_with(b"{")
        && serde_json::from_slice::<Probe<'_>>(trimmed)
            .is_ok_and(|p| p.kind.as_deref() == Some("error"))
}
