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

/// The part of a provider's health that instances share with the Redis backend: the fault count,
/// the cooldown and its doubling factor, the last error. Requests, successes, failures and the
/// latency average stay per instance.
#[derive(Debug, Clone)]
struct Condition {
    consecutive_faults: u32,
    last_fault_at: Option<Instant>,
    /// Set while the provider is marked unhealthy; cleared by a success.
    cooldown_until: Option<Instant>,
    backoff: u32,
    last_error: Option<(String, SystemTime)>,
}

impl Default for Condition {
    fn default() -> Self {
        Self {
            consecutive_faults: 0,
            last_fault_at: None,
            cooldown_until: None,
            backoff: 1,
            last_error: None,
        }
    }
}

impl Condition {
    fn state(&self, now: Instant) -> HealthState {
        match self.cooldown_until {
            None => HealthState::Healthy,
            Some(until) if until > now => HealthState::CoolingDown,
            Some(_) => HealthState::Probing,
        }
    }

    /// Records a verdict; returns whether anything changed (a success on a healthy provider with
    /// no fault counted changes nothing, so it is never shared).
    fn apply(&mut self, verdict: &Verdict, now: Instant, policy: &HealthPolicy) -> bool {
        let before = self.state(now);
        match verdict {
            Verdict::Up { .. } => {
                let forgive = (policy.reset_on_success || self.cooldown_until.is_some())
                    && self.consecutive_faults != 0;
                let changed = forgive || self.cooldown_until.is_some() || self.backoff != 1;
                if forgive {
                    self.consecutive_faults = 0;
                }
                self.cooldown_until = None;
                self.backoff = 1;
                changed
            }
            Verdict::Fault {
                reason,
                retry_after,
            } => {
                self.last_error = Some((reason.clone(), SystemTime::now()));
                if self
                    .last_fault_at
                    .is_some_and(|t| now.saturating_duration_since(t) > policy.forget_after)
                {
                    self.consecutive_faults = 0;
                }
                self.consecutive_faults = self.consecutive_faults.saturating_add(1);
                self.last_fault_at = Some(now);
                let was_marked = self.cooldown_until.is_some();
                self.backoff = self.backoff.max(1);
                if was_marked && before != HealthState::CoolingDown {
                    // A failed probe (or a failure while waiting for one): back off further.
                    self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
                    self.cooldown_until =
                        Some(now + retry_after.unwrap_or(policy.cooldown * self.backoff));
                } else if retry_after.is_some() || self.consecutive_faults >= policy.threshold {
                    let base = policy.cooldown * self.backoff;
                    let until = now + retry_after.unwrap_or(base);
                    // Never shorten a cooldown that is already running.
                    self.cooldown_until = Some(self.cooldown_until.map_or(until, |u| u.max(until)));
                }
                true
            }
        }
    }
}

#[derive(Debug, Default, Clone)]
struct Entry {
    condition: Condition,
    /// The shared record this instance last adopted (Redis backend); its version orders records.
    shared: Option<SharedHealth>,
    probe_in_flight: bool,
    /// Another instance holds the probe lease until then: skip the provider like one cooling down.
    probe_elsewhere_until: Option<Instant>,
    requests: u64,
    successes: u64,
    failures: u64,
    ttfb_ewma_ms: Option<f64>,
}

impl Entry {
    fn state(&self, now: Instant) -> HealthState {
        self.condition.state(now)
    }

    fn probe_elsewhere(&self, now: Instant) -> Option<Duration> {
        self.probe_elsewhere_until
            .filter(|u| *u > now)
            .map(|u| u - now)
    }
}

