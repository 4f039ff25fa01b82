//! The one failover loop: try the planned candidates in order until one commits.
//!
//! An *attempt* ends in one of four outcomes: **committed** (the provider answered 2xx and, for a
//! stream, its first complete event arrived: the answer goes to the client and no other
//! candidate is tried), a **client fault** (a status outside `unhealthy_http_codes`: returned to the
//! client unchanged, no penalty), a **provider fault** (transport error, timeout, unhealthy
//! status, an error or a matching pattern before commit: counted against the provider, next
//! candidate), or **unsupported** (the candidate cannot express the request: skipped, no penalty).
//!
//! `/v1/messages` and `count_tokens` both go through [`run`]; what differs between them (the
//! attempt, the health book and its policy, whether cooling providers are skipped, affinity) is
//! a [`Lane`]. The loop returns a typed [`Answer`]; the HTTP response is built from it at the edge.

pub mod answer;
pub mod attempt;
pub mod classify;
pub mod relay;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;

pub use answer::{
    Answer, Attempt, AttemptOutcome, Body, CacheStatus, Events, FaultClass, Source, Usage, Wire,
};
pub use classify::{Fault, FaultPolicy};

use crate::cluster::{Lease, MAX_PROBE_LEASE};
use crate::config::ProviderKind;
use crate::error::{ApiError, error_type_for_status};
use crate::inbound::body::Envelope;
use crate::routing::affinity::Share;
use crate::routing::fit::{Counter, Misfit, Needs};
use crate::routing::health::{HealthBook, HealthPolicy, HealthState, Verdict};
use crate::routing::{Candidate, Plan, PlanContext};
use crate::state::{AppState, Runtime};

/// The API a request came in by: its answer is rendered in that API's wire format.
#[derive(Debug, Clone, Default)]
pub enum Front {
    /// Anthropic Messages (`/v1/messages`, `count_tokens`).
    #[default]
    Anthropic,
    /// OpenAI Chat Completions (`/v1/chat/completions`).
    Chat(Arc<ChatFront>),
    /// OpenAI Responses (`/v1/responses`), stateless.
    Responses(Arc<ResponsesFront>),
}

impl Front {
    pub fn as_str(&self) -> &'static str {
        match self {
            Front::Anthropic => "anthropic",
            Front::Chat(_) => "openai_chat",
            Front::Responses(_) => "openai_responses",
        }
    }
}

/// What a Chat Completions request carries besides its envelope. Its Anthropic form is made
/// only when a request needs it (an anthropic-type candidate, an Anthropic answer to render):
/// an openai-type provider gets the client's own body, so the fast path never parses it.
#[derive(Debug)]
pub struct ChatFront {
    /// The client's own body: what an openai-type provider gets, with only the model replaced.
    pub original: Bytes,
    /// The model name the client asked for.
    pub model: String,
    /// A stream whose client did not ask for usage (no `stream_options`): an openai-type provider
    /// is asked for it all the same, so that the request is accounted and charged, and the usage
    /// chunk is taken out again at the edge.
    pub usage_added: bool,
    converted: std::sync::OnceLock<Result<AnthropicForm, crate::adapter::chat::Refusal>>,
}

/// A Chat Completions request in Anthropic form.
#[derive(Debug)]
pub struct AnthropicForm {
    /// The Anthropic request body, with the model the client asked for.
    pub body: Bytes,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

impl ChatFront {
    pub fn new(original: Bytes, model: String, stream: bool) -> Self {
        let usage_added =
            stream && memchr::memmem::find(&original, b"\"stream_options\"").is_none();
        Self {
            original,
            model,
            usage_added,
            converted: std::sync::OnceLock::new(),
        }
    }

    /// The request in Anthropic form (converted and written out on first use, once for every
    /// candidate), or why it has none.
    pub fn converted(&self) -> &Result<AnthropicForm, crate::adapter::chat::Refusal> {
        self.converted.get_or_init(|| {
            let value: serde_json::Value = serde_json::from_slice(&self.original).map_err(|e| {
                crate::adapter::chat::Refusal {
                    message: format!("the request body is not valid JSON: {e}"),
                    param: None,
                }
            })?;
            let c = crate::adapter::chat::request::to_anthropic(
                &value,
                &crate::adapter::chat::request::FrontOptions::default(),
            )?;
            Ok(AnthropicForm {
                body: crate::adapter::chat::request::to_bytes(&c),
                include_usage: c.include_usage,
            })
        })
    }

