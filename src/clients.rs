//! Named clients (`clients:`): who a request comes from, which models it may ask for, and its
//! limits: requests per minute, concurrent requests, tokens and a USD budget over rolling windows.
//!
//! The [`ClientTable`] is compiled with each configuration. The [`Ledger`] (what each client used)
//! is keyed by client name and outlives reloads, like the health book. A request is admitted only
//! while its client is under every limit ([`Ledger::admit`]); tokens and cost are charged when the
//! request ends, from the usage the provider reported ([`Ledger::charge`]), so a request may
//! overshoot a window once, and the next one is refused.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use regex::RegexSet;
use sha2::Digest;
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use crate::config::{ClientConfig, ClientKey, Limits, Window};

/// Who sent a request, as the key check found it (a request extension set by
/// `inbound::auth::guard`): a named client, or nobody in particular (no key needed, an
/// `auth.api_keys` key, or an admin key).
#[derive(Debug, Clone, Default)]
pub struct Caller(pub Option<Arc<Client>>);

/// One named client, compiled.
#[derive(Debug)]
pub struct Client {
    pub name: Arc<str>,
    key: ClientKey,
    /// The models it may ask for; `None`: every model.
    models: Option<RegexSet>,
    pub limits: Limits,
}

impl Client {
    /// Whether the client may ask for `model`.
    pub fn may_use(&self, model: &str) -> bool {
        self.models.as_ref().is_none_or(|m| m.is_match(model))
    }
}

/// The named clients of one configuration.
#[derive(Debug, Default)]
pub struct ClientTable {
    clients: Vec<Arc<Client>>,
    /// Some client is known by its key's SHA-256: a presented key is hashed once to compare.
    any_hashed: bool,
}

