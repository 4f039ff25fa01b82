//! The key book: the state of each key of each provider's key pool (`auth_value` as a list, or
//! `keys:`), kept across reloads like the health book.
//!
//! A key *rests* after a 429, 401, 402 or 403 (for the provider's `retry-after`, else the
//! cooldown), or when the provider's rate-limit headers say it is exhausted (until their reset),
//! while the pool's other keys keep serving. A Claude Code session sticks to one key of a provider
//! (prompt caches are per account) while that key is available.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use http::HeaderMap;
use tokio::time::Instant;

use crate::config::PoolKey;

/// The most sessions whose key is remembered at once (as the affinity book).
const MAX_STICKY: usize = 10_000;

/// The statuses that rest a key rather than count against its provider.
pub const KEY_STATUSES: [u16; 4] = [401, 402, 403, 429];

#[derive(Debug, Default, Clone)]
struct KeyState {
    resting_until: Option<Instant>,
    reason: Option<String>,
    /// The last rate-limit figures the provider reported for this key.
    requests_remaining: Option<u64>,
    tokens_remaining: Option<u64>,
    reset: Option<SystemTime>,
    uses: u64,
}

/// A key as `/providers` shows it (its value is masked by the caller).
#[derive(Debug, Clone)]
pub struct KeyReport {
    pub name: String,
    pub resting: Duration,
    pub reason: Option<String>,
    pub requests_remaining: Option<u64>,
    pub tokens_remaining: Option<u64>,
    pub reset: Option<SystemTime>,
    pub uses: u64,
}

#[derive(Debug, Default)]
pub struct KeyBook {
    /// (provider, key name) → state.
    keys: Mutex<HashMap<(String, String), KeyState>>,
    /// (session, provider) → the key the session used, until when.
    sticky: Mutex<HashMap<(String, String), (String, Instant)>>,
    /// Each provider's turn.
    next: Mutex<HashMap<String, usize>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl KeyBook {
    fn available(
        map: &HashMap<(String, String), KeyState>,
        provider: &str,
        key: &str,
        now: Instant,
    ) -> bool {
        map.get(&(provider.to_owned(), key.to_owned()))
            .and_then(|k| k.resting_until)
            .is_none_or(|until| until <= now)
    }

    /// The key for the next attempt on `provider` (index into `keys`), skipping `tried` ones: the
    /// session's key while it is available, else the next available key in turn, else (every key
    /// resting) the one that wakes first. `None` when every key was tried.
    pub fn choose(
        &self,
        provider: &str,
        keys: &[PoolKey],
        session: Option<&str>,
        tried: &[usize],
        now: Instant,
    ) -> Option<usize> {
        let map = lock(&self.keys);
        let untried = |i: &usize| !tried.contains(i);
        if let Some(session) = session {
            let sticky = lock(&self.sticky);
            if let Some((name, until)) = sticky.get(&(session.to_owned(), provider.to_owned())) {
                if *until > now {
                    if let Some(i) = keys.iter().position(|k| &k.name == name) {
                        if untried(&i) && Self::available(&map, provider, name, now) {
                            return Some(i);
                        }
                    }
                }
            }
        }
        let n = keys.len();
        let start = {
            let mut next = lock(&self.next);
            let turn = next.entry(provider.to_owned()).or_default();
            *turn = turn.wrapping_add(1);
            *turn % n.max(1)
        };
        let in_turn = (0..n).map(|k| (start + k) % n).filter(untried);
        if let Some(i) = in_turn
            .clone()
            .find(|i| Self::available(&map, provider, &keys[*i].name, now))
        {
            return Some(i);
        }
        // Every untried key rests: the one that wakes first.
        in_turn.min_by_key(|i| {
            map.get(&(provider.to_owned(), keys[*i].name.clone()))
                .and_then(|k| k.resting_until)
        })
    }

    /// Whether some key of the pool other than those `tried` is available now.
    pub fn another_available(
        &self,
        provider: &str,
        keys: &[PoolKey],
        tried: &[usize],
        now: Instant,
    ) -> bool {
        let map = lock(&self.keys);
        keys.iter()
            .enumerate()
            .any(|(i, k)| !tried.contains(&i) && Self::available(&map, provider, &k.name, now))
    }

    /// The session used `key` of `provider`: later requests of the session prefer it for `ttl`.
    pub fn stick(&self, session: &str, provider: &str, key: &str, now: Instant, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let mut sticky = lock(&self.sticky);
        if sticky.len() >= MAX_STICKY {
            sticky.retain(|_, (_, until)| *until > now);
            if sticky.len() >= MAX_STICKY {
                // Full of live sessions: this one goes without a preferred key.
                return;
            }
        }
        sticky.insert(
            (session.to_owned(), provider.to_owned()),
            (key.to_owned(), now + ttl),
        );
    }

    /// Counts one attempt with `key`.
    pub fn used(&self, provider: &str, key: &str) {
        lock(&self.keys)
            .entry((provider.to_owned(), key.to_owned()))
            .or_default()
            .uses += 1;
    }

    /// Rests `key` of `provider` until `until`.
    pub fn rest(&self, provider: &str, key: &str, until: Instant, reason: String) {
        let mut map = lock(&self.keys);
        let k = map
            .entry((provider.to_owned(), key.to_owned()))
            .or_default();
        k.resting_until = Some(k.resting_until.map_or(until, |u| u.max(until)));
        k.reason = Some(reason);
    }

    /// Reads Anthropic's rate-limit headers of an answer made with `key`: the remaining requests
    /// and tokens are kept for `/providers`, and a key reported exhausted (a remaining count of 0,
    /// or a unified status `rejected`) rests until the reset the headers give.
    pub fn observe(&self, provider: &str, key: &str, headers: &HeaderMap, now: Instant) {
        let number = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        let time = |name: &str| {
            headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .and_then(reset_time)
        };
        let requests = number("anthropic-ratelimit-requests-remaining");
        let tokens = [
            "anthropic-ratelimit-tokens-remaining",
            "anthropic-ratelimit-input-tokens-remaining",
            "anthropic-ratelimit-output-tokens-remaining",
        ]
        .into_iter()
        .filter_map(number)
        .min();
        let unified_rejected = headers
            .get("anthropic-ratelimit-unified-status")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("rejected"));
        if requests.is_none() && tokens.is_none() && !unified_rejected {
            return;
        }
        let mut exhausted: Vec<SystemTime> = Vec::new();
        if requests == Some(0) {
            exhausted.extend(time("anthropic-ratelimit-requests-reset"));
        }
        if tokens == Some(0) {
            exhausted.extend(
                [
                    "anthropic-ratelimit-tokens-reset",
                    "anthropic-ratelimit-input-tokens-reset",
                    "anthropic-ratelimit-output-tokens-reset",
                ]
                .into_iter()
                .filter_map(time),
            );
        }
        if unified_rejected {
            exhausted.extend(time("anthropic-ratelimit-unified-reset"));
        }
        let reset = exhausted.iter().max().copied().or_else(|| {
            time("anthropic-ratelimit-requests-reset")
                .or_else(|| time("anthropic-ratelimit-tokens-reset"))
        });
        let mut map = lock(&self.keys);
        let k = map
            .entry((provider.to_owned(), key.to_owned()))
            .or_default();
        k.requests_remaining = requests.or(k.requests_remaining);
        k.tokens_remaining = tokens.or(k.tokens_remaining);
        k.reset = reset;
        if let Some(until) = exhausted.iter().max() {
            let wait = until.duration_since(SystemTime::now()).unwrap_or_default();
            if !wait.is_zero() {
                let until = now + wait;
                k.resting_until = Some(k.resting_until.map_or(until, |u| u.max(until)));
                k.reason = Some("the provider reported this key's quota exhausted".to_owned());
            }
        }
    }