    /// What rendering an Anthropic answer for this request needs.
    pub fn context(&self) -> crate::adapter::chat::ChatContext {
        crate::adapter::chat::ChatContext {
            model: self.model.clone(),
            include_usage: self.converted().as_ref().is_ok_and(|c| c.include_usage),
        }
    }
}

/// What a Responses request keeps beside its Anthropic form.
#[derive(Debug)]
pub struct ResponsesFront {
    /// The client's own body: what an openai-type provider that speaks the Responses API gets,
    /// with only the model replaced.
    pub original: Bytes,
    pub context: crate::adapter::responses::ResponsesContext,
}

/// One inbound request (`/v1/messages`, `count_tokens`, or a Chat Completions request in its
/// Anthropic form), validated.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub envelope: Envelope,
    /// The request body as the balancer reads it: the Anthropic body (a Responses request's
    /// converted one) or, for a Chat Completions request, the client's own OpenAI body (its
    /// Anthropic form is `ChatFront::converted`).
    pub body: Bytes,
    /// The API the request came in by.
    pub front: Front,
    pub headers: HeaderMap,
    /// The query string, forwarded as is (`beta=true`).
    pub query: Option<String>,
    /// `X-Claude-Code-Session-Id`, or the session inside `metadata.user_id`.
    pub session: Option<String>,
    /// The body as a JSON value with a local token estimate, parsed on first use (only conversion
    /// needs it; passthrough never does).
    pub parsed: std::sync::OnceLock<Option<(serde_json::Value, u64)>>,
    /// What the request needs of a model, made on first use (routing with conditions, the fit
    /// check).
    needs: std::sync::OnceLock<Arc<Needs>>,
}

impl Inbound {
    pub fn new(
        envelope: Envelope,
        body: Bytes,
        headers: HeaderMap,
        query: Option<String>,
        session: Option<String>,
    ) -> Self {
        Self {
            envelope,
            body,
            front: Front::Anthropic,
            headers,
            query,
            session,
            parsed: std::sync::OnceLock::new(),
            needs: std::sync::OnceLock::new(),
        }
    }

    /// What the request needs of a model: its shape from the scan, its kind, and how to count its
    /// tokens if the estimate is not enough (a Chat Completions request: its Anthropic form).
    pub fn needs(&self) -> &Needs {
        self.shared_needs()
    }

    /// Counts the request's tokens on a blocking thread, one of the count_tokens endpoint's
    /// (`AppState::counting`: one per core), since the tokenizer takes milliseconds on a long
    /// request and loads itself on first use. The count is then kept for every check.
    pub async fn count_tokens_aside(&self, state: &AppState) {
        let needs = Arc::clone(self.shared_needs());
        if needs.was_counted() {
            return;
        }
        let Ok(permit) = Arc::clone(&state.counting).acquire_owned().await else {
            return; // shut down: the check counts inline
        };
        let counted = Arc::clone(&needs);
        let done = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            counted.counted()
        })
        .await;
        // The session's next request is bounded from this count (see `Needs::set_prior`).
        if let (Ok(tokens), Some(session)) = (done, &self.session) {
            state.remember_count(session, needs.text_bytes(), tokens);
        }
    }

    fn shared_needs(&self) -> &Arc<Needs> {
        self.needs.get_or_init(|| {
            let counter = match &self.front {
                Front::Chat(chat) => {
                    let chat = Arc::clone(chat);
                    Counter::With(Box::new(move || match chat.converted() {
                        Ok(form) => crate::tokens::count_to_fit(&form.body),
                        Err(_) => crate::tokens::count_to_fit(&chat.original),
                    }))
                }
                _ => Counter::Body(self.body.clone()),
            };
            Arc::new(Needs::new(
                self.body.clone(),
                self.envelope.shape.clone(),
                &self.headers,
                counter,
            ))
        })
    }

    /// The parsed body and its token estimate.
    pub fn parsed(&self) -> Option<(&serde_json::Value, u64)> {
        self.parsed
            .get_or_init(|| {
                let v: serde_json::Value = serde_json::from_slice(&self.body).ok()?;
                let estimate = crate::tokens::estimate_request(&v);
                Some((v, estimate))
            })
            .as_ref()
            .map(|(v, e)| (v, *e))
    }
}