impl ClientTable {
    pub fn new(configs: &[ClientConfig]) -> Self {
        let clients: Vec<Arc<Client>> = configs
            .iter()
            .map(|c| {
                let models = (!c.models.is_empty()).then(|| {
                    let patterns: Vec<String> = c
                        .models
                        .iter()
                        .map(|g| crate::routing::glob_pattern(g))
                        .collect();
                    // The patterns are escaped globs: they always compile.
                    RegexSet::new(patterns).unwrap_or_else(|_| RegexSet::empty())
                });
                Arc::new(Client {
                    name: Arc::from(c.name.as_str()),
                    key: c.key.clone(),
                    models,
                    limits: c.limits.clone(),
                })
            })
            .collect();
        let any_hashed = clients
            .iter()
            .any(|c| matches!(c.key, ClientKey::Sha256(_)));
        Self {
            clients,
            any_hashed,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Client>> {
        self.clients.iter()
    }

    /// The client whose key is `presented`. Every client's key is compared, in constant time
    /// each, with no early exit.
    pub fn identify(&self, presented: &[u8]) -> Option<Arc<Client>> {
        if self.clients.is_empty() {
            return None;
        }
        let digest: Option<[u8; 32]> = self
            .any_hashed
            .then(|| sha2::Sha256::digest(presented).into());
        let mut found = None;
        for c in &self.clients {
            let hit: bool = match (&c.key, &digest) {
                (ClientKey::Plain(k), _) => presented.ct_eq(k.expose().as_bytes()).into(),
                (ClientKey::Sha256(d), Some(p)) => p.ct_eq(d).into(),
                (ClientKey::Sha256(_), None) => false,
            };
            if hit && found.is_none() {
                found = Some(Arc::clone(c));
            }
        }
        found
    }
}

/// How many buckets a rolling window is cut into: it moves on by 1/60 of its length at a time.
const BUCKETS: usize = 60;

/// An amount over a rolling window, in [`BUCKETS`] buckets.
#[derive(Debug, Clone)]
struct Rolling {
    width: Duration,
    /// Start of the newest bucket (`buckets[head]`).
    start: Instant,
    head: usize,
    buckets: [f64; BUCKETS],
}

impl Rolling {
    fn new(window: Duration, now: Instant) -> Self {
        Self {
            width: (window / BUCKETS as u32).max(Duration::from_millis(1)),
            start: now,
            head: 0,
            buckets: [0.0; BUCKETS],
        }
    }

    /// Moves the newest bucket up to `now`, emptying the buckets that left the window.
    fn advance(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.start);
        let steps = (elapsed.as_nanos() / self.width.as_nanos()).min(u128::from(u32::MAX)) as u32;
        if steps == 0 {
            return;
        }
        if steps as usize >= BUCKETS {
            self.buckets = [0.0; BUCKETS];
        } else {
            for k in 1..=steps as usize {
                self.buckets[(self.head + k) % BUCKETS] = 0.0;
            }
        }
        self.head = (self.head + steps as usize) % BUCKETS;
        self.start += self.width * steps;
    }

    /// Adds `amount` at `at` (at most the window's length ago; later than `now` counts as now).
    fn add_at(&mut self, now: Instant, at: Instant, amount: f64) {
        self.advance(now);
        let ago = self.start.saturating_duration_since(at);
        let back = (ago.as_nanos().div_ceil(self.width.as_nanos())) as usize;
        if back < BUCKETS {
            let slot = (self.head + BUCKETS - back) % BUCKETS;
            self.buckets[slot] += amount;
        }
    }

    fn add(&mut self, now: Instant, amount: f64) {
        self.add_at(now, now, amount);
    }

    fn total(&mut self, now: Instant) -> f64 {
        self.advance(now);
        self.buckets.iter().sum()
    }

    /// How long until the total is below `max` again, if nothing more is added.
    fn wait_below(&mut self, now: Instant, max: f64) -> Duration {
        let mut remaining = self.total(now);
        if remaining < max {
            return Duration::ZERO;
        }
        for i in 0..BUCKETS {
            let oldest = (self.head + 1 + i) % BUCKETS;
            remaining -= self.buckets[oldest];
            if remaining < max {
                return (self.start + self.width * (i as u32 + 1)).saturating_duration_since(now);
            }
        }
        self.width * BUCKETS as u32
    }
}

/// What one client used: requests in flight, and the rolling totals its limits read.
#[derive(Debug, Default)]
struct Account {
    in_flight: u64,
    windows: HashMap<(Kind, Window), Rolling>,
}

impl Account {
    fn rolling(&mut self, kind: Kind, window: Window, now: Instant) -> &mut Rolling {
        self.windows
            .entry((kind, window))
            .or_insert_with(|| Rolling::new(window.duration(), now))
    }
}

/// What a windowed limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Requests,
    Tokens,
    Cost,
}

impl Kind {
    /// The limit's name (in messages, metrics and Redis keys).
    pub fn limit(self) -> &'static str {
        match self {
            Kind::Requests => "requests_per_minute",
            Kind::Tokens => "tokens",
            Kind::Cost => "budget_usd",
        }
    }
}

/// One of a client's limits over a rolling window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowedLimit {
    pub kind: Kind,
    pub window: Window,
    pub max: f64,
}

impl WindowedLimit {
    /// What a finished request adds to this limit's window: its tokens, or its cost; `None` for
    /// requests, counted when admitted.
    pub fn charge(&self, tokens: u64, cost: f64) -> Option<f64> {
        match self.kind {
            Kind::Requests => None,
            Kind::Tokens => Some(tokens as f64),
            Kind::Cost => Some(cost),
        }
    }

    /// The refusal of a request of client `name` by this limit, free again after `wait`.
    pub fn refusal(&self, name: &str, wait: Duration) -> Refusal {
        let message = match self.kind {
            Kind::Requests => format!(
                "client {name:?} reached its limit of {} requests per minute",
                self.max
            ),
            Kind::Tokens => format!(
                "client {name:?} reached its limit of {} tokens per {}",
                self.max,
                self.window.as_str()
            ),
            Kind::Cost => format!(
                "client {name:?} reached its budget of {} USD per {}",
                self.max,
                self.window.as_str()
            ),
        };
        Refusal {
            message,
            retry_after: wait,
            limit: self.kind.limit(),
        }
    }
}

