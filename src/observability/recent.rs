//! The last minutes of traffic, for the dashboard: per-10-second buckets of requests, errors and
//! tokens, latency samples for percentiles, and the most recent failovers.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde::Serialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::Record;
use crate::dispatch::{AttemptOutcome, FaultClass};

/// Width of one bucket.
pub const BUCKET: Duration = Duration::from_secs(10);
/// How far back the dashboard looks.
pub const WINDOW: Duration = Duration::from_secs(15 * 60);
const MAX_SAMPLES: usize = 20_000;
const MAX_FAILOVERS: usize = 50;

#[derive(Debug, Clone, Copy, Default, Serialize)]
struct Bucket {
    requests: u64,
    errors: u64,
    input_tokens: u64,
    output_tokens: u64,
}

#[derive(Debug, Clone, Serialize)]
struct Failover {
    time: String,
    request_id: String,
    model: String,
    failed: Vec<String>,
    served_by: Option<String>,
    status: u16,
}

#[derive(Debug)]
struct Inner {
    started: Instant,
    /// (bucket number since `started`, counts)
    buckets: VecDeque<(u64, Bucket)>,
    /// (when, time to first byte ms, total ms)
    samples: VecDeque<(Instant, f64, f64)>,
    failovers: VecDeque<Failover>,
}

#[derive(Debug)]
pub struct Recent {
    inner: Mutex<Inner>,
    total: std::sync::atomic::AtomicU64,
}

impl Default for Recent {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Inner {
                started: Instant::now(),
                buckets: VecDeque::new(),
                samples: VecDeque::new(),
                failovers: VecDeque::new(),
            }),
            total: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    Some((sorted[i.min(sorted.len() - 1)] * 10.0).round() / 10.0)
}

impl Recent {
    /// Requests finished since start.
    pub fn total(&self) -> u64 {
        self.total.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn record(&self, r: &Record, ttfb: Option<Duration>, total: Duration) {
        self.total
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let now = Instant::now();
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = now.saturating_duration_since(inner.started).as_secs() / BUCKET.as_secs();
        match inner.buckets.back_mut() {
            Some((k, _)) if *k == n => {}
            _ => inner.buckets.push_back((n, Bucket::default())),
        }
        let keep = WINDOW.as_secs() / BUCKET.as_secs();
        while inner.buckets.front().is_some_and(|(k, _)| *k + keep < n) {
            inner.buckets.pop_front();
        }
        if let Some((_, b)) = inner.buckets.back_mut() {
            b.requests += 1;
            if r.status >= 400 || r.status == 0 {
                b.errors += 1;
            }
            b.input_tokens += r.usage.input_tokens
                + r.usage.cache_read_input_tokens
                + r.usage.cache_creation_input_tokens;
            b.output_tokens += r.usage.output_tokens;
        }
        if let Some(t) = ttfb {
            inner
                .samples
                .push_back((now, t.as_secs_f64() * 1000.0, total.as_secs_f64() * 1000.0));
            while inner.samples.len() > MAX_SAMPLES
                || inner
                    .samples
                    .front()
                    .is_some_and(|(t, _, _)| now.saturating_duration_since(*t) > WINDOW)
            {
                inner.samples.pop_front();
            }
        }
        let failed: Vec<String> = r
            .attempts
            .iter()
            .filter(|a| a.outcome == AttemptOutcome::Fault)
            .map(|a| {
                let class = a.class.unwrap_or(FaultClass::Other);
                format!("{} ({})", a.provider, class.as_str())
            })
            .collect();
        if !failed.is_empty() {
            inner.failovers.push_back(Failover {
                time: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                request_id: r.id.clone(),
                model: r.model.clone(),
                failed,
                served_by: r.provider.clone(),
                status: r.status,
            });
            while inner.failovers.len() > MAX_FAILOVERS {
                inner.failovers.pop_front();
            }
        }
    }

    /// Buckets (oldest first, empty ones filled in), percentiles over the window, failovers (newest first).
    pub fn snapshot(&self) -> Value {
        let now = Instant::now();
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let n = now.saturating_duration_since(inner.started).as_secs() / BUCKET.as_secs();
        let keep = WINDOW.as_secs() / BUCKET.as_secs();
        let first = n.saturating_sub(keep - 1);
        let series: Vec<Bucket> = (first..=n)
            .map(|k| {
                inner
                    .buckets
                    .iter()
                    .find(|(b, _)| *b == k)
                    .map(|(_, b)| *b)
                    .unwrap_or_default()
            })
            .collect();
        let mut ttfb: Vec<f64> = inner.samples.iter().map(|s| s.1).collect();
        let mut total: Vec<f64> = inner.samples.iter().map(|s| s.2).collect();
        ttfb.sort_by(f64::total_cmp);
        total.sort_by(f64::total_cmp);
        json!({
            "bucket_seconds": BUCKET.as_secs(),
            "series": series,
            "latency_ms": {
                "ttfb": {"p50": percentile(&ttfb, 0.5), "p90": percentile(&ttfb, 0.9), "p99": percentile(&ttfb, 0.99)},
                "total": {"p50": percentile(&total, 0.5), "p90": percentile(&total, 0.9), "p99": percentile(&total, 0.99)},
                "samples": ttfb.len(),
            },
            "failovers": inner.failovers.iter().rev().collect::<Vec<_>>(),
        })
    }
}
