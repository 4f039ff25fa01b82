//! Prometheus metrics (`GET /metrics`, text format), in an explicit registry.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::Record;
use crate::dispatch::{AttemptOutcome, CacheStatus, Endpoint, FaultClass};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub provider: String,
    pub status: String,
    /// The API the request came in by: `anthropic`, `openai_chat` or `openai_responses`.
    pub front: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CountLabels {
    /// The provider that counted, `local`, or `none` (the request was refused).
    pub counted_by: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AttemptLabels {
    pub provider: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub provider: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientTokenLabels {
    /// A configured client's name (never a key, never a free-form value).
    pub client: String,
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClientLabels {
    pub client: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    pub client: String,
    /// `models`, `requests_per_minute`, `concurrent_requests`, `tokens` or `budget_usd`.
    pub limit: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabels {
    pub provider: String,
    pub state: String,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    ]
    .into_iter()
}

fn overhead_buckets() -> impl Iterator<Item = f64> {
    [
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    ]
    .into_iter()
}

pub struct Metrics {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub count_tokens: Family<CountLabels, Counter>,
    pub attempts: Family<AttemptLabels, Counter>,
    pub failovers: Family<ReasonLabels, Counter>,
    pub ttfb: Histogram,
    pub duration: Histogram,
    pub overhead: Histogram,
    pub in_flight: Gauge,
    pub provider_state: Family<StateLabels, Gauge>,
    pub tokens: Family<TokenLabels, Counter>,
    pub cache: Family<ResultLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
    /// 1 while the state backend works (the memory backend always; Redis while it answers).
    pub state_backend_up: Gauge,
    pub client_tokens: Family<ClientTokenLabels, Counter>,
    /// In millionths of a dollar (a counter counts whole numbers).
    pub client_cost: Family<ClientLabels, Counter>,
    pub client_refusals: Family<RefusalLabels, Counter>,
    in_flight_now: AtomicI64,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("claude_balancer");
        let requests = Family::<RequestLabels, Counter>::default();
        let count_tokens = Family::<CountLabels, Counter>::default();
        let attempts = Family::<AttemptLabels, Counter>::default();
        let failovers = Family::<ReasonLabels, Counter>::default();
        let ttfb = Histogram::new(latency_buckets());
        let duration = Histogram::new(latency_buckets());
        let overhead = Histogram::new(overhead_buckets());
        let in_flight = Gauge::default();
        let provider_state = Family::<StateLabels, Gauge>::default();
        let tokens = Family::<TokenLabels, Counter>::default();
        let cache = Family::<ResultLabels, Counter>::default();
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests by route, serving provider and final status",
            requests.clone(),
        );
        registry.register(
            "count_tokens_requests",
            "count_tokens requests by who counted (a provider or local) and final status",
            count_tokens.clone(),
        );
        registry.register(
            "attempts",
            "Attempts by provider and outcome",
            attempts.clone(),
        );
        registry.register(
            "failovers",
            "Attempts that failed over, by reason",
            failovers.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time until the response headers were sent",
            ttfb.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time until the response body ended",
            duration.clone(),
        );
        registry.register(
            "overhead_seconds",
            "Time spent inside the balancer itself (not waiting on providers)",
            overhead.clone(),
        );
        registry.register(
            "requests_in_flight",
            "Requests being served",
            in_flight.clone(),
        );
        registry.register(
            "provider_state",
            "1 for each provider's current state",
            provider_state.clone(),
        );
        registry.register("tokens", "Tokens by provider and kind", tokens.clone());
        registry.register(
            "cache_results",
            "Requests by cache outcome: miss, hit, coalesced",
            cache.clone(),
        );
        registry.register(
            "reloads",
            "Configuration reloads by result",
            reloads.clone(),
        );
        let state_backend_up = Gauge::default();
        registry.register(
            "state_backend_up",
            "1 while the state backend works (memory: always; redis: while it answers)",
            state_backend_up.clone(),
        );
        let client_tokens = Family::<ClientTokenLabels, Counter>::default();
        registry.register(
            "client_tokens",
            "Tokens charged to each named client, by kind",
            client_tokens.clone(),
        );
        let client_cost = Family::<ClientLabels, Counter>::default();
        registry.register(
            "client_cost_microdollars",
            "What each named client's requests cost, in millionths of a US dollar",
            client_cost.clone(),
        );
        let client_refusals = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "client_refusals",
            "Requests of named clients refused, by the limit (or model list) that refused them",
            client_refusals.clone(),
        );
        Self {
            client_tokens,
            client_cost,
            client_refusals,
            registry,
            requests,
            count_tokens,
            attempts,
            failovers,
            ttfb,
            duration,
            overhead,
            in_flight,
            provider_state,
            tokens,
            cache,
            reloads,
            state_backend_up,
            in_flight_now: AtomicI64::new(0),
        }
    }
}

