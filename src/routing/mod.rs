//! Routing: which providers may serve a model name, and in which order to try them.
//!
//! Pure decisions, no I/O: [`RouteTable::plan`] turns a model name, the health book and the
//! selection strategy into an ordered list of [`Candidate`]s. Only the dispatcher acts on it; it
//! then moves the session's sticky provider and the body's `provider` field to the front with
//! [`Plan::promote`].

pub mod affinity;
pub mod fit;
pub mod health;
pub mod keys;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use regex::Regex;
use tokio::time::Instant;

use crate::config::{Capabilities, ModelConfig, ModelMapping, RouteConfig, RouteEntry, Strategy};
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
    /// What the upstream model can take: the entry's own statement, completed from the `models:`
    /// table and the shipped defaults when `resolved` (a mapped model: at load time), else by
    /// [`RouteTable::capabilities_of`] when a request needs it (passthrough: the name varies).
    pub caps: Capabilities,
    pub resolved: bool,
    /// The candidate's entry has `when:` conditions, and they hold.
    pub scenario: bool,
    /// The index of its entry in its route's entries (as written).
    pub entry: usize,
}

/// The ordered candidates for one request.
#[derive(Debug)]
pub struct Plan {
    /// The first matching route's pattern: the request's route for logs and affinity.
    pub route: Arc<str>,
    pub candidates: Vec<Candidate>,
    /// Entries left out because their `when:` conditions failed (only with `PlanContext::explain`):
    /// provider, route, the condition that failed.
    pub passed_over: Vec<(String, Arc<str>, String)>,
    /// How many entries their `when:` conditions left out.
    pub held_back: usize,
}

#[derive(Debug)]
enum Matcher {
    /// Lower-cased exact name.
    Exact(String),
    Glob(Regex),
}

#[derive(Debug)]
struct Tier {
    /// The tier's entries have `when:` conditions: such tiers come before the unconditional ones.
    scenario: bool,
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
    /// Per entry: its compiled `when:`.
    when: Vec<fit::When>,
    /// Per entry: its capabilities when its model is mapped (passthrough: looked up per request).
    caps: Vec<Option<Capabilities>>,
    tiers: Vec<Tier>,
}

/// The compiled `model_routes`.
#[derive(Debug)]
pub struct RouteTable {
    /// Exact routes first (in file order), then glob routes (in file order).
    routes: Vec<Route>,
    models: fit::ModelTable,
    /// The headers `when:` conditions read (and Claude Code's subagent id): part of the
    /// coalescing and cache key.
    routing_headers: Vec<http::HeaderName>,
    /// Some entry has a `min_input_tokens` condition.
    min_input: bool,
}

/// Translates a pattern with `*` and `?` into an anchored, case-insensitive regex.
fn glob_regex(pattern: &str) -> Option<Regex> {
    Regex::new(&glob_pattern(pattern)).ok()
}

/// The regex of a glob with `*` and `?`: anchored, case-insensitive, every other character
/// literal (route patterns, client model lists, pricing).
pub fn glob_pattern(pattern: &str) -> String {
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
    re
}

