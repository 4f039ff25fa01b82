//! The configuration file: its typed form ([`Config`]) and its loader ([`load`]).
//!
//! The file format is the earlier Python balancer's `config.yaml` plus our additions; see
//! `config.example.yaml` and the README's configuration reference. Loading is all-or-nothing:
//! either every problem is reported (each with its path) or a complete [`Config`] comes back.

pub mod env;
mod load;

use std::time::Duration;

use regex::RegexSet;

pub use load::{ConfigErrors, Loaded, load_file, load_str};

use crate::secret::Secret;

#[derive(Debug, Clone)]
pub struct Config {
    pub providers: Vec<ProviderConfig>,
    /// In file order.
    pub routes: Vec<RouteConfig>,
    pub settings: Settings,
    /// Named clients (`clients:`), in file order.
    pub clients: Vec<ClientConfig>,
    /// `pricing:` entries, in file order (they come before the shipped defaults).
    pub pricing: Vec<PriceConfig>,
    /// `models:` entries, in file order (they come before the shipped defaults).
    pub models: Vec<ModelConfig>,
}

/// How a named client proves who it is.
#[derive(Debug, Clone)]
pub enum ClientKey {
    /// The key itself (`key`, literal or `${VAR}`).
    Plain(Secret),
    /// The SHA-256 of the key (`key_sha256`), so the file need not hold the key.
    Sha256([u8; 32]),
}

/// A rolling window of a limit: `1m`, `1h`, `5h`, `1d`, `7d` or `30d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Window {
    Minute,
    Hour,
    FiveHours,
    Day,
    Week,
    Month,
}

impl Window {
    pub const ALL: [Window; 6] = [
        Window::Minute,
        Window::Hour,
        Window::FiveHours,
        Window::Day,
        Window::Week,
        Window::Month,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Window::Minute => "1m",
            Window::Hour => "1h",
            Window::FiveHours => "5h",
            Window::Day => "1d",
            Window::Week => "7d",
            Window::Month => "30d",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|w| w.as_str() == s.trim())
    }

    pub fn duration(self) -> std::time::Duration {
        let minutes = match self {
            Window::Minute => 1,
            Window::Hour => 60,
            Window::FiveHours => 300,
            Window::Day => 1_440,
            Window::Week => 10_080,
            Window::Month => 43_200,
        };
        std::time::Duration::from_secs(minutes * 60)
    }
}

/// An amount allowed over a rolling window (tokens, or USD).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowLimit {
    pub window: Window,
    pub max: f64,
}

/// A client's limits (`clients[].limits`); each is optional.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Limits {
    pub requests_per_minute: Option<u64>,
    pub concurrent_requests: Option<u64>,
    /// Input + output + cache-write + cache-read tokens.
    pub tokens: Option<WindowLimit>,
    pub budget_usd: Option<WindowLimit>,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// One named client (`clients[]`).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub key: ClientKey,
    /// Glob patterns over the requested model; empty: every model.
    pub models: Vec<String>,
    pub limits: Limits,
}

/// Prices in USD per million tokens for upstream models matching `pattern` (`pricing:`).
#[derive(Debug, Clone, PartialEq)]
pub struct PriceConfig {
    pub pattern: String,
    pub input: f64,
    pub output: f64,
    pub cache_write: f64,
    pub cache_read: f64,
}

/// `settings.usage`: where usage is kept with the memory backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageSettings {
    /// The SQLite file (created on first use); empty: usage is not recorded.
    pub path: String,
}

impl Default for UsageSettings {
    fn default() -> Self {
        Self {
            path: "data/usage.db".to_owned(),
        }
    }
}

impl Config {
    pub fn provider(&self, name: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.name == name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Anthropic,
    Openai,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::Openai => "openai",
        }
    }
}

/// How the balancer authenticates to one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// `x-api-key: <key>`.
    ApiKey(Secret),
    /// `Authorization: Bearer <token>`.
    Bearer(Secret),
    /// The client's own `x-api-key` / `Authorization` headers are forwarded.
    Passthrough,
    /// No credentials configured (empty value or unset variable): requests go out without any.
    None,
}

/// One key of a provider's key pool.
#[derive(Debug, Clone)]
pub struct PoolKey {
    /// Its name (`keys[].name`, else `key-1`, `key-2`, …): shown in `/providers` and logs.
    pub name: String,
    /// `ApiKey` or `Bearer`, as the provider's `auth_type` says.
    pub auth: Auth,
}

/// `Debug` masks a password written into `base_url`.
#[derive(Clone)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    /// Without a trailing `/`.
    pub base_url: String,
    /// The credential; with a key pool, its first key.
    pub auth: Auth,
    /// A key pool (`auth_value` as a list, or `keys:`): two keys or more, else empty.
    pub keys: Vec<PoolKey>,
    pub enabled: bool,
    /// Why the provider cannot be used although the file enables it (e.g. `oauth`).
    pub disabled_reason: Option<String>,
    /// Outbound proxy URL; may contain a password, so it is printed only through
    /// [`crate::secret::mask_url_credentials`].
    pub proxy: Option<Secret>,
    /// Upper bound for `max_tokens` sent to this provider (openai conversion).
    pub max_tokens_cap: Option<u64>,
    /// Which OpenAI-compatible dialect an openai provider speaks.
    pub dialect: Dialect,
    /// Remove JSON-schema keywords strict backends reject from tool schemas (openai conversion).
    pub sanitize_schemas: bool,
    /// Model names this provider serves that `GET /v1/models` lists (for names behind glob
    /// routes).
    pub models: Vec<String>,
    /// An openai-type provider that speaks the Responses API itself (`POST {base_url}/responses`):
    /// requests to the balancer's `/v1/responses` are forwarded to it as they are.
    pub responses: bool,
}