/// What the ordering code needs to know about one provider right now.
#[derive(Debug, Clone, Copy)]
pub struct Standing {
    /// May be tried first: healthy, or probing with no probe under way (here or, with the Redis
    /// backend, on another instance).
    pub available: bool,
    /// Time until the cooldown ends, or until another instance's probe lease runs out (zero when
    /// neither).
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
    /// The instance that made the shared state shown (Redis backend), when known.
    pub changed_by: Option<String>,
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

/// A change of a provider's [`Condition`], for the cluster to share: the verdict that made it and
/// the policy it was judged by (the cluster applies it again to the shared record).
#[derive(Debug, Clone)]
pub struct Change {
    pub provider: String,
    pub verdict: Verdict,
    pub policy: HealthPolicy,
    /// When the verdict was given (the cluster may apply it a little later).
    pub at: Instant,
}

/// A provider's shared health as it is stored in Redis and published to every instance. Times are
/// Unix milliseconds; `version` orders records (the larger of the previous version plus one and
/// the writer's clock, so records written after a Redis restart still win).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SharedHealth {
    pub version: u64,
    pub consecutive_faults: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fault_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cooldown_until_ms: Option<u64>,
    pub backoff: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_ms: Option<u64>,
    /// The instance that wrote it.
    pub by: String,
}

/// Maps the book's clock (tokio's, which tests pause) to Unix time and back, from a pair of
/// readings taken for each conversion (so a wall clock stepped by NTP is followed at once).
#[derive(Debug, Clone, Copy)]
struct Clock {
    instant: Instant,
    unix: SystemTime,
}

impl Clock {
    fn now() -> Self {
        Self {
            instant: Instant::now(),
            unix: SystemTime::now(),
        }
    }

    fn to_ms(self, at: Instant) -> u64 {
        let unix = if at >= self.instant {
            self.unix + (at - self.instant)
        } else {
            self.unix
                .checked_sub(self.instant - at)
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        unix_ms(unix)
    }

    /// `None` for a moment this process's clock cannot express (before the machine started).
    fn to_instant(self, ms: u64) -> Option<Instant> {
        let anchor = unix_ms(self.unix);
        if ms >= anchor {
            Some(self.instant + Duration::from_millis(ms - anchor))
        } else {
            self.instant.checked_sub(Duration::from_millis(anchor - ms))
        }
    }
}

/// Unix time in whole milliseconds.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl SharedHealth {
    fn of(c: &Condition, clock: Clock) -> Self {
        Self {
            version: 0,
            consecutive_faults: c.consecutive_faults,
            last_fault_ms: c.last_fault_at.map(|t| clock.to_ms(t)),
            cooldown_until_ms: c.cooldown_until.map(|t| clock.to_ms(t)),
            backoff: c.backoff,
            last_error: c.last_error.as_ref().map(|(e, _)| e.clone()),
            last_error_ms: c.last_error.as_ref().map(|(_, t)| unix_ms(*t)),
            by: String::new(),
        }
    }

    fn condition(&self, clock: Clock) -> Condition {
        let instant = |ms: Option<u64>| ms.and_then(|ms| clock.to_instant(ms));
        Condition {
            consecutive_faults: self.consecutive_faults,
            last_fault_at: instant(self.last_fault_ms),
            // A deadline too old to express has long passed: the clock's earliest moment will do.
            cooldown_until: self.cooldown_until_ms.map(|ms| {
                clock
                    .to_instant(ms)
                    .unwrap_or(clock.instant.min(Instant::now()))
            }),
            backoff: self.backoff.clamp(1, MAX_BACKOFF),
            last_error: self.last_error.clone().map(|e| {
                let at = SystemTime::UNIX_EPOCH
                    + Duration::from_millis(self.last_error_ms.unwrap_or_default());
                (e, at)
            }),
        }
    }
}

#[derive(Debug)]
pub struct HealthBook {
    entries: Mutex<HashMap<String, Entry>>,
    /// Where changes go to be shared (set by the cluster with the Redis backend).
    sink: std::sync::OnceLock<tokio::sync::mpsc::UnboundedSender<Change>>,
}