impl Metrics {
    pub fn started(&self) {
        self.in_flight.inc();
        self.in_flight_now.fetch_add(1, Ordering::Relaxed);
    }

    pub fn in_flight_now(&self) -> i64 {
        self.in_flight_now.load(Ordering::Relaxed)
    }

    /// A named client's request refused by `limit`.
    pub fn client_refused(&self, client: &str, limit: &str) {
        self.client_refusals
            .get_or_create(&RefusalLabels {
                client: client.to_owned(),
                limit: limit.to_owned(),
            })
            .inc();
    }

    /// What a named client's request used.
    pub fn client_charged(&self, client: &str, usage: &crate::dispatch::Usage, cost: f64) {
        for (kind, n) in [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_write", usage.cache_creation_input_tokens),
            ("cache_read", usage.cache_read_input_tokens),
        ] {
            if n > 0 {
                self.client_tokens
                    .get_or_create(&ClientTokenLabels {
                        client: client.to_owned(),
                        kind: kind.to_owned(),
                    })
                    .inc_by(n);
            }
        }
        let micro = (cost * 1_000_000.0).round();
        if micro >= 1.0 {
            self.client_cost
                .get_or_create(&ClientLabels {
                    client: client.to_owned(),
                })
                .inc_by(micro as u64);
        }
    }

    pub fn reload(&self, ok: bool) {
        self.reloads
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" }.into(),
            })
            .inc();
    }

    /// Records a finished request.
    pub fn finish(&self, r: &Record, total: Duration, ttfb: Option<Duration>, overhead: Duration) {
        self.in_flight.dec();
        self.in_flight_now.fetch_sub(1, Ordering::Relaxed);
        if r.endpoint == Endpoint::CountTokens {
            // Counted apart: a count is not a model request, and its attempts have their own book.
            self.count_tokens
                .get_or_create(&CountLabels {
                    counted_by: match (&r.provider, r.status) {
                        (Some(p), _) => p.clone(),
                        (None, 200) => "local".into(),
                        (None, _) => "none".into(),
                    },
                    status: r.status.to_string(),
                })
                .inc();
            return;
        }
        let provider = r.provider.clone().unwrap_or_default();
        self.requests
            .get_or_create(&RequestLabels {
                route: r.route.as_deref().unwrap_or_default().to_owned(),
                provider: provider.clone(),
                status: r.status.to_string(),
                front: r.front.to_owned(),
            })
            .inc();
        for a in &r.attempts {
            let outcome = match (a.outcome, a.class) {
                (AttemptOutcome::Fault, Some(c)) => format!("fault_{}", c.as_str()),
                (AttemptOutcome::Committed, _) => "committed".to_owned(),
                (AttemptOutcome::ClientFault, _) => "client_fault".to_owned(),
                (AttemptOutcome::Fault, None) => "fault".to_owned(),
                (AttemptOutcome::Unsupported, _) => "unsupported".to_owned(),
                (AttemptOutcome::Skipped, _) => "skipped".to_owned(),
            };
            self.attempts
                .get_or_create(&AttemptLabels {
                    provider: a.provider.clone(),
                    outcome,
                })
                .inc();
            if a.outcome == AttemptOutcome::Fault {
                self.failovers
                    .get_or_create(&ReasonLabels {
                        reason: a.class.unwrap_or(FaultClass::Other).as_str().into(),
                    })
                    .inc();
            }
        }
        self.duration.observe(total.as_secs_f64());
        if let Some(t) = ttfb {
            self.ttfb.observe(t.as_secs_f64());
        }
        self.overhead.observe(overhead.as_secs_f64());
        let u = &r.usage;
        for (kind, n) in [
            ("input", u.input_tokens),
            ("output", u.output_tokens),
            ("cache_read", u.cache_read_input_tokens),
            ("cache_creation", u.cache_creation_input_tokens),
        ] {
            if n > 0 {
                self.tokens
                    .get_or_create(&TokenLabels {
                        provider: provider.clone(),
                        kind: kind.into(),
                    })
                    .inc_by(n);
            }
        }
        if r.cache != CacheStatus::Off {
            self.cache
                .get_or_create(&ResultLabels {
                    result: r.cache.as_str().into(),
                })
                .inc();
        }
    }

    /// The text exposition, after `update` has set the per-provider state gauges.
    pub fn encode(&self, update: impl FnOnce(&Family<StateLabels, Gauge>)) -> String {
        update(&self.provider_state);
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