/// The endpoints that share the failover loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Messages,
    CountTokens,
}

impl Endpoint {
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Messages => "messages",
            Endpoint::CountTokens => "count_tokens",
        }
    }
}

/// What differs between the endpoints in the loop.
struct Lane<'a> {
    book: &'a Arc<HealthBook>,
    policy: &'a HealthPolicy,
    /// Skip a provider in cooldown instead of trying it last (count_tokens has the local count to
    /// fall back on).
    skip_cooling: bool,
    /// Only anthropic-type providers can serve it (count_tokens): the others are passed over
    /// without an attempt.
    anthropic_only: bool,
    /// Record session affinity on commit.
    affinity: bool,
    /// Skip candidates that cannot hold the request (a count_tokens request generates nothing).
    fit: bool,
    /// The book is shared by the cluster (Redis backend): a probe needs the cluster's lease.
    shared: bool,
}

impl<'a> Lane<'a> {
    fn of(endpoint: Endpoint, state: &'a AppState, runtime: &'a Runtime) -> Self {
        match endpoint {
            Endpoint::Messages => Lane {
                book: &state.health,
                policy: &runtime.health_policy,
                skip_cooling: false,
                anthropic_only: false,
                affinity: runtime.config.settings.sticky_provider_duration > Duration::ZERO,
                fit: true,
                shared: true,
            },
            Endpoint::CountTokens => Lane {
                book: &state.count_tokens,
                policy: &runtime.count_policy,
                skip_cooling: true,
                anthropic_only: true,
                affinity: false,
                fit: false,
                shared: false,
            },
        }
    }
}

/// A committed answer or a client fault, as an attempt hands it to the loop.
pub struct Reply {
    pub status: StatusCode,
    /// The provider's headers that go on to the client (already filtered).
    pub headers: HeaderMap,
    pub body: Body,
    pub wire: Wire,
    pub usage: Option<Usage>,
    /// Time to the commit (for the latency average), when it was an answer.
    pub ttfb: Option<Duration>,
}

pub enum Outcome {
    Committed(Reply),
    ClientFault(Reply),
    Fault(Fault),
    /// The request cannot be expressed for this provider (e.g. a server tool on an OpenAI-compatible
    /// route): the candidate is skipped without penalty. The parameter at fault, when one is.
    Unsupported(String, Option<String>),
}

/// The end of a loop in which no candidate answered.
#[derive(Debug)]
pub struct Failed {
    pub route: Arc<str>,
    pub attempts: Vec<Attempt>,
    pub failures: Vec<(String, Fault)>,
    pub unsupported: Vec<String>,
    /// The parameter a skipped candidate named as the reason (an OpenAI request that cannot be
    /// expressed in Anthropic form).
    pub param: Option<String>,
    /// Candidates skipped because the request is too long for them: for the largest of their
    /// windows, the input, the output asked and the window.
    pub too_long: Option<(u64, u64, u64)>,
}

/// A candidate's capabilities for a request: its model's, the `context-1m` beta applied, and for an
/// openai-type provider its `max_tokens_cap` bounding the output (the conversion sends no more).
pub(crate) fn fit_capabilities(
    runtime: &Runtime,
    candidate: &Candidate,
    needs: &Needs,
) -> crate::config::Capabilities {
    let caps = crate::routing::fit::effective(
        runtime.routes.capabilities_of(candidate),
        &candidate.upstream_model,
        needs,
    );
    match candidate.provider.config.kind {
        ProviderKind::Openai => {
            crate::routing::fit::with_output_cap(caps, candidate.provider.config.max_tokens_cap)
        }
        ProviderKind::Anthropic => caps,
    }
}

/// What the loop does with a candidate, by its capabilities.
pub(crate) enum Judgement {
    Try,
    /// The request insists on thinking (a budget) and this model cannot think: it is tried after
    /// the candidates still to come that can.
    Later,
    /// It cannot hold the request: skipped without a call.
    Skip(Misfit),
}