impl Default for HealthBook {
    fn default() -> Self {
        Self {
            entries: Mutex::default(),
            sink: std::sync::OnceLock::new(),
        }
    }
}

impl HealthBook {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A poisoned lock only means another thread panicked mid-update; the counters are still usable.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends every later change of a provider's condition to `sink` (once; later calls are
    /// ignored).
    pub fn share_changes(&self, sink: tokio::sync::mpsc::UnboundedSender<Change>) {
        let _ = self.sink.set(sink);
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
        let elsewhere = e.probe_elsewhere(now);
        let cooling = e
            .condition
            .cooldown_until
            .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
        Standing {
            available: state == HealthState::Healthy
                || (state == HealthState::Probing && !e.probe_in_flight && elsewhere.is_none()),
            remaining: cooling.max(elsewhere.unwrap_or_default()),
            ttfb_ewma_ms: e.ttfb_ewma_ms,
        }
    }

    /// Called when an attempt starts. Returns a ticket that must be resolved with [`HealthBook::resolve`];
    /// a ticket dropped unresolved (the client went away) frees the probe slot.
    pub fn begin(self: &Arc<Self>, provider: &str, now: Instant) -> AttemptTicket {
        let mut map = self.lock();
        let e = map.entry(provider.to_owned()).or_default();
        e.requests += 1;
        let probe = e.state(now) == HealthState::Probing
            && !e.probe_in_flight
            && e.probe_elsewhere(now).is_none();
        if probe {
            e.probe_in_flight = true;
        }
        AttemptTicket {
            book: Arc::clone(self),
            provider: provider.to_owned(),
            probe,
            resolved: false,
            shared_version: e.shared.as_ref().map_or(0, |s| s.version),
        }
    }