/// A client's limits over rolling windows, in the order they are checked.
pub fn windowed(limits: &Limits) -> impl Iterator<Item = WindowedLimit> {
    let requests = limits.requests_per_minute.map(|max| WindowedLimit {
        kind: Kind::Requests,
        window: Window::Minute,
        max: max as f64,
    });
    let tokens = limits.tokens.map(|l| WindowedLimit {
        kind: Kind::Tokens,
        window: l.window,
        max: l.max,
    });
    let cost = limits.budget_usd.map(|l| WindowedLimit {
        kind: Kind::Cost,
        window: l.window,
        max: l.max,
    });
    requests.into_iter().chain(tokens).chain(cost)
}

/// A limit a request was refused for.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    /// What the client is told (names the limit and the client).
    pub message: String,
    /// When enough of the window frees up.
    pub retry_after: Duration,
    /// For the metric: `requests_per_minute`, `concurrent_requests`, `tokens` or `budget_usd`.
    pub limit: &'static str,
}

/// What each client used, kept across reloads.
#[derive(Debug, Default)]
pub struct Ledger {
    accounts: Mutex<HashMap<Arc<str>, Account>>,
}

impl Ledger {
    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, Account>> {
        self.accounts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a request of `client` if it is under every limit: it then counts as one request
    /// of the minute and one in flight until the returned [`Admission`] is dropped.
    pub fn admit(
        self: &Arc<Self>,
        client: &Arc<Client>,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        self.admit_with(client, now, true)
    }

    /// Admits a request whose windowed limits the cluster already checked (Redis backend): only
    /// the concurrent requests are checked here; the request is still counted in the local
    /// windows, so that they are current if Redis goes away.
    pub fn admit_checked(
        self: &Arc<Self>,
        client: &Arc<Client>,
        now: Instant,
    ) -> Result<Admission, Refusal> {
        self.admit_with(client, now, false)
    }

    fn admit_with(
        self: &Arc<Self>,
        client: &Arc<Client>,
        now: Instant,
        check_windows: bool,
    ) -> Result<Admission, Refusal> {
        let limits = &client.limits;
        let mut map = self.lock();
        let account = map.entry(Arc::clone(&client.name)).or_default();
        let name = &client.name;
        if let Some(max) = limits.concurrent_requests {
            if account.in_flight >= max {
                return Err(Refusal {
                    message: format!(
                        "client {name:?} is at its limit of {max} concurrent requests"
                    ),
                    retry_after: Duration::from_secs(1),
                    limit: "concurrent_requests",
                });
            }
        }
        if check_windows {
            for limit in windowed(limits) {
                let rolling = account.rolling(limit.kind, limit.window, now);
                let wait = rolling.wait_below(now, limit.max);
                if !wait.is_zero() {
                    return Err(limit.refusal(name, wait));
                }
            }
        }
        if limits.requests_per_minute.is_some() {
            account
                .rolling(Kind::Requests, Window::Minute, now)
                .add(now, 1.0);
        }
        account.in_flight += 1;
        Ok(Admission {
            ledger: Arc::clone(self),
            client: Arc::clone(name),
        })
    }

    /// Charges what a request used (its tokens and their cost) to every window of its client's
    /// limits, at `at` (now, or the time a stored request was made when rebuilding).
    pub fn charge(&self, client: &Client, tokens: u64, cost: f64, now: Instant, at: Instant) {
        let limits = &client.limits;
        if limits.tokens.is_none() && limits.budget_usd.is_none() {
            return;
        }
        let mut map = self.lock();
        let account = map.entry(Arc::clone(&client.name)).or_default();
        for limit in windowed(limits) {
            let Some(amount) = limit.charge(tokens, cost) else {
                continue;
            };
            account
                .rolling(limit.kind, limit.window, now)
                .add_at(now, at, amount);
        }
    }

    /// Each limit's use for `GET /usage` and the dashboard, as this instance counts it.
    pub fn use_of(&self, client: &Client, now: Instant) -> Vec<LimitUse> {
        let limits = &client.limits;
        let mut map = self.lock();
        let account = map.entry(Arc::clone(&client.name)).or_default();
        let mut out = Vec::new();
        if let Some(max) = limits.concurrent_requests {
            out.push(LimitUse {
                limit: "concurrent_requests",
                used: account.in_flight as f64,
                max: max as f64,
                window: None,
            });
        }
        for limit in windowed(limits) {
            out.push(LimitUse {
                limit: limit.kind.limit(),
                used: account.rolling(limit.kind, limit.window, now).total(now),
                max: limit.max,
                window: Some(limit.window),
            });
        }
        out
    }
}

/// One limit of a client and how much of it is used.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitUse {
    pub limit: &'static str,
    pub used: f64,
    pub max: f64,
    pub window: Option<Window>,
}

