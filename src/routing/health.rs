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
        // One lock for freeing the probe slot and recording the verdict: between the two, another
        // request would see a probing provider with no probe under way and start a second one.
        let mut map = self.lock();
        if ticket.probe {
            if let Some(e) = map.get_mut(&ticket.provider) {
                e.probe_in_flight = false;
            }
        }
        Self::record_in(&mut map, &ticket.provider, verdict, now, policy)
    }

    /// Records a verdict outside an attempt, e.g. a stream that broke after it was committed.
    pub fn record(
        &self,
        provider: &str,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        Self::record_in(&mut self.lock(), provider, verdict, now, policy)
    }

    fn record_in(
        map: &mut HashMap<String, Entry>,
        provider: &str,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use tokio::time::advance;

    const P: &str = "p";

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    /// Threshold as given, a 10 s cooldown, reset on success, faults forgotten after 300 s.
    fn policy(threshold: u32) -> HealthPolicy {
        HealthPolicy {
            threshold,
            cooldown: secs(10),
            reset_on_success: true,
            forget_after: secs(300),
        }
    }

    fn fault() -> Verdict {
        Verdict::Fault {
            reason: "boom".into(),
            retry_after: None,
        }
    }

    fn fault_retry_after(d: Duration) -> Verdict {
        Verdict::Fault {
            reason: "busy".into(),
            retry_after: Some(d),
        }
    }

    fn up() -> Verdict {
        Verdict::Up { ttfb: None }
    }

    fn record(
        book: &HealthBook,
        verdict: Verdict,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        book.record(P, verdict, Instant::now(), policy)
    }

    fn report(book: &HealthBook) -> HealthReport {
        book.report(P, Instant::now())
    }

    fn standing(book: &HealthBook) -> Standing {
        book.standing(P, Instant::now())
    }

    /// Records `threshold` faults: the provider starts its first cooldown.
    fn trip(book: &HealthBook, policy: &HealthPolicy) {
        for _ in 0..policy.threshold {
            record(book, fault(), policy);
        }
        assert_eq!(report(book).state, HealthState::CoolingDown);
    }

    /// Starts the probe (asserting it is one) and resolves it with `verdict`.
    fn probe(
        book: &Arc<HealthBook>,
        verdict: Verdict,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        let ticket = book.begin(P, Instant::now());
        assert!(ticket.is_probe());
        book.resolve(ticket, verdict, Instant::now(), policy)
    }

    #[tokio::test(start_paused = true)]
    async fn faults_below_the_threshold_keep_the_provider_healthy_and_the_nth_starts_the_cooldown()
    {
        let book = HealthBook::new();
        let policy = policy(3);
        for n in 1..3 {
            assert_eq!(record(&book, fault(), &policy), None);
            let r = report(&book);
            assert_eq!(r.state, HealthState::Healthy);
            assert_eq!(r.consecutive_faults, n);
            assert!(standing(&book).available);
        }
        assert_eq!(
            record(&book, fault(), &policy),
            Some((HealthState::Healthy, HealthState::CoolingDown))
        );
        let s = standing(&book);
        assert!(!s.available);
        assert_eq!(s.remaining, policy.cooldown);
        assert_eq!(report(&book).cooldown_remaining, policy.cooldown);
    }

    #[tokio::test(start_paused = true)]
    async fn the_cooldown_counts_down_and_then_turns_into_probing() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        advance(secs(4)).await;
        assert!(!standing(&book).available);
        assert_eq!(standing(&book).remaining, secs(6));
        advance(secs(6) - Duration::from_millis(1)).await;
        assert_eq!(report(&book).state, HealthState::CoolingDown);
        assert_eq!(standing(&book).remaining, Duration::from_millis(1));
        advance(Duration::from_millis(1)).await;
        let s = standing(&book);
        assert_eq!(report(&book).state, HealthState::Probing);
        assert!(s.available);
        assert_eq!(s.remaining, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn only_one_attempt_gets_the_probe_while_it_is_in_flight() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        advance(policy.cooldown).await;
        let first = book.begin(P, Instant::now());
        assert!(first.is_probe());
        assert!(!standing(&book).available);
        let second = book.begin(P, Instant::now());
        assert!(!second.is_probe());
        // Dropping a non-probe ticket leaves the probe slot taken.
        drop(second);
        assert!(!standing(&book).available);
        assert_eq!(report(&book).state, HealthState::Probing);
        book.resolve(first, up(), Instant::now(), &policy);
        assert!(standing(&book).available);
    }

    #[tokio::test(start_paused = true)]
    async fn a_successful_probe_heals_and_resets_the_fault_count() {
        let book = HealthBook::new();
        let policy = policy(2);
        trip(&book, &policy);
        advance(policy.cooldown).await;
        assert_eq!(
            probe(&book, up(), &policy),
            Some((HealthState::Probing, HealthState::Healthy))
        );
        let r = report(&book);
        assert_eq!(r.state, HealthState::Healthy);
        assert_eq!(r.consecutive_faults, 0);
        assert_eq!(r.cooldown_remaining, Duration::ZERO);
        assert!(standing(&book).available);
        // The count starts again from zero.
        record(&book, fault(), &policy);
        assert_eq!(report(&book).state, HealthState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn each_failed_probe_doubles_the_cooldown_up_to_eight_times() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        assert_eq!(standing(&book).remaining, secs(10));
        for expected in [20, 40, 80, 80, 80] {
            advance(standing(&book).remaining).await;
            assert_eq!(
                probe(&book, fault(), &policy),
                Some((HealthState::Probing, HealthState::CoolingDown))
            );
            assert_eq!(standing(&book).remaining, secs(expected));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn healing_brings_the_next_cooldown_back_to_the_configured_one() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        advance(secs(10)).await;
        probe(&book, fault(), &policy);
        assert_eq!(standing(&book).remaining, secs(20));
        advance(secs(20)).await;
        probe(&book, up(), &policy);
        trip(&book, &policy);
        assert_eq!(standing(&book).remaining, secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_starts_a_cooldown_of_its_own_length_below_the_threshold() {
        let book = HealthBook::new();
        let policy = policy(3);
        assert_eq!(
            record(&book, fault_retry_after(secs(30)), &policy),
            Some((HealthState::Healthy, HealthState::CoolingDown))
        );
        assert_eq!(report(&book).consecutive_faults, 1);
        assert!(!standing(&book).available);
        assert_eq!(standing(&book).remaining, secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_never_shortens_a_running_cooldown() {
        let book = HealthBook::new();
        let policy = policy(3);
        record(&book, fault_retry_after(secs(30)), &policy);
        advance(secs(10)).await;
        record(&book, fault_retry_after(secs(5)), &policy);
        assert_eq!(standing(&book).remaining, secs(20));
        // The third fault reaches the threshold: its 10 s cooldown does not shorten it either.
        record(&book, fault(), &policy);
        assert_eq!(standing(&book).remaining, secs(20));
        // A longer hint extends it.
        record(&book, fault_retry_after(secs(60)), &policy);
        assert_eq!(standing(&book).remaining, secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fault_older_than_forget_after_is_forgotten() {
        let policy = HealthPolicy {
            forget_after: secs(60),
            ..policy(2)
        };
        let recent = HealthBook::new();
        record(&recent, fault(), &policy);
        let old = HealthBook::new();
        record(&old, fault(), &policy);
        advance(secs(59)).await;
        record(&recent, fault(), &policy);
        assert_eq!(report(&recent).state, HealthState::CoolingDown);
        advance(secs(2)).await;
        record(&old, fault(), &policy);
        let r = report(&old);
        assert_eq!(r.state, HealthState::Healthy);
        assert_eq!(r.consecutive_faults, 1);
        // The count restarted: the next fault at once reaches the threshold.
        record(&old, fault(), &policy);
        assert_eq!(report(&old).state, HealthState::CoolingDown);
    }

    #[tokio::test(start_paused = true)]
    async fn with_reset_on_success_a_success_clears_the_count() {
        let book = HealthBook::new();
        let policy = policy(3);
        record(&book, fault(), &policy);
        record(&book, fault(), &policy);
        record(&book, up(), &policy);
        assert_eq!(report(&book).consecutive_faults, 0);
        record(&book, fault(), &policy);
        record(&book, fault(), &policy);
        assert_eq!(report(&book).state, HealthState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn without_reset_on_success_only_a_success_ending_a_cooldown_clears_the_count() {
        let book = HealthBook::new();
        let policy = HealthPolicy {
            reset_on_success: false,
            ..policy(3)
        };
        record(&book, fault(), &policy);
        record(&book, fault(), &policy);
        assert_eq!(record(&book, up(), &policy), None);
        let r = report(&book);
        assert_eq!(r.state, HealthState::Healthy);
        assert_eq!(r.consecutive_faults, 2);
        record(&book, fault(), &policy);
        assert_eq!(report(&book).state, HealthState::CoolingDown);
        advance(policy.cooldown).await;
        probe(&book, up(), &policy);
        let r = report(&book);
        assert_eq!(r.state, HealthState::Healthy);
        assert_eq!(r.consecutive_faults, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_ticket_dropped_unresolved_frees_the_probe_slot() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        advance(policy.cooldown).await;
        let ticket = book.begin(P, Instant::now());
        assert!(ticket.is_probe());
        assert!(!standing(&book).available);
        drop(ticket);
        assert!(standing(&book).available);
        assert_eq!(report(&book).state, HealthState::Probing);
        assert!(book.begin(P, Instant::now()).is_probe());
    }

    #[tokio::test(start_paused = true)]
    async fn report_counts_requests_successes_failures_and_keeps_the_last_error() {
        let book = HealthBook::new();
        let policy = policy(10);
        let empty = report(&book);
        assert_eq!(empty.state, HealthState::Healthy);
        assert_eq!((empty.requests, empty.successes, empty.failures), (0, 0, 0));
        assert!(empty.last_error.is_none());
        assert!(standing(&book).available);

        for verdict in [up(), fault(), up()] {
            let ticket = book.begin(P, Instant::now());
            book.resolve(ticket, verdict, Instant::now(), &policy);
        }
        drop(book.begin(P, Instant::now()));
        let r = report(&book);
        assert_eq!((r.requests, r.successes, r.failures), (4, 2, 1));
        assert_eq!(r.last_error.as_ref().map(|(e, _)| e.as_str()), Some("boom"));

        // A verdict recorded outside an attempt counts, but not as a request.
        book.record(
            P,
            Verdict::Fault {
                reason: "stream broke".into(),
                retry_after: None,
            },
            Instant::now(),
            &policy,
        );
        let r = report(&book);
        assert_eq!((r.requests, r.successes, r.failures), (4, 2, 2));
        assert_eq!(
            r.last_error.as_ref().map(|(e, _)| e.as_str()),
            Some("stream broke")
        );
        // Other providers are untouched.
        assert_eq!(book.report("other", Instant::now()).requests, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn latency_is_a_moving_average_of_the_ttfb_of_successes() {
        let book = HealthBook::new();
        let policy = policy(1);
        let ttfb = |ms| Verdict::Up {
            ttfb: Some(Duration::from_millis(ms)),
        };
        record(&book, ttfb(100), &policy);
        assert_eq!(standing(&book).ttfb_ewma_ms, Some(100.0));
        record(&book, up(), &policy);
        assert_eq!(standing(&book).ttfb_ewma_ms, Some(100.0));
        record(&book, ttfb(200), &policy);
        let avg = report(&book).ttfb_ewma_ms.unwrap();
        assert!((avg - 130.0).abs() < 1e-9, "{avg}");
    }

    #[test]
    fn the_count_tokens_policy_trips_on_at_least_one_failure_and_never_forgets() {
        let p = HealthPolicy::for_count_tokens(&TokenCounting {
            always_use_local: false,
            failure_threshold: 0,
            api_failure_cooldown: secs(300),
            timeout: secs(5),
        });
        assert_eq!(p.threshold, 1);
        assert_eq!(p.cooldown, secs(300));
        assert!(p.reset_on_success);
        assert_eq!(p.forget_after, Duration::MAX);
    }
}
