//! The health book: per-provider fault counts, cooldowns, probes, counters and latency.
//!
//! It is keyed by provider name and lives outside the configuration, so a reload keeps it.
//! A provider is *healthy*, *cooling down* (skipped, unless every candidate is), or *probing*
//! (its cooldown ran out: the next request may try it once; success heals it, a failure
//! doubles the next cooldown, up to 8 times the configured one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::config::{Settings, TokenCounting};

/// The longest cooldown multiplier after failed probes.
const MAX_BACKOFF: u32 = 8;
/// Weight of the newest sample in the latency moving average.
const EWMA_ALPHA: f64 = 0.3;

/// When faults put a provider into cooldown and when it is forgiven: built once per loaded
/// configuration, for each book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthPolicy {
    /// Consecutive faults that start a cooldown.
    pub threshold: u32,
    /// The first cooldown; a failed probe doubles it, up to [`MAX_BACKOFF`] times.
    pub cooldown: Duration,
    /// A success clears the fault count even when no cooldown is running.
    pub reset_on_success: bool,
    /// A fault count older than this is forgotten.
    pub forget_after: Duration,
}

impl HealthPolicy {
    /// The main book's policy (`unhealthy_threshold`, `failure_cooldown`, `unhealthy_reset_*`).
    pub fn for_messages(s: &Settings) -> Self {
        Self {
            threshold: s.unhealthy_threshold.max(1),
            cooldown: s.failure_cooldown,
            reset_on_success: s.unhealthy_reset_on_success,
            forget_after: s.unhealthy_reset_timeout,
        }
    }

