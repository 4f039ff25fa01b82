//! Session affinity: a Claude Code session goes back to the provider that served it last (per route),
//! which keeps that provider's prompt cache warm. Entries expire after `sticky_provider_duration`.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// Above this many sessions, expired entries are swept on insert; the map never grows without bound.
const MAX_SESSIONS: usize = 10_000;

#[derive(Debug, Default)]
pub struct AffinityBook {
    map: Mutex<HashMap<(String, String), (String, Instant)>>,
}

impl AffinityBook {
    /// The provider that last served `session` on `route`, if that was less than `ttl` ago.
    pub fn get(&self, session: &str, route: &str, now: Instant) -> Option<String> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&(session.to_owned(), route.to_owned()))
            .filter(|(_, expires)| *expires > now)
            .map(|(p, _)| p.clone())
    }

    /// Drops every expired entry (run on a timer, so a burst of sessions does not stay resident
    /// until the map fills).
    pub fn sweep(&self, now: Instant) -> usize {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let before = map.len();
        map.retain(|_, (_, expires)| *expires > now);
        before - map.len()
    }

    /// How many sessions are remembered.
    pub fn len(&self) -> usize {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn set(&self, session: &str, route: &str, provider: &str, now: Instant, ttl: Duration) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (_, expires)| *expires > now);
            if map.len() >= MAX_SESSIONS {
                map.clear();
            }
        }
        map.insert(
            (session.to_owned(), route.to_owned()),
            (provider.to_owned(), now + ttl),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn expired_sessions_are_swept() {
        let book = AffinityBook::default();
        let now = Instant::now();
        book.set("s1", "*", "A", now, Duration::from_secs(10));
        book.set("s2", "*", "B", now, Duration::from_secs(100));
        assert_eq!(book.get("s1", "*", now), Some("A".into()));
        tokio::time::advance(Duration::from_secs(11)).await;
        let later = Instant::now();
        assert_eq!(book.get("s1", "*", later), None);
        assert_eq!(book.sweep(later), 1);
        assert_eq!(book.len(), 1);
        assert_eq!(book.get("s2", "*", later), Some("B".into()));
    }
}