/// Judges a candidate with capabilities `caps` (from [`fit_capabilities`]); `rest`: the candidates
/// still to be tried after it.
pub(crate) fn judge<'a>(
    runtime: &Runtime,
    caps: &crate::config::Capabilities,
    needs: &Needs,
    mut rest: impl Iterator<Item = &'a Candidate>,
) -> Judgement {
    if let Err(m) = crate::routing::fit::check(caps, needs, false) {
        return Judgement::Skip(m);
    }
    let thinker_left = needs.shape.thinking_budget
        && caps.thinking == Some(false)
        && rest.any(|c| fit_capabilities(runtime, c, needs).thinking != Some(false));
    if thinker_left {
        Judgement::Later
    } else {
        Judgement::Try
    }
}

/// The ordered candidates for a request (pure: no I/O). Its needs are read only when an entry of
/// the route has `when:` conditions. A `min_input_tokens` condition close to the request's
/// estimated size has it counted first, off the async runtime.
pub async fn plan(state: &AppState, runtime: &Runtime, inbound: &Inbound) -> Option<Plan> {
    let needs = inbound.needs();
    if runtime.routes.has_min_input_conditions()
        && runtime
            .routes
            .min_input_conditions(&inbound.envelope.model)
            .any(|min| needs.would_count_for_min(min))
    {
        inbound.count_tokens_aside(state).await;
    }
    let ctx = PlanContext {
        providers: &runtime.providers,
        health: &state.health,
        strategy: runtime.config.settings.selection_strategy,
        now: Instant::now(),
        needs: Some(inbound.needs()),
        headers: &inbound.headers,
        explain: false,
    };
    runtime.routes.plan(&inbound.envelope.model, &ctx)
}

/// Serves one `/v1/messages` request: plan, promote the session's and the body's provider, then
/// the failover loop.
pub async fn messages(state: &Arc<AppState>, inbound: Inbound) -> Answer {
    let runtime = state.runtime();
    let model = &inbound.envelope.model;
    let Some(mut plan) = plan(state, &runtime, &inbound).await else {
        return Answer::error(ApiError::not_found(format!(
            "model {model:?} matches no entry of model_routes"
        )));
    };
    if plan.candidates.is_empty() && plan.held_back > 0 {
        // Every entry has `when:` conditions and none holds: the request's shape, not an outage.
        let mut answer = Answer::error(ApiError::invalid_request(format!(
            "no entry of route {:?} serves this request: their `when:` conditions do not hold \
             (add an entry without `when:` as the default)",
            &*plan.route
        )));
        answer.route = Some(plan.route);
        return answer;
    }
    if plan.candidates.is_empty() {
        let mut answer = Answer::error(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "api_error",
            format!(
                "route {:?} for model {model:?} has no enabled provider",
                &*plan.route
            ),
        ));
        answer.route = Some(plan.route);
        return answer;
    }
    if let Some((bytes, tokens)) = inbound
        .session
        .as_deref()
        .and_then(|s| state.prior_count(s))
    {
        inbound.needs().set_prior(bytes, tokens);
    }
    let sticky = runtime.config.settings.sticky_provider_duration > Duration::ZERO;
    if let (true, Some(session)) = (sticky, &inbound.session) {
        let now = Instant::now();
        let mut sticky_to = state.affinity.get(session, &plan.route, now);
        if let (None, Some(cluster)) = (&sticky_to, &state.cluster) {
            // Not served here before: another instance may have served it.
            let key = crate::routing::affinity::key(session, &plan.route);
            if let Some(name) = cluster.affinity(key).await {
                if let Some(p) = runtime.providers.get(&name) {
                    let ttl = runtime.config.settings.sticky_provider_duration;
                    state
                        .affinity
                        .set(session, &plan.route, &p.name, Instant::now(), ttl);
                    sticky_to = Some(Arc::clone(&p.name));
                }
            }
        }
        // Affinity orders providers among the entries a request would use first: a scenario
        // entry whose conditions hold is not overtaken by the session's default provider, and the
        // other way round.
        if let Some(p) = sticky_to {
            let first = plan.candidates.first().map(|c| c.scenario);
            let same_group = plan
                .candidates
                .iter()
                .find(|c| *c.provider.name == *p)
                .is_some_and(|c| Some(c.scenario) == first);
            if same_group && state.health.standing(&p, now).available {
                plan.promote(&p);
            }
        }
    }
    if let Some(forced) = &inbound.envelope.provider {
        plan.promote(forced);
    }
    match run(state, &runtime, &plan, &inbound, Endpoint::Messages).await {
        Ok(answer) => answer,
        Err(failed) => failed.into_answer(state, model),
    }
}

