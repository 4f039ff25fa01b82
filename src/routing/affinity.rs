//! Session affinity: a Claude Code session goes back to the provider that served it last (per route),
//! which keeps that provider's prompt cache warm. Entries expire after `sticky_provider_duration`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;
use xxhash_rust::xxh3::Xxh3;

/// Above this many sessions, expired entries are swept on insert; the map never grows without bound.
const MAX_SESSIONS: usize = 10_000;

/// Session and route, hashed: looking a session up allocates nothing (a 128-bit hash; a collision
/// would only mean a preference, checked for health like any other).
type Key = u128;

/// The key of a session on a route (also its name in the shared state, as hex).
pub fn key(session: &str, route: &str) -> Key {
    let mut h = Xxh3::new();
    h.update(session.as_bytes());
    h.update(&[0]);
    h.update(route.as_bytes());
    h.digest128()
}

/// A session's provider, when the entry expires here, and until when the shared state (if any)
/// was told of it.
type Entry = (Arc<str>, Instant, Instant);

/// What the shared state (if any) should hear after [`AffinityBook::set`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Share {
    /// Nothing: it knows.
    No,
    /// The session and its provider, with a fresh expiry: new here, or half its time to live
    /// gone since it was last told.
    Refresh,
    /// The session left another provider: instances holding it must follow.
    Moved,
}

#[derive(Debug, Default)]
pub struct AffinityBook {
    map: Mutex<HashMap<Key, Entry>>,
}

impl AffinityBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Entry>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The provider that last served `session` on `route`, if that was less than `ttl` ago.
    pub fn get(&self, session: &str, route: &str, now: Instant) -> Option<Arc<str>> {
        self.lock()
            .get(&key(session, route))
            .filter(|(_, expires, _)| *expires > now)
            .map(|(p, _, _)| Arc::clone(p))
    }

    /// Remembers `provider` for `session` on `route` for `ttl`, and says what the shared state
    /// should hear of it (so that its expiry there keeps up without a write per request).
    pub fn set(
        &self,
        session: &str,
        route: &str,
        provider: &Arc<str>,
        now: Instant,
        ttl: Duration,
    ) -> Share {
        let k = key(session, route);
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&k) {
            // The common case: the session's provider again; nothing to allocate.
            let changed = !Arc::ptr_eq(&entry.0, provider) && *entry.0 != **provider;
            if changed {
                entry.0 = Arc::clone(provider);
            }
            entry.1 = now + ttl;
            let share = if changed {
                Share::Moved
            } else if entry.2 < now + ttl / 2 {
                Share::Refresh
            } else {
                Share::No
            };
            if share != Share::No {
                entry.2 = now + ttl;
            }
            return share;
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (_, expires, _)| *expires > now);
            if map.len() >= MAX_SESSIONS {
                map.clear();
            }
        }
        map.insert(k, (Arc::clone(provider), now + ttl, now + ttl));
        Share::Refresh
    }

    /// Another instance moved a session (by its key) to `provider`: an entry held here follows,
    /// keeping its expiry; an unknown key is ignored (a lookup finds it when needed).
    pub fn moved(&self, key: Key, provider: &Arc<str>) -> bool {
        match self.lock().get_mut(&key) {
            Some(entry) if *entry.0 != **provider => {
                entry.0 = Arc::clone(provider);
                true
            }
            _ => false,
        }
    }

    /// Drops every expired entry (run on a timer, so a burst of sessions does not stay resident
    /// until the map fills).
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, (_, expires, _)| *expires > now);
        before - map.len()
    }

    /// How many sessions are remembered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expired_sessions_are_swept() {
        let book = AffinityBook::default();
        let now = Instant::now();
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("A"), Arc::from("B"));
        book.set("s1", "*", &a, now, Duration::from_secs(10));
        book.set("s2", "*", &b, now, Duration::from_secs(100));
        assert_eq!(book.get("s1", "*", now), Some(Arc::clone(&a)));
        assert_eq!(book.get("s1", "other-route", now), None);
        tokio::time::advance(Duration::from_secs(11)).await;
        let later = Instant::now();
        assert_eq!(book.get("s1", "*", later), None);
        assert_eq!(book.sweep(later), 1);
        assert_eq!(book.len(), 1);
        assert_eq!(book.get("s2", "*", later), Some(b));
    }

    /// `set` says when the shared state should hear of a session: new, moved, or half its time
    /// to live since it was last told; not on every request.
    #[tokio::test(start_paused = true)]
    async fn set_tells_the_shared_state_only_what_changed_or_is_due() {
        let book = AffinityBook::default();
        let ttl = Duration::from_secs(100);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("A"), Arc::from("B"));
        let set = |p: &Arc<str>| book.set("s", "*", p, Instant::now(), ttl);
        assert_eq!(set(&a), Share::Refresh, "a new session");
        tokio::time::advance(Duration::from_secs(10)).await;
        assert_eq!(set(&a), Share::No, "the same provider, soon after");
        // Another Arc with the same name is the same provider (a reload makes new Arcs).
        let a2: Arc<str> = Arc::from("A");
        assert_eq!(set(&a2), Share::No);
        assert_eq!(set(&b), Share::Moved, "another provider");
        // A request every 10 s: the shared state hears again once half the time to live has
        // passed since it was last told, however often the session is used meanwhile.
        let mut told = Vec::new();
        for _ in 0..6 {
            tokio::time::advance(Duration::from_secs(10)).await;
            told.push(set(&b));
        }
        use Share::{No, Refresh};
        assert_eq!(
            told,
            [No, No, No, No, No, Refresh],
            "due past 50 s after being told"
        );
        // Moved elsewhere by another instance: a held entry follows, an unknown one is ignored.
        assert!(book.moved(key("s", "*"), &a));
        assert_eq!(book.get("s", "*", Instant::now()), Some(Arc::clone(&a)));
        assert!(!book.moved(key("s", "*"), &a), "already there");
        assert!(!book.moved(key("unknown", "*"), &a));
        assert_eq!(book.get("unknown", "*", Instant::now()), None);
    }
}