    /// Each key of a pool, in order, for `/providers`.
    pub fn report(&self, provider: &str, keys: &[PoolKey], now: Instant) -> Vec<KeyReport> {
        let map = lock(&self.keys);
        keys.iter()
            .map(|k| {
                let s = map
                    .get(&(provider.to_owned(), k.name.clone()))
                    .cloned()
                    .unwrap_or_default();
                let resting = s
                    .resting_until
                    .map_or(Duration::ZERO, |u| u.saturating_duration_since(now));
                KeyReport {
                    name: k.name.clone(),
                    resting,
                    reason: (!resting.is_zero()).then_some(s.reason).flatten(),
                    requests_remaining: s.requests_remaining,
                    tokens_remaining: s.tokens_remaining,
                    reset: s.reset,
                    uses: s.uses,
                }
            })
            .collect()
    }

    /// Forgets expired session preferences.
    pub fn sweep(&self, now: Instant) {
        lock(&self.sticky).retain(|_, (_, until)| *until > now);
    }
}

/// The latest reset a key may rest until: a later one is taken for a mistake.
const MAX_RESET: Duration = Duration::from_secs(7 * 86_400);

/// A reset time as Anthropic sends it: RFC 3339, or Unix seconds (the unified headers); `None`
/// when it is not one, or more than [`MAX_RESET`] away.
fn reset_time(v: &str) -> Option<SystemTime> {
    let v = v.trim();
    let at = match v.parse::<u64>() {
        Ok(secs) => SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))?,
        Err(_) => humantime::parse_rfc3339_weak(v).ok()?,
    };
    let latest = SystemTime::now().checked_add(MAX_RESET)?;
    (at <= latest).then_some(at)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::Auth;
    use crate::secret::Secret;
    use tokio::time::advance;

    fn pool() -> Vec<PoolKey> {
        ["k1", "k2", "k3"]
            .into_iter()
            .map(|n| PoolKey {
                name: n.into(),
                auth: Auth::ApiKey(Secret::new(format!("value-{n}"))),
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn a_resting_key_is_skipped_until_its_rest_ends() {
        let book = KeyBook::default();
        let keys = pool();
        book.rest(
            "P",
            "k1",
            Instant::now() + Duration::from_secs(30),
            "429".into(),
        );
        for _ in 0..6 {
            let i = book.choose("P", &keys, None, &[], Instant::now()).unwrap();
            assert_ne!(keys[i].name, "k1");
        }
        assert!(book.another_available("P", &keys, &[1], Instant::now()));
        let r = book.report("P", &keys, Instant::now());
        assert_eq!(r[0].resting, Duration::from_secs(30));
        assert_eq!(r[0].reason.as_deref(), Some("429"));
        advance(Duration::from_secs(30)).await;
        let chosen: Vec<usize> = (0..3)
            .map(|_| book.choose("P", &keys, None, &[], Instant::now()).unwrap())
            .collect();
        assert!(chosen.contains(&0), "{chosen:?}");
        assert_eq!(
            book.report("P", &keys, Instant::now())[0].resting,
            Duration::ZERO
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_sticks_to_its_key_while_it_is_available() {
        let book = KeyBook::default();
        let keys = pool();
        book.stick("s1", "P", "k3", Instant::now(), Duration::from_secs(300));
        for _ in 0..5 {
            assert_eq!(
                book.choose("P", &keys, Some("s1"), &[], Instant::now()),
                Some(2)
            );
        }
        // Tried already in this request, or resting: another key.
        assert_ne!(
            book.choose("P", &keys, Some("s1"), &[2], Instant::now()),
            Some(2)
        );
        book.rest(
            "P",
            "k3",
            Instant::now() + Duration::from_secs(5),
            "429".into(),
        );
        assert_ne!(
            book.choose("P", &keys, Some("s1"), &[], Instant::now()),
            Some(2)
        );
        advance(Duration::from_secs(5)).await;
        assert_eq!(
            book.choose("P", &keys, Some("s1"), &[], Instant::now()),
            Some(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn when_every_key_rests_the_first_to_wake_is_chosen_and_none_after_all_were_tried() {
        let book = KeyBook::default();
        let keys = pool();
        let now = Instant::now();
        book.rest("P", "k1", now + Duration::from_secs(50), "a".into());
        book.rest("P", "k2", now + Duration::from_secs(10), "b".into());
        book.rest("P", "k3", now + Duration::from_secs(90), "c".into());
        assert!(!book.another_available("P", &keys, &[], now));
        assert_eq!(book.choose("P", &keys, None, &[], now), Some(1));
        assert_eq!(book.choose("P", &keys, None, &[0, 1, 2], now), None);
    }

    #[test]
    fn reset_times_further_than_a_week_are_not_believed() {
        assert!(reset_time("99999999999999").is_none());
        assert!(reset_time("18446744073709551615").is_none());
        assert!(reset_time("9999-12-31T00:00:00Z").is_none());
        let soon = SystemTime::now() + Duration::from_secs(60);
        let secs = soon
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(reset_time(&secs.to_string()).is_some());
        assert!(reset_time("not a time").is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn exhausted_rate_limit_headers_rest_the_key_until_their_reset() {
        let book = KeyBook::default();
        let keys = pool();
        let reset = humantime::format_rfc3339_seconds(SystemTime::now() + Duration::from_secs(40))
            .to_string();
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "0".parse().unwrap(),
        );
        h.insert("anthropic-ratelimit-requests-reset", reset.parse().unwrap());
        h.insert(
            "anthropic-ratelimit-tokens-remaining",
            "12000".parse().unwrap(),
        );
        book.observe("P", "k1", &h, Instant::now());
        let r = &book.report("P", &keys, Instant::now())[0];
        assert!(
            r.resting > Duration::from_secs(38) && r.resting <= Duration::from_secs(40),
            "{:?}",
            r.resting
        );
        assert_eq!(
            (r.requests_remaining, r.tokens_remaining),
            (Some(0), Some(12_000))
        );
        // Plenty left: no rest, figures kept.
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-requests-remaining",
            "49".parse().unwrap(),
        );
        book.observe("P", "k2", &h, Instant::now());
        let r = &book.report("P", &keys, Instant::now())[1];
        assert_eq!(
            (r.resting, r.requests_remaining),
            (Duration::ZERO, Some(49))
        );
        // A subscription's unified status: rejected until its reset (Unix seconds).
        let secs = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 3600;
        let mut h = HeaderMap::new();
        h.insert(
            "anthropic-ratelimit-unified-status",
            "rejected".parse().unwrap(),
        );
        h.insert(
            "anthropic-ratelimit-unified-reset",
            secs.to_string().parse().unwrap(),
        );
        book.observe("P", "k3", &h, Instant::now());
        let r = &book.report("P", &keys, Instant::now())[2];
        assert!(r.resting > Duration::from_secs(3590), "{:?}", r.resting);
    }
}