impl std::fmt::Debug for ProviderConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderConfig")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field(
                "base_url",
                &crate::secret::mask_url_credentials(&self.base_url),
            )
            .field("auth", &self.auth)
            .field("enabled", &self.enabled)
            .field("disabled_reason", &self.disabled_reason)
            .field("proxy", &self.proxy)
            .field("max_tokens_cap", &self.max_tokens_cap)
            .field("dialect", &self.dialect)
            .field("sanitize_schemas", &self.sanitize_schemas)
            .field("responses", &self.responses)
            .finish()
    }
}

/// The flavour of Chat Completions an openai-type provider speaks (the protocol reference's request fields, reasoning extensions
/// and thinking ⇄ reasoning sections).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// OpenAI itself: `max_completion_tokens`, `reasoning_effort`, no reasoning in history.
    Openai,
    /// OpenRouter: `reasoning: {…}` request object, `reasoning` in history.
    Openrouter,
    /// DeepSeek: `thinking: {type}` plus `reasoning_effort`, `reasoning_content` on every tool-call turn.
    Deepseek,
    /// vLLM: `reasoning` in history.
    Vllm,
    /// Any other compatible server: `max_tokens`, `reasoning_content` in history, a reasoning
    /// parameter only for an explicit thinking budget.
    Generic,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Openai => "openai",
            Dialect::Openrouter => "openrouter",
            Dialect::Deepseek => "deepseek",
            Dialect::Vllm => "vllm",
            Dialect::Generic => "generic",
        }
    }

    /// The dialect implied by a base URL's host, when the file does not name one.
    pub fn detect(base_url: &str) -> Self {
        let host = reqwest::Url::parse(base_url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .unwrap_or_default();
        if host == "api.openai.com" {
            Dialect::Openai
        } else if host.ends_with("openrouter.ai") {
            Dialect::Openrouter
        } else if host.contains("deepseek") {
            Dialect::Deepseek
        } else {
            Dialect::Generic
        }
    }
}

impl ProviderConfig {
    pub fn usable(&self) -> bool {
        self.enabled && self.disabled_reason.is_none()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelMapping {
    /// Send the client's model name.
    Passthrough,
    /// Send this name instead.
    Name(String),
}

#[derive(Debug, Clone)]
pub struct RouteEntry {
    pub provider: String,
    pub model: ModelMapping,
    pub priority: i64,
    pub enabled: bool,
    pub weight: u32,
    /// What this entry's upstream model can take, as stated on the entry (each field optional:
    /// the `models:` table and the shipped defaults fill the rest).
    pub capabilities: Capabilities,
    /// `when:`: the request shapes this entry serves (empty: every request).
    pub when: Conditions,
}

/// What a model can take. `None`: not stated here (a later table may state it; a model nobody
/// describes is assumed able and unbounded).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Input plus output tokens the model can hold.
    pub context_window: Option<u64>,
    pub max_output_tokens: Option<u64>,
    pub images: Option<bool>,
    pub tools: Option<bool>,
    pub thinking: Option<bool>,
}

impl Capabilities {
    /// Each field from `self`, else from `fallback`.
    pub fn or(self, fallback: Capabilities) -> Capabilities {
        Capabilities {
            context_window: self.context_window.or(fallback.context_window),
            max_output_tokens: self.max_output_tokens.or(fallback.max_output_tokens),
            images: self.images.or(fallback.images),
            tools: self.tools.or(fallback.tools),
            thinking: self.thinking.or(fallback.thinking),
        }
    }

    pub fn is_empty(&self) -> bool {
        *self == Capabilities::default()
    }
}

/// A route entry's `when:` conditions: every stated one must hold for the entry to be a
/// candidate of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    /// The request asks for extended thinking (or, `false`, does not).
    pub thinking: Option<bool>,
    /// The request's estimated input is at least this many tokens.
    pub min_input_tokens: Option<u64>,
    pub images: Option<bool>,
    pub tools: Option<bool>,
    /// Claude Code's small side requests (titles, topics, summaries).
    pub background: Option<bool>,
    /// Requests made by a Claude Code subagent (the Task tool).
    pub subagent: Option<bool>,
    /// Request headers that must be present with a value matching the glob (name lower-cased).
    pub header: Vec<(String, String)>,
}

impl Conditions {
    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }
}