/// The failover loop: each candidate in order, until one answers (`Ok`) or all have failed or
/// been skipped (`Err`).
pub async fn run(
    state: &Arc<AppState>,
    runtime: &Runtime,
    plan: &Plan,
    inbound: &Inbound,
    endpoint: Endpoint,
) -> Result<Answer, Failed> {
    let lane = Lane::of(endpoint, state, runtime);
    let mut attempts: Vec<Attempt> = Vec::new();
    let mut failures: Vec<(String, Fault)> = Vec::new();
    let mut unsupported: Vec<String> = Vec::new();
    let mut param: Option<String> = None;
    let mut too_long: Option<(u64, u64, u64)> = None;
    // A candidate whose probe another instance holds goes to the end, once: like a provider
    // cooling down, it is tried only if every other candidate fails.
    let mut queue: VecDeque<(&Candidate, bool)> =
        plan.candidates.iter().map(|c| (c, false)).collect();
    while let Some((candidate, deferred)) = queue.pop_front() {
        let name = candidate.provider.config.name.as_str();
        if lane.anthropic_only && candidate.provider.config.kind != ProviderKind::Anthropic {
            continue;
        }
        if lane.skip_cooling && !lane.book.standing(name, Instant::now()).available {
            continue;
        }
        // Fit: a candidate that cannot hold the request (size, images, tools, thinking) is
        // skipped before any call, without penalty.
        if lane.fit {
            let needs = inbound.needs();
            let caps = fit_capabilities(runtime, candidate, needs);
            if needs.would_count_for(&caps) {
                inbound.count_tokens_aside(state).await;
            }
            let misfit = match judge(runtime, &caps, needs, queue.iter().map(|(c, _)| *c)) {
                Judgement::Try => None,
                Judgement::Later => {
                    queue.push_back((candidate, true));
                    continue;
                }
                Judgement::Skip(m) => Some(m),
            };
            if let Some(misfit) = misfit {
                crate::routing::fit::keep_largest(&mut too_long, &misfit);
                let reason = misfit.to_string();
                tracing::info!(provider = %name, model = %candidate.upstream_model, %reason, "candidate cannot hold this request; skipped");
                unsupported.push(format!("{name}: {reason}"));
                attempts.push(Attempt {
                    provider: name.to_owned(),
                    upstream_model: candidate.upstream_model.clone(),
                    outcome: AttemptOutcome::Skipped,
                    class: None,
                    status: None,
                    took: Duration::ZERO,
                    reason: Some(reason),
                });
                continue;
            }
        }
        let ticket = lane.book.begin(name, Instant::now());
        // The cluster's probe lease (Redis backend): one instance probes after a cooldown. A
        // deferred candidate is a last resort and asks for none.
        let mut lease = None;
        if let (true, Some(cluster)) = (
            lane.shared && ticket.is_probe() && !deferred,
            &state.cluster,
        ) {
            let version = ticket.shared_version();
            match cluster
                .probe_lease(name, version, probe_lease(runtime, inbound))
                .await
            {
                Lease::Elsewhere(left) => {
                    tracing::debug!(provider = %name, "another instance probes this provider; deferred");
                    lane.book.probe_elsewhere(ticket, Instant::now() + left);
                    queue.push_back((candidate, true));
                    continue;
                }
                Lease::Granted => lease = Some(HeldLease::new(cluster, name, version)),
            }
        }
        let (outcome, took) =
            attempt_with_keys(state, runtime, candidate, inbound, endpoint, &mut attempts).await;
        attempts.push(record_attempt(candidate, &outcome, took));
        let (reply, verdict) = match outcome {
            Outcome::Committed(reply) => {
                let ttfb = reply.ttfb;
                (reply, Verdict::Up { ttfb })
            }
            Outcome::ClientFault(reply) => (reply, Verdict::Up { ttfb: None }),
            Outcome::Fault(fault) => {
                tracing::warn!(provider = %name, model = %candidate.upstream_model, endpoint = endpoint.as_str(), reason = %fault.reason, "attempt failed");
                let verdict = Verdict::Fault {
                    reason: fault.reason.clone(),
                    retry_after: fault.retry_after,
                };
                log_change(
                    name,
                    lane.book
                        .resolve(ticket, verdict, Instant::now(), lane.policy),
                );
                if let Some(l) = lease.as_mut() {
                    l.resolved();
                }
                failures.push((name.to_owned(), fault));
                continue;
            }
            Outcome::Unsupported(reason, named) => {
                drop(ticket);
                param = param.or(named);
                tracing::info!(provider = %name, endpoint = endpoint.as_str(), %reason, "candidate cannot serve this request; skipped");
                unsupported.push(format!("{name}: {reason}"));
                continue;
            }
        };
        log_change(
            name,
            lane.book
                .resolve(ticket, verdict, Instant::now(), lane.policy),
        );
        if let Some(l) = lease.as_mut() {
            l.resolved();
        }
        // A scenario entry is chosen by its conditions, not remembered for the session.
        if let (true, Some(session), true, false) = (
            lane.affinity,
            &inbound.session,
            reply.status.is_success(),
            candidate.scenario,
        ) {
            let ttl = runtime.config.settings.sticky_provider_duration;
            let name = &candidate.provider.name;
            let share = state
                .affinity
                .set(session, &plan.route, name, Instant::now(), ttl);
            if let (Some(cluster), false) = (&state.cluster, share == Share::No) {
                let key = crate::routing::affinity::key(session, &plan.route);
                cluster.share_affinity(key, name, ttl, share == Share::Moved);
            }
        }
        if !failures.is_empty() {
            tracing::info!(model = %inbound.envelope.model, provider = %name, failed_over = failures.len(), "request succeeded after failover");
        }
        return Ok(Answer {
            status: reply.status,
            headers: reply.headers,
            source: Source::Provider {
                name: name.to_owned(),
                upstream_model: candidate.upstream_model.clone(),
            },
            route: Some(Arc::clone(&plan.route)),
            attempts,
            cache: CacheStatus::Off,
            body: reply.body,
            wire: reply.wire,
            usage: reply.usage,
        });
    }
    Err(Failed {
        route: Arc::clone(&plan.route),
        attempts,
        failures,
        unsupported,
        param,
        too_long,
    })
}

