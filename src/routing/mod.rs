//! Routing: which providers may serve a model name, and in which order to try them.
//!
//! Pure decisions, no I/O: [`RouteTable::plan`] turns a model name plus the health book and the
//! session's affinity into an ordered list of [`Candidate`]s. Only the dispatcher acts on it.

pub mod affinity;
pub mod health;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use regex::Regex;
use tokio::time::Instant;

use crate::config::{ModelMapping, RouteConfig, RouteEntry, Strategy};
use crate::upstream::Provider;
use health::HealthBook;

/// One provider chosen for one request, with the model name to send it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub provider: Arc<Provider>,
    /// The model name sent upstream.
    pub upstream_model: String,
    /// Whether `upstream_model` is the client's own name (`model: passthrough`).
    pub passthrough: bool,
    pub priority: i64,
    /// The route (pattern as written) this candidate came from.
    pub route: Arc<str>,
}

/// The ordered candidates for one request.
#[derive(Debug)]
pub struct Plan {
    /// The first matching route's pattern: the request's route for logs and affinity.
    pub route: Arc<str>,
    pub candidates: Vec<Candidate>,
}

#[derive(Debug)]
enum Matcher {
    /// Lower-cased exact name.
    Exact(String),
    Glob(Regex),
}

#[derive(Debug)]
struct Tier {
    priority: i64,
    /// Indices into the route's entries, in file order.
    entries: Vec<usize>,
    next: AtomicUsize,
}

#[derive(Debug)]
struct Route {
    pattern: Arc<str>,
    matcher: Matcher,
    entries: Vec<RouteEntry>,
    tiers: Vec<Tier>,
}

/// The compiled `model_routes`.
#[derive(Debug)]
pub struct RouteTable {
    /// Exact routes first (in file order), then glob routes (in file order).
    routes: Vec<Route>,
}

/// Translates a pattern with `*` and `?` into an anchored, case-insensitive regex.
fn glob_regex(pattern: &str) -> Option<Regex> {
    let mut re = String::with_capacity(pattern.len() + 8);
    re.push_str("(?is)^");
    for c in pattern.chars() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            c => re.push_str(&regex::escape(c.encode_utf8(&mut [0; 4]))),
        }
    }
    re.push('$');
    Regex::new(&re).ok()
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig]) -> Self {
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for rc in routes {
            let entries: Vec<RouteEntry> = rc.entries.clone();
            let mut tiers: Vec<Tier> = Vec::new();
            for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.enabled) {
                match tiers.iter_mut().find(|t| t.priority == e.priority) {
                    Some(t) => t.entries.push(i),
                    None => tiers.push(Tier {
                        priority: e.priority,
                        entries: vec![i],
                        next: AtomicUsize::new(0),
                    }),
                }
            }
            tiers.sort_by_key(|t| t.priority);
            let pattern: Arc<str> = Arc::from(rc.pattern.as_str());
            if rc.pattern.contains(['*', '?']) {
                // glob_regex escapes everything else, so it always compiles; a failure would only drop the route.
                if let Some(re) = glob_regex(&rc.pattern) {
                    globs.push(Route {
                        pattern,
                        matcher: Matcher::Glob(re),
                        entries,
                        tiers,
                    });
                }
            } else {
                exact.push(Route {
                    pattern,
                    matcher: Matcher::Exact(rc.pattern.to_lowercase()),
                    entries,
                    tiers,
                });
            }
        }
        exact.extend(globs);
        Self { routes: exact }
    }

    fn matching<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        let lower = model.to_lowercase();
        self.routes.iter().filter(move |r| match &r.matcher {
            Matcher::Exact(name) => *name == lower,
            Matcher::Glob(re) => re.is_match(model),
        })
    }

    /// The patterns that match `model`, first match first.
    pub fn matching_patterns(&self, model: &str) -> Vec<Arc<str>> {
        self.matching(model)
            .map(|r| Arc::clone(&r.pattern))
            .collect()
    }

    /// Orders the candidates for one request. `None` when no route matches.
    pub fn plan(&self, model: &str, ctx: &PlanContext<'_>) -> Option<Plan> {
        let mut routes = self.matching(model).peekable();
        let route_name = Arc::clone(&routes.peek()?.pattern);
        let mut ordered: Vec<Candidate> = Vec::new();
        for route in routes {
            for tier in &route.tiers {
                let mut idx: Vec<usize> = tier
                    .entries
                    .iter()
                    .copied()
                    .filter(|&i| {
                        let name = route.entries[i].provider.as_str();
                        ctx.providers.get(name).is_some_and(|p| p.config.usable())
                            && !ordered.iter().any(|c| c.provider.config.name == name)
                    })
                    .collect();
                order_tier(&mut idx, tier, route, ctx);
                for i in idx {
                    let entry = &route.entries[i];
                    // Filtered above: the provider exists and is usable.
                    let Some(provider) = ctx.providers.get(entry.provider.as_str()) else {
                        continue;
                    };
                    if ordered
                        .iter()
                        .any(|c| c.provider.config.name == entry.provider)
                    {
                        continue; // the same provider twice in one tier
                    }
                    let (upstream_model, passthrough) = match &entry.model {
                        ModelMapping::Passthrough => (model.to_owned(), true),
                        ModelMapping::Name(n) => (n.clone(), false),
                    };
                    ordered.push(Candidate {
                        provider: Arc::clone(provider),
                        upstream_model,
                        passthrough,
                        priority: entry.priority,
                        route: Arc::clone(&route.pattern),
                    });
                }
            }
        }
        // Providers cooling down go last, soonest to recover first; the order is otherwise kept.
        let standings: Vec<_> = ordered
            .iter()
            .map(|c| ctx.health.standing(&c.provider.config.name, ctx.now))
            .collect();
        let mut keyed: Vec<(usize, Candidate)> = ordered.into_iter().enumerate().collect();
        keyed.sort_by_key(|(i, _)| {
            let s = standings[*i];
            if s.available {
                (0, std::time::Duration::ZERO, *i)
            } else {
                (1, s.remaining, *i)
            }
        });
        let candidates: Vec<Candidate> = keyed.into_iter().map(|(_, c)| c).collect();
        Some(Plan {
            route: route_name,
            candidates,
        })
    }
}