/// A request admitted under its client's limits: it holds one of the client's concurrent
/// requests until dropped (when the response body ends or the client goes away).
#[derive(Debug)]
pub struct Admission {
    ledger: Arc<Ledger>,
    client: Arc<str>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(a) = self.ledger.lock().get_mut(&self.client) {
            a.in_flight = a.in_flight.saturating_sub(1);
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::WindowLimit;
    use crate::secret::Secret;
    use tokio::time::advance;

    fn client(limits: Limits) -> Arc<Client> {
        let table = ClientTable::new(&[ClientConfig {
            name: "alice".into(),
            key: ClientKey::Plain(Secret::new("k-alice")),
            models: vec!["*sonnet*".into()],
            limits,
        }]);
        table.identify(b"k-alice").unwrap()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn clients_are_known_by_their_key_or_its_sha256() {
        let digest: [u8; 32] = sha2::Sha256::digest(b"k-bob").into();
        let table = ClientTable::new(&[
            ClientConfig {
                name: "alice".into(),
                key: ClientKey::Plain(Secret::new("k-alice")),
                models: vec![],
                limits: Limits::default(),
            },
            ClientConfig {
                name: "bob".into(),
                key: ClientKey::Sha256(digest),
                models: vec!["*haiku*".into(), "claude-opus-4-5".into()],
                limits: Limits::default(),
            },
        ]);
        assert_eq!(&*table.identify(b"k-alice").unwrap().name, "alice");
        let bob = table.identify(b"k-bob").unwrap();
        assert_eq!(&*bob.name, "bob");
        assert!(table.identify(b"k-bo").is_none());
        assert!(table.identify(b"").is_none());
        // Model globs, case-insensitive like routes.
        assert!(bob.may_use("claude-HAIKU-4-5"));
        assert!(bob.may_use("claude-opus-4-5"));
        assert!(!bob.may_use("claude-opus-4-5-20251101"));
        assert!(table.identify(b"k-alice").unwrap().may_use("anything"));
    }

    #[tokio::test(start_paused = true)]
    async fn requests_per_minute_roll_off_a_minute_later() {
        let ledger = Arc::new(Ledger::default());
        let alice = client(Limits {
            requests_per_minute: Some(3),
            ..Limits::default()
        });
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(ledger.admit(&alice, Instant::now()).unwrap());
            advance(secs(10)).await;
        }
        // Three in the last minute: the fourth waits until the first rolls off, a minute after
        // it was made (at 60 s, 30 s from now).
        let refused = ledger.admit(&alice, Instant::now()).unwrap_err();
        assert_eq!(refused.limit, "requests_per_minute");
        assert!(
            refused.message.contains("\"alice\"")
                && refused.message.contains("3 requests per minute")
        );
        assert_eq!(refused.retry_after, secs(30));
        // Refusals do not count.
        advance(secs(29)).await;
        assert!(ledger.admit(&alice, Instant::now()).is_err());
        advance(secs(1)).await;
        assert!(ledger.admit(&alice, Instant::now()).is_ok());
        assert!(ledger.admit(&alice, Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn concurrent_requests_are_held_until_the_admission_is_dropped() {
        let ledger = Arc::new(Ledger::default());
        let alice = client(Limits {
            concurrent_requests: Some(2),
            ..Limits::default()
        });
        let one = ledger.admit(&alice, Instant::now()).unwrap();
        let _two = ledger.admit(&alice, Instant::now()).unwrap();
        let refused = ledger.admit(&alice, Instant::now()).unwrap_err();
        assert_eq!(refused.limit, "concurrent_requests");
        assert_eq!(refused.retry_after, secs(1));
        drop(one);
        assert!(ledger.admit(&alice, Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_may_overshoot_once_and_free_up_as_the_window_rolls() {
        let ledger = Arc::new(Ledger::default());
        let alice = client(Limits {
            tokens: Some(WindowLimit {
                window: Window::FiveHours,
                max: 1000.0,
            }),
            ..Limits::default()
        });
        // 5 h in 60 buckets of 5 minutes.
        drop(ledger.admit(&alice, Instant::now()).unwrap());
        ledger.charge(&alice, 600, 0.0, Instant::now(), Instant::now());
        advance(Duration::from_secs(3600)).await;
        // Under the limit: admitted, and this one overshoots it.
        drop(ledger.admit(&alice, Instant::now()).unwrap());
        ledger.charge(&alice, 900, 0.0, Instant::now(), Instant::now());
        let refused = ledger.admit(&alice, Instant::now()).unwrap_err();
        assert_eq!(refused.limit, "tokens");
        assert!(
            refused.message.contains("1000 tokens per 5h"),
            "{}",
            refused.message
        );
        // 1,500 used; the first 600 leave the window 4 h from now: still 900 < 1,000 after that.
        assert_eq!(refused.retry_after, Duration::from_secs(4 * 3600));
        advance(Duration::from_secs(4 * 3600 - 1)).await;
        assert!(ledger.admit(&alice, Instant::now()).is_err());
        advance(Duration::from_secs(1)).await;
        assert!(ledger.admit(&alice, Instant::now()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn every_window_length_rolls_off_after_its_length() {
        for window in Window::ALL {
            let ledger = Arc::new(Ledger::default());
            let alice = client(Limits {
                budget_usd: Some(WindowLimit { window, max: 1.0 }),
                ..Limits::default()
            });
            ledger.charge(&alice, 0, 1.5, Instant::now(), Instant::now());
            let refused = ledger.admit(&alice, Instant::now()).unwrap_err();
            assert_eq!(refused.limit, "budget_usd");
            assert!(refused.message.contains(window.as_str()));
            // The spend leaves the window when its bucket does: within the window's length.
            assert!(refused.retry_after <= window.duration(), "{window:?}");
            assert!(
                refused.retry_after >= window.duration() - window.duration() / 60,
                "{window:?}"
            );
            advance(refused.retry_after - Duration::from_millis(1)).await;
            assert!(ledger.admit(&alice, Instant::now()).is_err(), "{window:?}");
            advance(Duration::from_millis(1)).await;
            assert!(ledger.admit(&alice, Instant::now()).is_ok(), "{window:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn usage_made_before_now_is_charged_to_its_own_time() {
        let ledger = Arc::new(Ledger::default());
        let alice = client(Limits {
            tokens: Some(WindowLimit {
                window: Window::Hour,
                max: 100.0,
            }),
            ..Limits::default()
        });
        advance(Duration::from_secs(7200)).await;
        let now = Instant::now();
        // Made 50 minutes ago (a request read back from the usage file after a restart).
        ledger.charge(&alice, 150, 0.0, now, now - Duration::from_secs(50 * 60));
        // And one older than the window: ignored.
        ledger.charge(&alice, 1000, 0.0, now, now - Duration::from_secs(2 * 3600));
        let uses = ledger.use_of(&alice, now);
        assert_eq!(uses[0].used, 150.0);
        let refused = ledger.admit(&alice, now).unwrap_err();
        assert!(
            refused.retry_after <= Duration::from_secs(10 * 60),
            "{:?}",
            refused.retry_after
        );
        assert!(
            refused.retry_after >= Duration::from_secs(9 * 60),
            "{:?}",
            refused.retry_after
        );
    }
}