impl RouteTable {
    pub fn new(routes: &[RouteConfig], models: &[ModelConfig]) -> Self {
        let models = fit::ModelTable::new(models);
        let mut exact = Vec::new();
        let mut globs = Vec::new();
        for rc in routes {
            let entries: Vec<RouteEntry> = rc.entries.clone();
            let when: Vec<fit::When> = entries.iter().map(|e| fit::When::new(&e.when)).collect();
            let caps = entries
                .iter()
                .map(|e| match &e.model {
                    ModelMapping::Name(n) => Some(e.capabilities.or(models.lookup(n))),
                    ModelMapping::Passthrough => None,
                })
                .collect();
            let mut tiers: Vec<Tier> = Vec::new();
            for (i, e) in entries.iter().enumerate().filter(|(_, e)| e.enabled) {
                let scenario = !e.when.is_empty();
                match tiers
                    .iter_mut()
                    .find(|t| t.priority == e.priority && t.scenario == scenario)
                {
                    Some(t) => t.entries.push(i),
                    None => tiers.push(Tier {
                        scenario,
                        priority: e.priority,
                        entries: vec![i],
                        next: AtomicUsize::new(0),
                    }),
                }
            }
            // Scenario tiers (entries with `when:`) first, then by priority.
            tiers.sort_by_key(|t| (!t.scenario, t.priority));
            let pattern: Arc<str> = Arc::from(rc.pattern.as_str());
            if rc.pattern.contains(['*', '?']) {
                // glob_regex escapes everything else, so it always compiles; a failure would only drop the route.
                if let Some(re) = glob_regex(&rc.pattern) {
                    globs.push(Route {
                        pattern,
                        matcher: Matcher::Glob(re),
                        entries,
                        when,
                        caps,
                        tiers,
                    });
                }
            } else {
                exact.push(Route {
                    pattern,
                    matcher: Matcher::Exact(rc.pattern.to_lowercase()),
                    entries,
                    when,
                    caps,
                    tiers,
                });
            }
        }
        exact.extend(globs);
        let mut routing_headers = vec![http::HeaderName::from_static("x-claude-code-agent-id")];
        for rc in routes {
            for e in &rc.entries {
                for (name, _) in &e.when.header {
                    if let Ok(n) = http::HeaderName::from_bytes(name.as_bytes()) {
                        if !routing_headers.contains(&n) {
                            routing_headers.push(n);
                        }
                    }
                }
            }
        }
        let min_input = routes
            .iter()
            .flat_map(|r| &r.entries)
            .any(|e| e.when.min_input_tokens.is_some());
        Self {
            routes: exact,
            models,
            routing_headers,
            min_input,
        }
    }

    /// The headers that can change which entries serve a request.
    pub fn routing_headers(&self) -> &[http::HeaderName] {
        &self.routing_headers
    }

    /// The capabilities of an upstream model name (`models:`, then the shipped defaults).
    pub fn capabilities(&self, model: &str) -> Capabilities {
        self.models.lookup(model)
    }

    /// Whether any entry has a `min_input_tokens` condition (else a request need not look).
    pub fn has_min_input_conditions(&self) -> bool {
        self.min_input
    }

    /// The `min_input_tokens` conditions of the routes matching `model`.
    pub fn min_input_conditions<'a>(&'a self, model: &'a str) -> impl Iterator<Item = u64> + 'a {
        self.matching(model)
            .flat_map(|r| r.when.iter().filter_map(|w| w.conditions.min_input_tokens))
    }

    /// A candidate's capabilities, completed from the tables.
    pub fn capabilities_of(&self, c: &Candidate) -> Capabilities {
        if c.resolved {
            c.caps
        } else {
            c.caps.or(self.models.lookup(&c.upstream_model))
        }
    }