/// What [`RouteTable::plan`] needs besides the model name.
pub struct PlanContext<'a> {
    pub providers: &'a HashMap<String, Arc<Provider>>,
    pub health: &'a HealthBook,
    pub strategy: Strategy,
    pub now: Instant,
}

impl Plan {
    /// Moves the named provider to the front (session affinity, the client's `provider` field).
    /// Returns whether it was among the candidates.
    pub fn promote(&mut self, provider: &str) -> bool {
        match self
            .candidates
            .iter()
            .position(|c| c.provider.config.name == provider)
        {
            Some(pos) => {
                let c = self.candidates.remove(pos);
                self.candidates.insert(0, c);
                true
            }
            None => false,
        }
    }
}

fn order_tier(idx: &mut [usize], tier: &Tier, route: &Route, ctx: &PlanContext<'_>) {
    let n = idx.len();
    if n < 2 {
        return;
    }
    match ctx.strategy {
        Strategy::Priority => {}
        Strategy::RoundRobin => {
            let start = tier.next.fetch_add(1, Ordering::Relaxed) % n;
            idx.rotate_left(start);
        }
        Strategy::Random => fastrand::shuffle(idx),
        Strategy::Weighted => {
            // Weighted order without replacement: each pick is proportional to the remaining weights.
            for pos in 0..n {
                let weights: Vec<u64> = idx[pos..]
                    .iter()
                    .map(|&i| u64::from(route.entries[i].weight))
                    .collect();
                let total: u64 = weights.iter().sum();
                if total == 0 {
                    break;
                }
                let mut r = fastrand::u64(0..total);
                let mut chosen = 0;
                for (k, w) in weights.iter().enumerate() {
                    if r < *w {
                        chosen = k;
                        break;
                    }
                    r -= w;
                }
                idx.swap(pos, pos + chosen);
            }
        }
        Strategy::LeastLatency => {
            // Unmeasured providers first (so they get measured), then the fastest moving average.
            let key = |i: &usize| {
                let name = route.entries[*i].provider.as_str();
                ctx.health
                    .standing(name, ctx.now)
                    .ttfb_ewma_ms
                    .unwrap_or(-1.0)
            };
            idx.sort_by(|a, b| key(a).total_cmp(&key(b)));
        }
    }
}