    /// Another instance holds the probe of this provider until `until`: the probe `ticket` had
    /// is given up without a verdict, and the provider is skipped like one cooling down until the
    /// probe's outcome arrives or the lease runs out.
    pub fn probe_elsewhere(&self, mut ticket: AttemptTicket, until: Instant) {
        ticket.resolved = true;
        let mut map = self.lock();
        if let Some(e) = map.get_mut(&ticket.provider) {
            if ticket.probe {
                e.probe_in_flight = false;
            }
            e.requests = e.requests.saturating_sub(1);
            e.probe_elsewhere_until = Some(until);
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
        self.record_in(&mut map, &ticket.provider, verdict, now, policy)
    }

    /// Records a verdict outside an attempt, e.g. a stream that broke after it was committed.
    pub fn record(
        &self,
        provider: &str,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        self.record_in(&mut self.lock(), provider, verdict, now, policy)
    }

    fn record_in(
        &self,
        map: &mut HashMap<String, Entry>,
        provider: &str,
        verdict: Verdict,
        now: Instant,
        policy: &HealthPolicy,
    ) -> Option<(HealthState, HealthState)> {
        let e = map.entry(provider.to_owned()).or_default();
        let before = e.state(now);
        match &verdict {
            Verdict::Up { ttfb } => {
                e.successes += 1;
                if let Some(t) = ttfb {
                    let ms = t.as_secs_f64() * 1000.0;
                    e.ttfb_ewma_ms = Some(match e.ttfb_ewma_ms {
                        Some(prev) => prev + EWMA_ALPHA * (ms - prev),
                        None => ms,
                    });
                }
            }
            Verdict::Fault { .. } => e.failures += 1,
        }
        let changed = e.condition.apply(&verdict, now, policy);
        let after = e.state(now);
        if changed {
            if let Some(sink) = self.sink.get() {
                let _ = sink.send(Change {
                    provider: provider.to_owned(),
                    verdict,
                    policy: *policy,
                    at: now,
                });
            }
        }
        (before != after).then_some((before, after))
    }

    /// The shared record this instance last adopted for `provider` (version 0 when none).
    pub fn shared(&self, provider: &str) -> SharedHealth {
        self.lock()
            .get(provider)
            .and_then(|e| e.shared.clone())
            .unwrap_or_default()
    }

    /// `base` with `verdict` (given at `at`) applied, as the next shared record written by `by`
    /// (pure: the book is not changed).
    pub fn next_shared(
        &self,
        base: &SharedHealth,
        verdict: &Verdict,
        policy: &HealthPolicy,
        by: &str,
        at: Instant,
    ) -> SharedHealth {
        let clock = Clock::now();
        let mut condition = base.condition(clock);
        condition.apply(verdict, at, policy);
        SharedHealth {
            version: base.version.saturating_add(1).max(unix_ms(clock.unix)),
            by: by.to_owned(),
            ..SharedHealth::of(&condition, clock)
        }
    }

    /// Takes a shared record (published by an instance, or read back by a resync) as this
    /// provider's condition, unless a newer one was already taken. Returns the state change, if
    /// any, for logging.
    pub fn adopt(
        &self,
        provider: &str,
        record: SharedHealth,
        now: Instant,
    ) -> Option<(HealthState, HealthState)> {
        let mut map = self.lock();
        let e = map.entry(provider.to_owned()).or_default();
        if e.shared
            .as_ref()
            .is_some_and(|s| s.version >= record.version)
        {
            return None;
        }
        let before = e.state(now);
        e.condition = record.condition(Clock::now());
        e.shared = Some(record);
        // The probe's outcome (or any newer state) ends another instance's probe lease.
        e.probe_elsewhere_until = None;
        let after = e.state(now);
        (before != after).then_some((before, after))
    }

    pub fn report(&self, provider: &str, now: Instant) -> HealthReport {
        let map = self.lock();
        let e = map.get(provider).cloned().unwrap_or_default();
        HealthReport {
            state: e.state(now),
            consecutive_faults: e.condition.consecutive_faults,
            cooldown_remaining: e
                .condition
                .cooldown_until
                .map_or(Duration::ZERO, |u| u.saturating_duration_since(now)),
            last_error: e.condition.last_error,
            requests: e.requests,
            successes: e.successes,
            failures: e.failures,
            ttfb_ewma_ms: e.ttfb_ewma_ms,
            changed_by: e.shared.map(|s| s.by).filter(|b| !b.is_empty()),
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
    /// The version of the shared record the probe follows (its lease is per version).
    shared_version: u64,
}

impl AttemptTicket {
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The version of the shared record this attempt follows: a probe's lease is taken for it.
    pub fn shared_version(&self) -> u64 {
        self.shared_version
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

    /// Receives what the book hands to the cluster.
    fn shared_book() -> (
        Arc<HealthBook>,
        tokio::sync::mpsc::UnboundedReceiver<Change>,
    ) {
        let book = HealthBook::new();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        book.share_changes(tx);
        (book, rx)
    }

    #[tokio::test(start_paused = true)]
    async fn successes_of_a_healthy_provider_are_not_shared_and_every_change_is() {
        let (book, mut changes) = shared_book();
        let policy = policy(2);
        // The hot path: nothing to share.
        record(&book, up(), &policy);
        record(
            &book,
            Verdict::Up {
                ttfb: Some(secs(1)),
            },
            &policy,
        );
        assert!(changes.try_recv().is_err());
        // A fault is shared with its verdict and policy; the success that forgives it too.
        record(&book, fault(), &policy);
        let c = changes.try_recv().unwrap();
        assert_eq!(c.provider, P);
        assert!(matches!(c.verdict, Verdict::Fault { ref reason, .. } if reason == "boom"));
        assert_eq!(c.policy, policy);
        record(&book, up(), &policy);
        assert!(matches!(
            changes.try_recv().unwrap().verdict,
            Verdict::Up { .. }
        ));
        record(&book, up(), &policy);
        assert!(changes.try_recv().is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn a_shared_record_applies_verdicts_like_the_book_and_is_adopted_by_another_book() {
        let policy = policy(2);
        let here = HealthBook::new();
        let base = here.shared(P);
        assert_eq!(base.version, 0);
        let one = here.next_shared(&base, &fault(), &policy, "gw-1", Instant::now());
        assert_eq!(one.consecutive_faults, 1);
        assert_eq!(one.cooldown_until_ms, None);
        assert!(one.version > 0);
        assert_eq!(one.by, "gw-1");
        // A fault from another instance on top of it reaches the threshold: the cooldown starts.
        let two = here.next_shared(&one, &fault(), &policy, "gw-2", Instant::now());
        assert!(two.version > one.version);
        assert_eq!(two.consecutive_faults, 2);
        let now_ms = unix_ms(SystemTime::now());
        let until = two.cooldown_until_ms.unwrap();
        assert!(
            until.abs_diff(now_ms + 10_000) < 1_000,
            "{until} vs {now_ms}"
        );
        assert_eq!(two.last_error.as_deref(), Some("boom"));

        // Another book (another instance) takes it: cooling down, for the same remaining time.
        let there = HealthBook::new();
        assert_eq!(
            there.adopt(P, two.clone(), Instant::now()),
            Some((HealthState::Healthy, HealthState::CoolingDown))
        );
        let r = there.report(P, Instant::now());
        assert_eq!(r.consecutive_faults, 2);
        assert!(r.cooldown_remaining > secs(9) && r.cooldown_remaining <= secs(10));
        assert_eq!(r.changed_by.as_deref(), Some("gw-2"));
        assert_eq!(r.last_error.map(|(e, _)| e).as_deref(), Some("boom"));
        // Local counters are not shared.
        assert_eq!(r.failures, 0);
        // An older record (a resync read before the change arrived) is ignored.
        assert_eq!(there.adopt(P, one, Instant::now()), None);
        assert_eq!(there.report(P, Instant::now()).consecutive_faults, 2);
        assert_eq!(there.shared(P), two);

        // After the cooldown, the book probes; the healed record brings it back.
        advance(secs(10)).await;
        assert_eq!(there.report(P, Instant::now()).state, HealthState::Probing);
        let healed = there.next_shared(&two, &up(), &policy, "gw-3", Instant::now());
        assert_eq!(healed.consecutive_faults, 0);
        assert_eq!(healed.cooldown_until_ms, None);
        there.adopt(P, healed, Instant::now());
        assert_eq!(there.report(P, Instant::now()).state, HealthState::Healthy);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_held_elsewhere_skips_the_provider_until_the_lease_ends_or_news_arrive() {
        let book = HealthBook::new();
        let policy = policy(1);
        trip(&book, &policy);
        advance(policy.cooldown).await;
        let ticket = book.begin(P, Instant::now());
        assert!(ticket.is_probe());
        book.probe_elsewhere(ticket, Instant::now() + secs(30));
        let s = standing(&book);
        assert!(!s.available);
        assert_eq!(s.remaining, secs(30));
        // A last-resort attempt meanwhile is no probe, and the skipped one counted no request.
        let last_resort = book.begin(P, Instant::now());
        assert!(!last_resort.is_probe());
        drop(last_resort);
        assert_eq!(report(&book).requests, 1);
        // The lease runs out: this instance may probe.
        advance(secs(30)).await;
        assert!(standing(&book).available);
        let ticket = book.begin(P, Instant::now());
        assert!(ticket.is_probe());
        book.probe_elsewhere(ticket, Instant::now() + secs(30));
        // The probe's outcome arrives from the other instance: the lease no longer matters.
        let healed = book.next_shared(&book.shared(P), &up(), &policy, "gw-2", Instant::now());
        book.adopt(P, healed, Instant::now());
        let s = standing(&book);
        assert!(s.available);
        assert_eq!(s.remaining, Duration::ZERO);
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