    fn matching<'a>(&'a self, model: &'a str) -> impl Iterator<Item = &'a Route> + 'a {
        let lower = model.to_lowercase();
        self.routes.iter().filter(move |r| match &r.matcher {
            Matcher::Exact(name) => *name == lower,
            Matcher::Glob(re) => re.is_match(model),
        })
    }

    /// Whether some route takes `model`.
    pub fn routes(&self, model: &str) -> bool {
        self.matching(model).next().is_some()
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
        let mut passed_over = Vec::new();
        let mut held_back = 0;
        for route in routes {
            for tier in &route.tiers {
                let mut idx: Vec<usize> = Vec::with_capacity(tier.entries.len());
                for &i in &tier.entries {
                    let name = route.entries[i].provider.as_str();
                    if !ctx.providers.get(name).is_some_and(|p| p.config.usable()) {
                        continue;
                    }
                    let when = &route.when[i];
                    let holds = if when.is_empty() {
                        Ok(())
                    } else {
                        match ctx.needs {
                            Some(needs) => fit::hold(when, needs, ctx.headers),
                            // Without a request, `explain` shows every entry.
                            None if ctx.explain => Ok(()),
                            None => Err(String::new()),
                        }
                    };
                    let why = match holds {
                        Err(why) => {
                            held_back += 1;
                            Some(why)
                        }
                        Ok(()) if ordered.iter().any(|c| c.provider.config.name == name) => {
                            Some(ALREADY_PLANNED.to_owned())
                        }
                        Ok(()) => None,
                    };
                    match why {
                        Some(why) if ctx.explain => {
                            let entry = match &route.entries[i].model {
                                ModelMapping::Passthrough => format!("{name} (passthrough)"),
                                ModelMapping::Name(m) => format!("{name} -> {m}"),
                            };
                            passed_over.push((entry, Arc::clone(&route.pattern), why));
                        }
                        Some(_) => {}
                        None => idx.push(i),
                    }
                }
                order_tier(&mut idx, tier, route, ctx);
                for i in idx {
                    let entry = &route.entries[i];
                    // Filtered above: the provider exists and is usable.
                    let Some(provider) = ctx.providers.get(entry.provider.as_str()) else {
                        continue;
                    };
                    let (upstream_model, passthrough) = match &entry.model {
                        ModelMapping::Passthrough => (model.to_owned(), true),
                        ModelMapping::Name(n) => (n.clone(), false),
                    };
                    if ordered
                        .iter()
                        .any(|c| c.provider.config.name == entry.provider)
                    {
                        // The same provider twice in one tier.
                        if ctx.explain {
                            passed_over.push((
                                format!("{} -> {upstream_model}", entry.provider),
                                Arc::clone(&route.pattern),
                                ALREADY_PLANNED.to_owned(),
                            ));
                        }
                        continue;
                    }
                    let (caps, resolved) = match route.caps[i] {
                        Some(c) => (c, true),
                        None => (entry.capabilities, false),
                    };
                    ordered.push(Candidate {
                        provider: Arc::clone(provider),
                        upstream_model,
                        passthrough,
                        priority: entry.priority,
                        route: Arc::clone(&route.pattern),
                        caps,
                        resolved,
                        scenario: tier.scenario,
                        entry: i,
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
            passed_over,
            held_back,
        })
    }
}

/// Why `explain` shows an entry left out whose provider an earlier entry already made a candidate.
const ALREADY_PLANNED: &str = "its provider is already a candidate (one attempt per provider)";

/// What [`RouteTable::plan`] needs besides the model name.
pub struct PlanContext<'a> {
    pub providers: &'a HashMap<String, Arc<Provider>>,
    pub health: &'a HealthBook,
    pub strategy: Strategy,
    pub now: Instant,
    /// What the request needs (`None`: entries with `when:` conditions are left out).
    pub needs: Option<&'a fit::Needs>,
    /// The request's headers (for `when.header`).
    pub headers: &'a http::HeaderMap,
    /// Record why entries were left out (`claude-balancer explain`).
    pub explain: bool,
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

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use std::collections::HashSet;
    use std::time::Duration;

    use super::*;
    use crate::config::{Auth, Dialect, ProviderConfig, ProviderKind};
    use crate::upstream::ClientPool;
    use health::{HealthPolicy, Verdict};

    const ALL: [Strategy; 5] = [
        Strategy::Priority,
        Strategy::RoundRobin,
        Strategy::Random,
        Strategy::Weighted,
        Strategy::LeastLatency,
    ];

    fn config(name: &str) -> ProviderConfig {
        ProviderConfig {
            name: name.into(),
            kind: ProviderKind::Anthropic,
            base_url: format!("https://{name}.example"),
            auth: Auth::None,
            keys: Vec::new(),
            enabled: true,
            disabled_reason: None,
            proxy: None,
            max_tokens_cap: None,
            dialect: Dialect::Generic,
            sanitize_schemas: false,
            models: Vec::new(),
            responses: false,
        }
    }

    fn providers(configs: Vec<ProviderConfig>) -> HashMap<String, Arc<Provider>> {
        let client = ClientPool::default()
            .get(None, Duration::from_secs(1))
            .unwrap();
        configs
            .into_iter()
            .map(|c| (c.name.clone(), Arc::new(Provider::new(c, client.clone()))))
            .collect()
    }

    fn entry(provider: &str, priority: i64) -> RouteEntry {
        RouteEntry {
            provider: provider.into(),
            model: ModelMapping::Passthrough,
            priority,
            enabled: true,
            weight: 1,
            capabilities: Capabilities::default(),
            when: crate::config::Conditions::default(),
        }
    }

    fn weighted(provider: &str, priority: i64, weight: u32) -> RouteEntry {
        RouteEntry {
            weight,
            ..entry(provider, priority)
        }
    }

    fn mapped(provider: &str, priority: i64, model: &str) -> RouteEntry {
        RouteEntry {
            model: ModelMapping::Name(model.into()),
            ..entry(provider, priority)
        }
    }

    fn route(pattern: &str, entries: Vec<RouteEntry>) -> RouteConfig {
        RouteConfig {
            pattern: pattern.into(),
            entries,
        }
    }

    fn policy() -> HealthPolicy {
        HealthPolicy {
            threshold: 1,
            cooldown: Duration::from_secs(60),
            reset_on_success: true,
            forget_after: Duration::from_secs(300),
        }
    }

    /// A route table, its providers and a health book.
    struct World {
        table: RouteTable,
        providers: HashMap<String, Arc<Provider>>,
        health: Arc<HealthBook>,
    }

    impl World {
        /// Every provider the routes name exists and is usable.
        fn new(routes: Vec<RouteConfig>) -> Self {
            let names: HashSet<String> = routes
                .iter()
                .flat_map(|r| r.entries.iter().map(|e| e.provider.clone()))
                .collect();
            let configs = names.iter().map(|n| config(n)).collect();
            Self::with_providers(routes, configs)
        }

        fn with_providers(routes: Vec<RouteConfig>, configs: Vec<ProviderConfig>) -> Self {
            Self {
                table: RouteTable::new(&routes, &[]),
                providers: providers(configs),
                health: HealthBook::new(),
            }
        }

        fn try_plan(&self, model: &str, strategy: Strategy, now: Instant) -> Option<Plan> {
            let headers = http::HeaderMap::new();
            let ctx = PlanContext {
                providers: &self.providers,
                health: &self.health,
                strategy,
                now,
                needs: None,
                headers: &headers,
                explain: false,
            };
            self.table.plan(model, &ctx)
        }

        fn plan(&self, model: &str, strategy: Strategy) -> Plan {
            self.try_plan(model, strategy, Instant::now()).unwrap()
        }

        fn order(&self, model: &str, strategy: Strategy) -> Vec<String> {
            names(&self.plan(model, strategy))
        }
    }

    fn names(plan: &Plan) -> Vec<String> {
        plan.candidates
            .iter()
            .map(|c| c.provider.config.name.clone())
            .collect()
    }

    fn sorted(names: &[String]) -> Vec<&str> {
        let mut v: Vec<&str> = names.iter().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    #[test]
    fn lower_priority_numbers_come_first_and_a_whole_tier_before_the_next() {
        let w = World::new(vec![route(
            "m",
            vec![entry("c", 2), entry("a", 1), entry("d", 3), entry("b", 1)],
        )]);
        let plan = w.plan("m", Strategy::Priority);
        assert_eq!(names(&plan), ["a", "b", "c", "d"]);
        let priorities: Vec<i64> = plan.candidates.iter().map(|c| c.priority).collect();
        assert_eq!(priorities, [1, 1, 2, 3]);
        for strategy in ALL {
            for _ in 0..20 {
                let order = w.order("m", strategy);
                assert_eq!(sorted(&order[..2]), ["a", "b"], "{strategy:?}");
                assert_eq!(order[2..], ["c", "d"], "{strategy:?}");
            }
        }
    }

    #[test]
    fn round_robin_rotates_within_a_tier_across_calls() {
        let w = World::new(vec![route(
            "m",
            vec![entry("a", 1), entry("b", 1), entry("c", 1), entry("d", 2)],
        )]);
        let rr = Strategy::RoundRobin;
        assert_eq!(w.order("m", rr), ["a", "b", "c", "d"]);
        assert_eq!(w.order("m", rr), ["b", "c", "a", "d"]);
        assert_eq!(w.order("m", rr), ["c", "a", "b", "d"]);
        assert_eq!(w.order("m", rr), ["a", "b", "c", "d"]);
    }

    #[test]
    fn round_robin_rotates_only_among_providers_not_already_planned() {
        let w = World::new(vec![
            route("m", vec![entry("a", 1)]),
            route("m*", vec![entry("a", 1), entry("b", 1), entry("c", 1)]),
        ]);
        let rr = Strategy::RoundRobin;
        assert_eq!(w.order("m", rr), ["a", "b", "c"]);
        assert_eq!(w.order("m", rr), ["a", "c", "b"]);
        assert_eq!(w.order("m", rr), ["a", "b", "c"]);
    }

    #[test]
    fn random_and_weighted_keep_every_candidate_of_a_tier_exactly_once() {
        let w = World::new(vec![route(
            "m",
            vec![
                weighted("a", 1, 1),
                weighted("b", 1, 2),
                weighted("c", 1, 3),
                weighted("d", 2, 1),
                weighted("e", 2, 1),
            ],
        )]);
        for strategy in [Strategy::Random, Strategy::Weighted] {
            let mut firsts = HashSet::new();
            for _ in 0..300 {
                let order = w.order("m", strategy);
                assert_eq!(sorted(&order[..3]), ["a", "b", "c"], "{strategy:?}");
                assert_eq!(sorted(&order[3..]), ["d", "e"], "{strategy:?}");
                firsts.insert(order[0].clone());
            }
            // Each candidate gets its turn at the front.
            assert_eq!(firsts.len(), 3, "{strategy:?}: {firsts:?}");
        }
    }

    #[test]
    fn weighted_order_follows_the_weights() {
        let w = World::new(vec![
            route("zero", vec![weighted("a", 1, 0), weighted("b", 1, 1)]),
            route(
                "skewed",
                vec![weighted("light", 1, 1), weighted("heavy", 1, 99)],
            ),
        ]);
        let mut heavy_first = 0;
        for _ in 0..400 {
            assert_eq!(w.order("zero", Strategy::Weighted), ["b", "a"]);
            if w.order("skewed", Strategy::Weighted)[0] == "heavy" {
                heavy_first += 1;
            }
        }
        // 99 % expected.
        assert!(heavy_first > 300, "{heavy_first}");
    }

    #[test]
    fn least_latency_tries_unmeasured_providers_first_then_the_fastest() {
        let w = World::new(vec![route(
            "m",
            vec![
                entry("slow", 1),
                entry("fast", 1),
                entry("new", 1),
                entry("mid", 1),
                entry("fastest_but_tier_2", 2),
            ],
        )]);
        for (name, ms) in [
            ("slow", 300),
            ("fast", 100),
            ("mid", 200),
            ("fastest_but_tier_2", 1),
        ] {
            let ttfb = Some(Duration::from_millis(ms));
            w.health
                .record(name, Verdict::Up { ttfb }, Instant::now(), &policy());
        }
        assert_eq!(
            w.order("m", Strategy::LeastLatency),
            ["new", "fast", "mid", "slow", "fastest_but_tier_2"]
        );
    }

    #[test]
    fn cooling_providers_go_last_the_one_recovering_soonest_first() {
        let w = World::new(vec![route(
            "m",
            vec![entry("a", 1), entry("b", 1), entry("c", 2), entry("d", 2)],
        )]);
        let now = Instant::now();
        for (name, secs) in [("a", 30), ("c", 10)] {
            let verdict = Verdict::Fault {
                reason: "busy".into(),
                retry_after: Some(Duration::from_secs(secs)),
            };
            w.health.record(name, verdict, now, &policy());
        }
        let plan = w.try_plan("m", Strategy::Priority, now).unwrap();
        assert_eq!(names(&plan), ["b", "d", "c", "a"]);
        // Once c's cooldown is over it may be probed: back in its place.
        let later = now + Duration::from_secs(10);
        let plan = w.try_plan("m", Strategy::Priority, later).unwrap();
        assert_eq!(names(&plan), ["b", "c", "d", "a"]);
    }

    #[test]
    fn disabled_entries_and_unusable_providers_are_left_out() {
        let off = ProviderConfig {
            enabled: false,
            ..config("provider_off")
        };
        let oauth = ProviderConfig {
            disabled_reason: Some("oauth".into()),
            ..config("oauth")
        };
        let w = World::with_providers(
            vec![
                route(
                    "m",
                    vec![
                        RouteEntry {
                            enabled: false,
                            ..entry("entry_off", 1)
                        },
                        entry("provider_off", 1),
                        entry("oauth", 1),
                        entry("unknown", 1),
                        entry("ok", 2),
                    ],
                ),
                route("none", vec![entry("provider_off", 1)]),
            ],
            vec![config("entry_off"), off, oauth, config("ok")],
        );
        for strategy in ALL {
            assert_eq!(w.order("m", strategy), ["ok"], "{strategy:?}");
        }
        // A matching route without a usable provider gives an empty plan; no route gives none.
        let empty = w.plan("none", Strategy::Priority);
        assert_eq!(&*empty.route, "none");
        assert!(empty.candidates.is_empty());
        assert!(
            w.try_plan("other", Strategy::Priority, Instant::now())
                .is_none()
        );
    }

    #[test]
    fn a_mapped_model_is_sent_as_named_and_passthrough_keeps_the_client_name() {
        let w = World::new(vec![route(
            "claude-opus",
            vec![mapped("a", 1, "anthropic/claude-opus-4"), entry("b", 2)],
        )]);
        let plan = w.plan("Claude-Opus", Strategy::Priority);
        let sent: Vec<(&str, bool)> = plan
            .candidates
            .iter()
            .map(|c| (c.upstream_model.as_str(), c.passthrough))
            .collect();
        assert_eq!(
            sent,
            [("anthropic/claude-opus-4", false), ("Claude-Opus", true)]
        );
    }

    #[test]
    fn an_exact_route_wins_over_globs_and_later_matches_are_appended_as_fallbacks() {
        let w = World::new(vec![
            route(
                "claude-*",
                vec![entry("glob", 1), mapped("shared", 1, "from-glob")],
            ),
            route(
                "claude-opus",
                vec![entry("exact", 5), mapped("shared", 6, "from-exact")],
            ),
            route("*opus*", vec![entry("opus", 1)]),
        ]);
        let plan = w.plan("CLAUDE-OPUS", Strategy::Priority);
        assert_eq!(&*plan.route, "claude-opus");
        // Whole routes in match order: a later route's tier 1 comes after an earlier one's tier 6;
        // a provider already planned is not repeated.
        let got: Vec<(String, &str, &str, i64)> = plan
            .candidates
            .iter()
            .map(|c| {
                (
                    c.provider.config.name.clone(),
                    &*c.route,
                    c.upstream_model.as_str(),
                    c.priority,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("exact".to_owned(), "claude-opus", "CLAUDE-OPUS", 5),
                ("shared".to_owned(), "claude-opus", "from-exact", 6),
                ("glob".to_owned(), "claude-*", "CLAUDE-OPUS", 1),
                ("opus".to_owned(), "*opus*", "CLAUDE-OPUS", 1),
            ]
        );
        assert_eq!(
            w.table.matching_patterns("claude-opus"),
            [
                Arc::from("claude-opus"),
                Arc::from("claude-*"),
                Arc::from("*opus*")
            ]
        );
        let plan = w.plan("claude-haiku", Strategy::Priority);
        assert_eq!(&*plan.route, "claude-*");
        assert_eq!(names(&plan), ["glob", "shared"]);
    }

    #[test]
    fn glob_wildcards_match_case_insensitively_and_other_characters_literally() {
        let w = World::new(vec![
            route("gpt-4.?", vec![entry("a", 1)]),
            route("claude-*", vec![entry("b", 1)]),
        ]);
        assert!(!w.table.matching_patterns("GPT-4.1").is_empty());
        assert!(w.table.matching_patterns("gpt-4x1").is_empty());
        assert!(w.table.matching_patterns("gpt-4.10").is_empty());
        assert!(!w.table.matching_patterns("claude-").is_empty());
        assert!(w.table.matching_patterns("my-claude-x").is_empty());
    }

    #[test]
    fn a_provider_listed_twice_is_planned_once() {
        let w = World::new(vec![
            route(
                "same-tier",
                vec![entry("a", 1), entry("a", 1), entry("b", 1)],
            ),
            route(
                "two-tiers",
                vec![entry("a", 1), entry("b", 2), entry("a", 3)],
            ),
        ]);
        for strategy in ALL {
            assert_eq!(sorted(&w.order("same-tier", strategy)), ["a", "b"]);
            assert_eq!(w.order("two-tiers", strategy), ["a", "b"]);
        }
    }

    #[test]
    fn entries_whose_conditions_hold_come_first_and_the_others_are_left_out() {
        use crate::config::Conditions;
        use crate::inbound::canonical::Shape;
        let cond = |c: Conditions, e: RouteEntry| RouteEntry { when: c, ..e };
        let w = World::new(vec![route(
            "m",
            vec![
                entry("default", 1),
                cond(
                    Conditions {
                        thinking: Some(true),
                        ..Conditions::default()
                    },
                    entry("thinker", 5),
                ),
                cond(
                    Conditions {
                        tools: Some(true),
                        ..Conditions::default()
                    },
                    entry("tooler", 2),
                ),
            ],
        )]);
        let plan_for = |shape: Shape, explain: bool| {
            let needs = fit::Needs::new(
                bytes::Bytes::new(),
                shape,
                &http::HeaderMap::new(),
                fit::Counter::Body(bytes::Bytes::new()),
            );
            let headers = http::HeaderMap::new();
            let ctx = PlanContext {
                providers: &w.providers,
                health: &w.health,
                strategy: Strategy::Priority,
                now: Instant::now(),
                needs: Some(&needs),
                headers: &headers,
                explain,
            };
            w.table.plan("m", &ctx).unwrap()
        };
        let plain = plan_for(Shape::default(), true);
        assert_eq!(names(&plain), ["default"]);
        let why: Vec<(&str, &str)> = plain
            .passed_over
            .iter()
            .map(|(p, _, r)| (p.as_str(), r.as_str()))
            .collect();
        assert_eq!(
            why,
            [
                (
                    "tooler (passthrough)",
                    "when.tools is true, the request's is false"
                ),
                (
                    "thinker (passthrough)",
                    "when.thinking is true, the request's is false"
                ),
            ]
        );
        // Scenario entries first (by priority among them), the unconditional ones after.
        let both = Shape {
            thinking: true,
            tools: true,
            ..Shape::default()
        };
        let plan = plan_for(both, false);
        assert_eq!(names(&plan), ["tooler", "thinker", "default"]);
        assert!(plan.passed_over.is_empty(), "recorded only when explaining");
        assert_eq!(
            plan.candidates
                .iter()
                .map(|c| c.scenario)
                .collect::<Vec<_>>(),
            [true, true, false]
        );
        // Without a request (no needs), conditional entries are no candidates.
        assert_eq!(w.order("m", Strategy::Priority), ["default"]);
    }

    #[test]
    fn promote_moves_the_named_provider_to_the_front() {
        let w = World::new(vec![route(
            "m",
            vec![entry("a", 1), entry("b", 2), entry("c", 3)],
        )]);
        let mut plan = w.plan("m", Strategy::Priority);
        assert!(plan.promote("c"));
        assert_eq!(names(&plan), ["c", "a", "b"]);
        assert!(plan.promote("c"));
        assert_eq!(names(&plan), ["c", "a", "b"]);
        assert!(!plan.promote("absent"));
        assert_eq!(names(&plan), ["c", "a", "b"]);
    }
}