/// One attempt on `candidate`, or, for a provider with a key pool, one per key until a key answers
/// for itself: a 429, 401, 402 or 403 rests that key (for the provider's `retry-after`, else the
/// cooldown) and the request goes on with another key of the same provider, recorded as an attempt
/// but not counted against the provider; only when no other key is available does the outcome
/// stand as the provider's. Answers through a key update its rate-limit figures (a key reported
/// exhausted rests until its reset) and make it the session's key of that provider.
async fn attempt_with_keys(
    state: &Arc<AppState>,
    runtime: &Runtime,
    candidate: &Candidate,
    inbound: &Inbound,
    endpoint: Endpoint,
    attempts: &mut Vec<Attempt>,
) -> (Outcome, Duration) {
    let config = &candidate.provider.config;
    let pool = &config.keys;
    let mut tried: Vec<usize> = Vec::new();
    loop {
        let now = Instant::now();
        let key = if pool.is_empty() {
            None
        } else {
            state
                .keys
                .choose(&config.name, pool, inbound.session.as_deref(), &tried, now)
        };
        let auth = key.map_or(&config.auth, |i| &pool[i].auth);
        let started = Instant::now();
        let mut outcome =
            attempt::attempt(state, runtime, candidate, inbound, endpoint, auth).await;
        if let Outcome::Fault(f) = &mut outcome {
            f.reason = redact_reason(&f.reason, runtime, inbound);
        }
        let took = started.elapsed();
        let Some(i) = key else {
            return (outcome, took);
        };
        let name = &pool[i].name;
        // count_tokens uses the pool's keys but leaves their state to the chat requests: a relay
        // without count_tokens must not rest keys that serve `/v1/messages`.
        if endpoint != Endpoint::Messages {
            return (outcome, took);
        }
        tried.push(i);
        state.keys.used(&config.name, name);
        let now = Instant::now();
        let key_status = match &outcome {
            Outcome::Fault(f) => f.status.map(|s| (s, f.retry_after)),
            Outcome::ClientFault(r) => {
                Some((r.status.as_u16(), crate::upstream::retry_after(&r.headers)))
            }
            _ => None,
        }
        .filter(|(s, _)| crate::routing::keys::KEY_STATUSES.contains(s));
        if let Outcome::Fault(f) = &outcome {
            // A 429 may say how long the key's quota is exhausted (the unified headers).
            state.keys.observe(&config.name, name, &f.rate_limits, now);
        }
        if let Some((status, retry_after)) = key_status {
            let rest = retry_after.unwrap_or(runtime.health_policy.cooldown);
            state
                .keys
                .rest(&config.name, name, now + rest, format!("status {status}"));
            tracing::warn!(provider = %config.name, key = %name, status, rest_seconds = rest.as_secs_f64(), "key rests; the pool's other keys serve");
            if state
                .keys
                .another_available(&config.name, pool, &tried, now)
            {
                let mut record = record_attempt(candidate, &outcome, took);
                record.reason = Some(format!(
                    "key {name}: status {status}{}",
                    record.reason.map(|r| format!(", {r}")).unwrap_or_default()
                ));
                attempts.push(record);
                continue;
            }
        }
        if let Outcome::Committed(reply) | Outcome::ClientFault(reply) = &outcome {
            state.keys.observe(&config.name, name, &reply.headers, now);
        }
        if let (Outcome::Committed(_), Some(session)) = (&outcome, &inbound.session) {
            let ttl = runtime.config.settings.sticky_provider_duration;
            state.keys.stick(session, &config.name, name, now, ttl);
        }
        return (outcome, took);
    }
}