    /// The count_tokens book's policy: `failure_threshold` consecutive failures keep a provider
    /// from being asked for `api_failure_cooldown`; a success forgives everything.
    pub fn for_count_tokens(t: &TokenCounting) -> Self {
        Self {
            threshold: t.failure_threshold.max(1),
            cooldown: t.api_failure_cooldown,
            reset_on_success: true,
            forget_after: Duration::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    CoolingDown,
    Probing,
}

impl HealthState {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::CoolingDown => "cooling_down",
            HealthState::Probing => "probing",
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Entry {
    consecutive_faults: u32,
    last_fault_at: Option<Instant>,
    /// Set while the provider is marked unhealthy; cleared by a success.
    cooldown_until: Option<Instant>,
    backoff: u32,
    probe_in_flight: bool,
    last_error: Option<(String, SystemTime)>,
    requests: u64,
    successes: u64,
    failures: u64,
    ttfb_ewma_ms: Option<f64>,
}

impl Entry {
    fn state(&self, now: Instant) -> HealthState {
        match self.cooldown_until {
            None => HealthState::Healthy,
            Some(until) if until > now => HealthState::CoolingDown,
            Some(_) => HealthState::Probing,
        }
    }
}

/// What the ordering code needs to know about one provider right now.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    /// May be tried first: healthy, or probing with no probe under way.
    pub available: bool,
    /// Time until the cooldown ends (zero when not cooling down).
    pub remaining: Duration,
    pub ttfb_ewma_ms: Option<f64>,
}

/// A snapshot for `GET /providers`.
#[derive(Debug, Clone)]
pub struct HealthReport {
    pub state: HealthState,
    pub consecutive_faults: u32,
    pub cooldown_remaining: Duration,
    pub last_error: Option<(String, SystemTime)>,
    pub requests: u64,
    pub successes: u64,
    pub failures: u64,
    pub ttfb_ewma_ms: Option<f64>,
}

/// What the dispatcher reports after an attempt.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// The provider answered (a success, or a client fault that proves it is up).
    Up { ttfb: Option<Duration> },
    /// A provider fault; `retry_after` is the provider's own hint (429/529).
    Fault {
        reason: String,
        retry_after: Option<Duration>,
    },
}

#[derive(Debug, Default)]
pub struct HealthBook {
    entries: Mutex<HashMap<String, Entry>>,
}

impl HealthBook {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned lock only means another thread panicked mid-update; the counters are still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn standing(&self, provider: &str, now: Instant) -> Standing {
        let map = self.lock();
        let Some(e) = map.get(provider) else {
            return Standing {
                available: true,
                remaining: Duration::ZERO,
                ttfb_ewma_ms: None,
            };
        };
        let state = e.state(now);
        Standing {
            available: state == HealthState::Healthy
                || (state == HealthState::Probing && !e.probe_in_flight),
            remaining: e
                .cooldown_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now)),
            ttfb_ewma_ms: e.ttfb_ewma_ms,
        }
    }

    /// Called when an attempt starts. Returns a ticket that must be resolved with [`HealthBook::resolve`];
    /// a ticket dropped unresolved (the client went away) frees the probe slot.
    pub fn begin(self: &Arc<Self>, provider: &str, now: Instant) -> AttemptTicket {
        let mut map = self.lock();
        let e = map.entry(provider.to_owned()).or_default();
        e.requests += 1;
        let probe = e.state(now) == HealthState::Probing && !e.probe_in_flight;
        if probe {
            e.probe_in_flight = true;
        }
        AttemptTicket {
            book: Arc::clone(self),
            provider: provider.to_owned(),
            probe,
            resolved: false,
        }
    }

    /// Ends an attempt: frees its probe slot and records the verdict.
    /// Returns the state change, if any, for logging.
    pub fn resolve(
        &self,
        mut ticket: AttemptTicket,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        ticket.resolved = true;
        if ticket.probe {
            let mut map = self.lock();
            if let Some(e) = map.get_mut(&ticket.provider) {
                e.probe_in_flight = false;
            }
        }
        self.record(&ticket.provider, verdict, now, policy)
    }

    /// Records a verdict outside an attempt, e.g. a stream that broke after it was committed.
    pub fn record(
        &self,
        provider: &str,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        let mut map = self.lock();
        let e = map.entry(provider.to_owned()).or_default();
        let before = e.state(now);
        match verdict {
            Verdict::Up { ttfb } => {
                e.successes += 1;
                if policy.reset_on_success || e.cooldown_until.is_some() {
                    e.consecutive_faults = 0;
                }
                e.cooldown_until = None;
                e.backoff = 1;
                if let Some(t) = ttfb {
                    let ms = t.as_secs_f64() * 1000.0;
                    e.ttfb_ewma_ms = Some(match e.ttfb_ewma_ms {
                        Some(prev) => prev + EWMA_ALPHA * (ms - prev),
                        None => ms,
                    });
                }
            }
            Verdict::Fault {
                reason,
                retry_after,
            } => {
                e.failures += 1;
                e.last_error = Some((reason, SystemTime::now()));
                if e.last_fault_at
                    .is_some_and(|t| now.saturating_duration_since(t) > policy.forget_after)
                {
                    e.consecutive_faults = 0;
                }
                e.consecutive_faults = e.consecutive_faults.saturating_add(1);
                e.last_fault_at = Some(now);
                let was_marked = e.cooldown_until.is_some();
                if e.backoff == 0 {
                    e.backoff = 1;
                }
                if was_marked && before != HealthState::CoolingDown {
                    // A failed probe (or a failure while waiting for one): back off further.
                    e.backoff = (e.backoff * 2).min(MAX_BACKOFF);
                    e.cooldown_until =
                        Some(now + retry_after.unwrap_or(policy.cooldown * e.backoff));
                } else if retry_after.is_some() || e.consecutive_faults >= policy.threshold {
                    let base = policy.cooldown * e.backoff;
                    let until = now + retry_after.unwrap_or(base);
                    // Never shorten a cooldown that is already running.
                    e.cooldown_until = Some(e.cooldown_until.map_or(until, |u| u.max(until)));
                }
            }
        }
        let after = e.state(now);
        (before != after).then_some((before, after))
    }

    pub fn report(&self, provider: &str, now: Instant) -> HealthReport {
        let map = self.lock();
        let e = map.get(provider).cloned().unwrap_or_default();
        HealthReport {
            state: e.state(now),
            consecutive_faults: e.consecutive_faults,
            cooldown_remaining: e
                .cooldown_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now)),
            last_error: e.last_error,
            requests: e.requests,
            successes: e.successes,
            failures: e.failures,
            ttfb_ewma_ms: e.ttfb_ewma_ms,
        }
    }
}

/// One attempt in progress against one provider.
#[derive(Debug)]
pub struct AttemptTicket {
    book: Arc<HealthBook>,
    provider: String,
    probe: bool,
    resolved: bool,
}

impl AttemptTicket {
    pub fn is_probe(&self) -> bool {
        self.probe
    }
}

impl Drop for AttemptTicket {
    fn drop(&mut self) {
        if !self.resolved && self.probe {
            let mut map = self.book.lock();
            if let Some(e) = map.get_mut(&self.provider) {
                e.probe_in_flight = false;
            }
        }
    }
}