/// One `models:` entry: the capabilities of the upstream models matching a glob.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub pattern: String,
    pub capabilities: Capabilities,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// The key as written in the file.
    pub pattern: String,
    pub entries: Vec<RouteEntry>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Priority,
    RoundRobin,
    Random,
    Weighted,
    LeastLatency,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Priority => "priority",
            Strategy::RoundRobin => "round_robin",
            Strategy::Random => "random",
            Strategy::Weighted => "weighted",
            Strategy::LeastLatency => "least_latency",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeoutSet {
    pub connect: Duration,
    /// After connecting, the wait for the answer's headers (and, streaming, its first event), and
    /// then the longest silence between upstream bytes. A non-streaming attempt as a whole is
    /// bounded by `timeout_seconds`.
    pub read: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    pub non_streaming: TimeoutSet,
    pub streaming: TimeoutSet,
    pub deduplication: Duration,
}

/// A set of HTTP statuses (100-599).
#[derive(Clone, PartialEq, Eq)]
pub struct StatusSet([u64; 10]);

impl StatusSet {
    pub fn empty() -> Self {
        Self([0; 10])
    }
    pub fn insert(&mut self, status: u16) {
        if status < 640 {
            self.0[usize::from(status / 64)] |= 1 << (status % 64);
        }
    }
    pub fn contains(&self, status: u16) -> bool {
        status < 640 && self.0[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
    /// 401, 402, 403, 404, 408, 429 and every 5xx.
    pub fn default_unhealthy() -> Self {
        let mut set = Self::empty();
        for s in [401, 402, 403, 404, 408, 429] {
            set.insert(s);
        }
        for s in 500..600 {
            set.insert(s);
        }
        set
    }
    pub fn iter(&self) -> impl Iterator<Item = u16> + '_ {
        (100..600).filter(|s| self.contains(*s))
    }
}

impl std::fmt::Debug for StatusSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

#[derive(Debug, Clone)]
pub struct TokenCounting {
    pub always_use_local: bool,
    pub failure_threshold: u32,
    pub api_failure_cooldown: Duration,
    pub timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct Deduplication {
    pub enabled: bool,
    pub include_max_tokens_in_signature: bool,
}

#[derive(Debug, Clone)]
pub struct InboundAuth {
    pub enabled: bool,
    pub api_keys: Vec<Secret>,
    pub admin_keys: Vec<Secret>,
    pub exempt_paths: Vec<String>,
}

/// Where state shared between instances lives (`settings.state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StateBackend {
    /// In this process only (the default).
    Memory,
    /// In Redis, shared by every instance using the same server and key prefix.
    Redis,
}

impl StateBackend {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis => "redis",
        }
    }
}

/// `settings.state`.
#[derive(Debug, Clone)]
pub struct StateSettings {
    pub backend: StateBackend,
    /// `redis://` or `rediss://` URL, credentials included (a secret: never shown whole).
    pub redis_url: Option<Secret>,
    /// Prefix of every key and channel, so that several clusters can share one Redis.
    pub key_prefix: String,
    /// This instance's name in shared state; `None`: host name and process id.
    pub instance_name: Option<String>,
}

impl Default for StateSettings {
    fn default() -> Self {
        Self {
            backend: StateBackend::Memory,
            redis_url: None,
            key_prefix: DEFAULT_KEY_PREFIX.to_owned(),
            instance_name: None,
        }
    }
}

impl StateSettings {
    /// Whether `other` names the same backend, connection, prefix and instance.
    pub fn same_as(&self, other: &Self) -> bool {
        self.backend == other.backend
            && self.redis_url.as_ref().map(Secret::expose)
                == other.redis_url.as_ref().map(Secret::expose)
            && self.key_prefix == other.key_prefix
            && self.instance_name == other.instance_name
    }
}

/// `settings.state.redis.key_prefix` by default.
pub const DEFAULT_KEY_PREFIX: &str = "claude-balancer:";

#[derive(Debug, Clone)]
pub struct Settings {
    pub selection_strategy: Strategy,
    pub failure_cooldown: Duration,
    pub unhealthy_threshold: u32,
    pub unhealthy_reset_on_success: bool,
    pub unhealthy_reset_timeout: Duration,
    pub sticky_provider_duration: Duration,
    pub timeout: Duration,
    pub timeouts: Timeouts,
    pub unhealthy_http_codes: StatusSet,
    pub unhealthy_exception_patterns: Vec<String>,
    pub unhealthy_response_body_patterns: Option<RegexSet>,
    pub token_counting: TokenCounting,
    pub deduplication: Deduplication,
    pub max_cache_size: u64,
    pub cache_ttl: Duration,
    pub log_level: String,
    pub log_color: bool,
    pub log_file_path: String,
    pub host: String,
    pub port: u16,
    pub app_name: String,
    pub app_version: String,
    pub reload: bool,
    pub auth: InboundAuth,
    pub max_request_bytes: usize,
    pub max_concurrent_requests: u64,
    pub shutdown_grace: Duration,
    pub state: StateSettings,
    pub usage: UsageSettings,
}

impl Settings {
    /// Whether requests are signed: coalescing or the response cache needs their signature.
    pub fn signs_requests(&self) -> bool {
        self.deduplication.enabled || self.max_cache_size > 0
    }
}