/// How long a probe of this request may hold the cluster's lease: the time its attempt may take
/// to reach a verdict (connect, then the answer's head or first event), within the cluster's bound.
fn probe_lease(runtime: &Runtime, inbound: &Inbound) -> Duration {
    let t = &runtime.config.settings.timeouts;
    let set = if inbound.envelope.stream {
        &t.streaming
    } else {
        &t.non_streaming
    };
    (set.connect + set.read).min(MAX_PROBE_LEASE)
}

/// A probe lease this instance holds for one attempt: given back if the attempt ends without a
/// verdict (its client left, or the request could not be sent to this provider). A verdict
/// changes the shared record's version, which retires the lease.
struct HeldLease<'a> {
    cluster: &'a crate::cluster::Cluster,
    provider: &'a str,
    version: u64,
    resolved: bool,
}

impl<'a> HeldLease<'a> {
    fn new(cluster: &'a crate::cluster::Cluster, provider: &'a str, version: u64) -> Self {
        Self {
            cluster,
            provider,
            version,
            resolved: false,
        }
    }

    fn resolved(&mut self) {
        self.resolved = true;
    }
}

impl Drop for HeldLease<'_> {
    fn drop(&mut self) {
        if !self.resolved {
            self.cluster
                .release_probe_lease(self.provider, self.version);
        }
    }
}

/// The redactor for what one request's providers send back: every configured secret and the
/// client's own credentials.
pub(crate) fn request_redactor(runtime: &Runtime, inbound: &Inbound) -> crate::secret::Redactor {
    runtime.redactor.with(
        crate::inbound::auth::client_credentials(&inbound.headers)
            .filter_map(|c| std::str::from_utf8(c).ok()),
    )
}

/// Some providers echo the key they refused: neither theirs nor the client's may reach a log, the
/// health book or the client. Masked first, then cut short.
fn redact_reason(reason: &str, runtime: &Runtime, inbound: &Inbound) -> String {
    classify::truncate(&request_redactor(runtime, inbound).text(reason))
}

fn record_attempt(candidate: &Candidate, outcome: &Outcome, took: Duration) -> Attempt {
    let (outcome, class, status, reason) = match outcome {
        Outcome::Committed(r) => (
            AttemptOutcome::Committed,
            None,
            Some(r.status.as_u16()),
            None,
        ),
        Outcome::ClientFault(r) => (
            AttemptOutcome::ClientFault,
            None,
            Some(r.status.as_u16()),
            None,
        ),
        Outcome::Fault(f) => (
            AttemptOutcome::Fault,
            Some(f.class),
            f.status,
            Some(f.reason.clone()),
        ),
        Outcome::Unsupported(reason, _) => (
            AttemptOutcome::Unsupported,
            None,
            None,
            Some(reason.clone()),
        ),
    };
    Attempt {
        provider: candidate.provider.config.name.clone(),
        upstream_model: candidate.upstream_model.clone(),
        outcome,
        class,
        status,
        took,
        reason,
    }
}

