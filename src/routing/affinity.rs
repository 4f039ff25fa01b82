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

fn key(session: &str, route: &str) -> Key {
    let mut h = Xxh3::new();
    h.update(session.as_bytes());
    h.update(&[0]);
    h.update(route.as_bytes());
    h.digest128()
}

#[derive(Debug, Default)]
pub struct AffinityBook {
    map: Mutex<HashMap<Key, (Arc<str>, Instant)>>,
}

impl AffinityBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, (Arc<str>, Instant)>> {
        self.map.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The provider that last served `session` on `route`, if that was less than `ttl` ago.
    pub fn get(&self, session: &str, route: &str, now: Instant) -> Option<Arc<str>> {
        self.lock()
            .get(&key(session, route))
            .filter(|(_, expires)| *expires > now)
            .map(|(p, _)| Arc::clone(p))
    }

    pub fn set(
        &self,
        session: &str,
        route: &str,
        provider: &Arc<str>,
        now: Instant,
        ttl: Duration,
    ) {
        let k = key(session, route);
        let mut map = self.lock();
        if let Some(entry) = map.get_mut(&k) {
            // The common case: the session's provider again; nothing to allocate.
            if !Arc::ptr_eq(&entry.0, provider) {
                entry.0 = Arc::clone(provider);
            }
            entry.1 = now + ttl;
            return;
        }
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (_, expires)| *expires > now);
            if map.len() >= MAX_SESSIONS {
                map.clear();
            }
        }
        map.insert(k, (Arc::clone(provider), now + ttl));
    }

    /// Drops every expired entry (run on a timer, so a burst of sessions does not stay resident
    /// until the map fills).
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.lock();
        let before = map.len();
        map.retain(|_, (_, expires)| *expires > now);
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
}