fn log_change(provider: &str, change: Option<(HealthState, HealthState)>) {
    if let Some((from, to)) = change {
        tracing::warn!(
            provider,
            from = from.as_str(),
            to = to.as_str(),
            "provider state changed"
        );
    }
}

impl Failed {
    /// The answer to a `/v1/messages` request no candidate served.
    pub fn into_answer(self, state: &AppState, model: &str) -> Answer {
        let error = if let (true, Some((input, output, window))) =
            (self.failures.is_empty(), self.too_long)
        {
            ApiError::invalid_request(format!(
                "{} (estimated by the balancer: the largest context window among route {:?}'s \
                 providers is {window} tokens; no provider was called)",
                crate::routing::fit::too_long_words(input, output, window),
                &*self.route
            ))
        } else if self.failures.is_empty() && !self.unsupported.is_empty() {
            let e = ApiError::invalid_request(format!(
                "no provider of this route can serve the request: {}",
                self.unsupported.join("; ")
            ));
            match self.param {
                Some(p) => e.with_param(p),
                None => e,
            }
        } else {
            all_failed(state, model, &self.failures)
        };
        let mut answer = Answer::error(error);
        answer.route = Some(self.route);
        answer.attempts = self.attempts;
        answer
    }
}

/// The error for a request on which every candidate faulted.
///
/// When every attempt failed with the same upstream status, the client gets that status and its
/// Anthropic error type (429 → `rate_limit_error`, 503 and 529 → `overloaded_error`, 500 →
/// `api_error`, 402 → `billing_error`, …), except 401 and 403, which would make Claude Code tell
/// the user their own key is invalid. Otherwise: all overloaded → 529, all timed out → 504, else
/// 502. A 429, 503 or 529 carries `retry-after`: the providers' own hint, else the shortest
/// cooldown.
pub fn all_failed(state: &AppState, model: &str, failures: &[(String, Fault)]) -> ApiError {
    let list: Vec<String> = failures
        .iter()
        .map(|(p, f)| format!("{p}: {}", f.reason))
        .collect();
    let n = failures.len();
    let plural = if n == 1 { "" } else { "s" };
    let message = format!(
        "all {n} provider{plural} failed for model {model}: {}",
        list.join("; ")
    );
    let retry_secs = || {
        let now = Instant::now();
        let shortest = failures
            .iter()
            .filter_map(|(_, f)| f.retry_after)
            .min()
            .or_else(|| {
                failures
                    .iter()
                    .map(|(p, _)| state.health.standing(p, now).remaining)
                    .filter(|d| !d.is_zero())
                    .min()
            })
            .unwrap_or(Duration::from_secs(1));
        shortest.as_secs_f64().ceil().max(1.0) as u64
    };
    let same_status = failures
        .first()
        .and_then(|(_, f)| f.status)
        .filter(|s| failures.iter().all(|(_, f)| f.status == Some(*s)));
    let all = |c: FaultClass| failures.iter().all(|(_, f)| f.class == c);
    match same_status {
        Some(s @ (429 | 503 | 529)) => {
            let kind = if s == 429 {
                "rate_limit_error"
            } else {
                "overloaded_error"
            };
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            ApiError::new(status, kind, message).with_retry_after(retry_secs())
        }
        Some(s) if !matches!(s, 401 | 403 | 408) && (400..600).contains(&s) => {
            let status = StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY);
            ApiError::new(status, error_type_for_status(s), message)
        }
        _ if all(FaultClass::Overloaded) => ApiError::new(
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
            message,
        )
        .with_retry_after(retry_secs()),
        _ if all(FaultClass::Timeout) => {
            ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout_error", message)
        }
        // Credential refusals land here too: never a 401, or Claude Code would blame the user's key.
        _ => ApiError::new(StatusCode::BAD_GATEWAY, "api_error", message),
    }
}
