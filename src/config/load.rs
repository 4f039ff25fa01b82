//! Reading the YAML file into [`Config`]: every problem is collected with its path, unknown keys
//! are warnings, `${VAR}` references are expanded in every string value.

use std::fmt;
use std::path::Path;
use std::time::Duration;

use regex::RegexSet;
use serde_json::{Map, Value};

use super::env::{Expanded, expand};
use super::*;

/// A successfully loaded file.
#[derive(Debug)]
pub struct Loaded {
    pub config: Config,
    /// Unknown or ignored keys, providers left without credentials, and similar.
    pub warnings: Vec<String>,
}

/// Every problem found in a file, each starting with its path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join("\n"))
    }
}

impl std::error::Error for ConfigErrors {}

pub fn load_file(path: &Path) -> Result<Loaded, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![format!(
            "{}: cannot read the file: {e}",
            path.display()
        )])
    })?;
    load_str(&text, &|name| std::env::var(name).ok())
}

/// A YAML syntax error by line and column only: the parser's message goes on to quote the
/// lines around the error, which may hold keys (`auth_value`, `admin_keys`), and this text reaches
/// the console, the log file and the reload endpoint.
fn yaml_syntax_error(e: &impl fmt::Display) -> String {
    let text = e.to_string();
    let first = text.lines().next().unwrap_or("").trim();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    format!("YAML syntax: {first}")
}

/// Parses and validates a configuration text; `lookup` resolves `${VAR}` references.
pub fn load_str(
    text: &str,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<Loaded, ConfigErrors> {
    let root: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_saphyr::from_str(text).map_err(|e| ConfigErrors(vec![yaml_syntax_error(&e)]))?
    };
    let mut w = Walker {
        errors: Vec::new(),
        warnings: Vec::new(),
        lookup,
    };
    let config = w.config(&root);
    if w.errors.is_empty() {
        Ok(Loaded {
            config,
            warnings: w.warnings,
        })
    } else {
        Err(ConfigErrors(w.errors))
    }
}

const TOP_KEYS: &[&str] = &[
    "providers",
    "model_routes",
    "settings",
    "clients",
    "pricing",
    "models",
];
const PROVIDER_KEYS: &[&str] = &[
    "name",
    "type",
    "base_url",
    "auth_type",
    "auth_value",
    "keys",
    "enabled",
    "proxy",
    "max_tokens_cap",
    "dialect",
    "sanitize_schemas",
    "models",
    "responses",
];
const PROVIDER_IGNORED: &[&str] = &["streaming_mode", "account_email", "priority"];
const ENTRY_KEYS: &[&str] = &[
    "provider",
    "model",
    "priority",
    "enabled",
    "weight",
    "context_window",
    "max_output_tokens",
    "images",
    "tools",
    "thinking",
    "when",
];
const CAPABILITY_KEYS: &[&str] = &[
    "context_window",
    "max_output_tokens",
    "images",
    "tools",
    "thinking",
];
const CONDITION_KEYS: &[&str] = &[
    "thinking",
    "min_input_tokens",
    "images",
    "tools",
    "background",
    "subagent",
    "header",
];
const ENTRY_IGNORED: &[&str] = &["account_email"];
const SETTINGS_KEYS: &[&str] = &[
    "selection_strategy",
    "failure_cooldown",
    "cooldown_seconds",
    "unhealthy_threshold",
    "unhealthy_reset_on_success",
    "unhealthy_reset_timeout",
    "sticky_provider_duration",
    "timeout_seconds",
    "timeouts",
    "unhealthy_http_codes",
    "unhealthy_exception_patterns",
    "unhealthy_response_body_patterns",
    "token_counting",
    "deduplication",
    "max_cache_size",
    "cache_ttl_seconds",
    "log_level",
    "log_color",
    "log_file_path",
    "host",
    "port",
    "app_name",
    "app_version",
    "reload",
    "auth",
    "max_request_bytes",
    "max_concurrent_requests",
    "shutdown_grace_seconds",
    "state",
    "usage",
];
/// Keys of the earlier program that have no meaning here: accepted with a warning.
const SETTINGS_IGNORED: &[&str] = &[
    "oauth",
    "testing",
    "failover_error_types",
    "failover_http_codes",
    "idle_recovery_interval",
    "client_disconnect_watchdog",
    // The earlier program's extra files to watch (its own sources); only the file itself is here.
    "reload_includes",
];

struct Walker<'a> {
    errors: Vec<String>,
    warnings: Vec<String>,
    lookup: &'a dyn Fn(&str) -> Option<String>,
}

/// The 32 bytes written as 64 hexadecimal digits.
fn sha256_hex(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Whether two client keys would accept the same presented key.
fn same_key(a: &ClientKey, b: &ClientKey) -> bool {
    use sha2::Digest;
    let digest = |k: &ClientKey| match k {
        ClientKey::Plain(s) => sha2::Sha256::digest(s.expose().as_bytes()).into(),
        ClientKey::Sha256(d) => *d,
    };
    digest(a) == digest(b)
}

/// `parent.key`, quoting keys that are not plain identifiers.
fn join(parent: &str, key: &str) -> String {
    let plain = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    match (parent.is_empty(), plain) {
        (true, true) => key.to_owned(),
        (true, false) => format!("{key:?}"),
        (false, true) => format!("{parent}.{key}"),
        (false, false) => format!("{parent}.{key:?}"),
    }
}

fn suggestion<'n>(wanted: &str, names: impl Iterator<Item = &'n str>) -> Option<&'n str> {
    let wanted_lower = wanted.to_lowercase();
    names
        .map(|n| (strsim::levenshtein(&wanted_lower, &n.to_lowercase()), n))
        .filter(|(d, n)| *d <= (n.chars().count() / 3).max(2))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

impl Walker<'_> {
    fn error(&mut self, path: &str, msg: impl fmt::Display) {
        self.errors.push(format!("{path}: {msg}"));
    }

    fn warn(&mut self, path: &str, msg: impl fmt::Display) {
        self.warnings.push(format!("{path}: {msg}"));
    }

    fn expand(&self, s: &str) -> Expanded {
        expand(s, self.lookup)
    }

    /// A mapping, or `None` (with an error unless it is absent or null).
    fn map<'v>(&mut self, v: Option<&'v Value>, path: &str) -> Option<&'v Map<String, Value>> {
        match v {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m),
            Some(_) => {
                self.error(path, "expected a mapping");
                None
            }
        }
    }

    fn check_keys(&mut self, m: &Map<String, Value>, path: &str, known: &[&str], ignored: &[&str]) {
        for key in m.keys() {
            if known.contains(&key.as_str()) {
                continue;
            }
            let key_path = join(path, key);
            if ignored.contains(&key.as_str()) {
                self.warn(&key_path, "accepted for compatibility and ignored");
            } else {
                match suggestion(key, known.iter().copied()) {
                    Some(s) => self.warn(
                        &key_path,
                        format!("unknown key, ignored (did you mean {s:?}?)"),
                    ),
                    None => self.warn(&key_path, "unknown key, ignored"),
                }
            }
        }
    }

    /// A scalar as expanded text; `None` when absent or null.
    fn text(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<Expanded> {
        match m.get(key) {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(self.expand(s)),
            Some(Value::Number(n)) => Some(Expanded {
                value: n.to_string(),
                unset: vec![],
            }),
            Some(Value::Bool(b)) => Some(Expanded {
                value: b.to_string(),
                unset: vec![],
            }),
            Some(_) => {
                self.error(
                    &join(path, key),
                    "expected a single value, not a list or mapping",
                );
                None
            }
        }
    }

    fn string(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        self.text(m, key, path).map(|e| e.value)
    }

    fn required_string(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<String> {
        match self.string(m, key, path) {
            Some(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
            Some(_) => {
                self.error(&join(path, key), "must not be empty");
                None
            }
            None => {
                self.error(&join(path, key), "is required");
                None
            }
        }
    }

    fn bool(&mut self, m: &Map<String, Value>, key: &str, path: &str, default: bool) -> bool {
        let Some(t) = self.text(m, key, path) else {
            return default;
        };
        match t.value.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "1" => true,
            "false" | "no" | "off" | "0" => false,
            "" => default,
            other => {
                self.error(
                    &join(path, key),
                    format!("expected true or false, found {other:?}"),
                );
                default
            }
        }
    }

    fn number(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<f64> {
        let t = self.text(m, key, path)?;
        let s = t.value.trim();
        if s.is_empty() {
            return None;
        }
        match s.parse::<f64>() {
            Ok(n) if n.is_finite() => Some(n),
            _ => {
                self.error(&join(path, key), format!("expected a number, found {s:?}"));
                None
            }
        }
    }

    fn integer(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
        min: i64,
        max: i64,
    ) -> Option<i64> {
        let n = self.number(m, key, path)?;
        if n.fract() != 0.0 || n < min as f64 || n > max as f64 {
            self.error(
                &join(path, key),
                format!("expected a whole number from {min} to {max}, found {n}"),
            );
            return None;
        }
        Some(n as i64)
    }

    fn unsigned(&mut self, m: &Map<String, Value>, key: &str, path: &str, default: u64) -> u64 {
        self.integer(m, key, path, 0, i64::MAX)
            .map_or(default, |n| n as u64)
    }

    fn seconds(&mut self, m: &Map<String, Value>, key: &str, path: &str, default: f64) -> Duration {
        match self.number(m, key, path) {
            Some(n) if (0.0..1e9).contains(&n) => Duration::from_secs_f64(n),
            Some(n) => {
                self.error(
                    &join(path, key),
                    format!("expected seconds from 0 to 1e9, found {n}"),
                );
                Duration::from_secs_f64(default)
            }
            None => Duration::from_secs_f64(default),
        }
    }

    fn string_list(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Vec<String> {
        match m.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![self.expand(s).value],
            Some(Value::Array(items)) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(self.expand(s).value),
                        Value::Number(n) => out.push(n.to_string()),
                        _ => self.error(&format!("{}[{i}]", join(path, key)), "expected a string"),
                    }
                }
                out
            }
            Some(_) => {
                self.error(&join(path, key), "expected a list of strings");
                Vec::new()
            }
        }
    }

    fn config(&mut self, root: &Value) -> Config {
        let empty = Map::new();
        let top = match root {
            Value::Null => {
                self.error(
                    "(file)",
                    "is empty: expected `providers`, `model_routes` and `settings`",
                );
                &empty
            }
            Value::Object(m) => m,
            _ => {
                self.error(
                    "(file)",
                    "expected a mapping with `providers`, `model_routes` and `settings`",
                );
                &empty
            }
        };
        self.check_keys(top, "", TOP_KEYS, &[]);
        let providers = self.providers(top.get("providers"));
        let routes = self.routes(top.get("model_routes"), &providers);
        let settings_map = self.map(top.get("settings"), "settings").unwrap_or(&empty);
        let settings = self.settings(settings_map);
        let clients = self.clients(top.get("clients"));
        let pricing = self.pricing(top.get("pricing"));
        let models = self.models(top.get("models"));
        // A client key that is also an admin or shared key would give that client more than its own.
        for c in &clients {
            let ClientKey::Plain(k) = &c.key else {
                continue;
            };
            let auth = &settings.auth;
            if auth
                .admin_keys
                .iter()
                .chain(&auth.api_keys)
                .any(|a| a.expose() == k.expose())
            {
                self.error(
                    "clients",
                    format!(
                        "{:?} has a key of settings.auth.api_keys or admin_keys: give it its own",
                        c.name
                    ),
                );
            }
        }
        if settings.auth.enabled && settings.auth.api_keys.is_empty() && clients.is_empty() {
            self.error(
                "settings.auth.api_keys",
                "auth is enabled but no key is configured: every request would be refused",
            );
        }
        Config {
            providers,
            routes,
            settings,
            clients,
            pricing,
            models,
        }
    }

    /// `auth_value` as text, or `None` when it is a list (a key pool, read by [`Self::key_pool`])
    /// or when a pool was given by `keys:` (`pooled`).
    fn text_or_list(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
        pooled: bool,
    ) -> Option<Expanded> {
        if pooled || matches!(m.get(key), Some(Value::Array(_))) {
            return None;
        }
        self.text(m, key, path)
    }

    /// A key pool: `auth_value` as a list of keys, or `keys:` (a list of `{name, value}`). Keys
    /// whose value is empty or an unset variable are left out, with a warning. `None` when the
    /// provider has no pool.
    fn key_pool(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        label: &str,
        credential: &dyn Fn(String) -> Auth,
    ) -> Option<Vec<PoolKey>> {
        let listed = match m.get("auth_value") {
            Some(Value::Array(items)) => Some(items),
            _ => None,
        };
        let named = match m.get("keys") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(items),
            Some(_) => {
                self.error(&join(path, "keys"), "expected a list of { name, value }");
                return None;
            }
        };
        if named.is_some() && m.get("auth_value").is_some_and(|v| !v.is_null()) {
            self.error(path, "give auth_value or keys, not both");
            return None;
        }
        let (items, field) = match (listed, named) {
            (None, None) => return None,
            (Some(_), Some(_)) => {
                self.error(path, "give auth_value as a list or keys, not both");
                return None;
            }
            (Some(items), None) => (items, "auth_value"),
            (None, Some(items)) => (items, "keys"),
        };
        let mut pool: Vec<PoolKey> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item_path = format!("{}[{i}]", join(path, field));
            let (name, raw) = match item {
                Value::String(v) => (format!("key-{}", i + 1), v.clone()),
                Value::Object(k) if field == "keys" => {
                    self.check_keys(k, &item_path, &["name", "value"], &[]);
                    let name = self
                        .string(k, "name", &item_path)
                        .map(|n| n.trim().to_owned())
                        .filter(|n| !n.is_empty())
                        .unwrap_or_else(|| format!("key-{}", i + 1));
                    match k.get("value") {
                        Some(Value::String(v)) => (name, v.clone()),
                        _ => {
                            self.error(&join(&item_path, "value"), "is required (a key or ${VAR})");
                            continue;
                        }
                    }
                }
                _ => {
                    self.error(&item_path, "expected a key (a string)");
                    continue;
                }
            };
            if pool.iter().any(|k| k.name == name) {
                self.error(&item_path, format!("the key name {name:?} is used twice"));
                continue;
            }
            let Expanded { value, unset } = self.expand(&raw);
            let value = value.trim().to_owned();
            if value.eq_ignore_ascii_case("passthrough") || value.eq_ignore_ascii_case("oauth") {
                self.error(&item_path, format!("{value:?} cannot be one key of a pool"));
                continue;
            }
            if value.is_empty() {
                let why = if unset.is_empty() {
                    "it is empty".to_owned()
                } else {
                    format!("environment variable {} is not set", unset.join(", "))
                };
                self.warn(
                    &item_path,
                    format!("provider {label:?}: key {name:?} is left out of the pool ({why})"),
                );
                continue;
            }
            pool.push(PoolKey {
                name,
                auth: credential(value),
            });
        }
        if pool.is_empty() {
            self.warn(
                &join(path, field),
                format!("provider {label:?} has no credentials (no key of its pool is set)"),
            );
        }
        Some(pool)
    }

    /// `clients:`: named client keys with their models and limits.
    fn clients(&mut self, v: Option<&Value>) -> Vec<ClientConfig> {
        let items = match v {
            None | Some(Value::Null) => return Vec::new(),
            Some(Value::Array(items)) => items,
            Some(_) => {
                self.error("clients", "expected a list of clients");
                return Vec::new();
            }
        };
        let mut out: Vec<ClientConfig> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let path = format!("clients[{i}]");
            let Some(m) = self.map(Some(item), &path) else {
                continue;
            };
            self.check_keys(
                m,
                &path,
                &["name", "key", "key_sha256", "models", "limits"],
                &[],
            );
            let Some(name) = self.required_string(m, "name", &path) else {
                continue;
            };
            if out.iter().any(|c| c.name == name) {
                self.error(
                    &join(&path, "name"),
                    format!("{name:?} is used by another client"),
                );
            }
            let key = match (
                self.text(m, "key", &path),
                self.string(m, "key_sha256", &path),
            ) {
                (Some(_), Some(_)) => {
                    self.error(&path, "give either key or key_sha256, not both");
                    continue;
                }
                (Some(k), None) if !k.unset.is_empty() => {
                    let shown: Vec<String> = k.unset.iter().map(|v| format!("${{{v}}}")).collect();
                    self.error(
                        &join(&path, "key"),
                        format!("uses {} which is not set", shown.join(", ")),
                    );
                    continue;
                }
                (Some(k), None) if k.value.trim().is_empty() => {
                    self.error(&join(&path, "key"), "must not be empty");
                    continue;
                }
                (Some(k), None) => ClientKey::Plain(Secret::new(k.value.trim())),
                (None, Some(hex)) => match sha256_hex(&hex) {
                    Some(digest) => ClientKey::Sha256(digest),
                    None => {
                        self.error(
                            &join(&path, "key_sha256"),
                            "expected 64 hexadecimal digits (the SHA-256 of the key)",
                        );
                        continue;
                    }
                },
                (None, None) => {
                    self.error(&path, "a client needs key or key_sha256");
                    continue;
                }
            };
            let models = self.string_list(m, "models", &path);
            let limits_path = join(&path, "limits");
            let limits = match self.map(m.get("limits"), &limits_path) {
                Some(l) => self.limits(l, &limits_path),
                None => Limits::default(),
            };
            out.push(ClientConfig {
                name,
                key,
                models,
                limits,
            });
        }
        // Two clients with one key: a request could not tell them apart.
        for (i, a) in out.iter().enumerate() {
            for b in &out[i + 1..] {
                if same_key(&a.key, &b.key) {
                    self.error(
                        "clients",
                        format!("{:?} and {:?} have the same key", a.name, b.name),
                    );
                }
            }
        }
        out
    }

    fn limits(&mut self, m: &Map<String, Value>, path: &str) -> Limits {
        self.check_keys(
            m,
            path,
            &[
                "requests_per_minute",
                "concurrent_requests",
                "tokens",
                "budget_usd",
            ],
            &[],
        );
        Limits {
            requests_per_minute: self
                .integer(m, "requests_per_minute", path, 1, i64::MAX)
                .map(|n| n as u64),
            concurrent_requests: self
                .integer(m, "concurrent_requests", path, 1, i64::MAX)
                .map(|n| n as u64),
            tokens: self.window_limit(m, "tokens", path),
            budget_usd: self.window_limit(m, "budget_usd", path),
        }
    }

    /// `{ window: "5h", max: 2000000 }`.
    fn window_limit(
        &mut self,
        m: &Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Option<WindowLimit> {
        let path = join(path, key);
        let l = self.map(m.get(key), &path)?;
        self.check_keys(l, &path, &["window", "max"], &[]);
        let window = match self.string(l, "window", &path) {
            Some(w) => match Window::parse(&w) {
                Some(w) => w,
                None => {
                    let all: Vec<&str> = Window::ALL.iter().map(|w| w.as_str()).collect();
                    self.error(
                        &join(&path, "window"),
                        format!("expected one of {}, found {w:?}", all.join(", ")),
                    );
                    return None;
                }
            },
            None => {
                self.error(&join(&path, "window"), "is required");
                return None;
            }
        };
        match self.number(l, "max", &path) {
            Some(max) if max > 0.0 => Some(WindowLimit { window, max }),
            Some(max) => {
                self.error(&join(&path, "max"), format!("must be above 0, found {max}"));
                None
            }
            None => {
                self.error(&join(&path, "max"), "is required");
                None
            }
        }
    }

    /// `pricing:`: USD per million tokens by upstream model glob.
    fn pricing(&mut self, v: Option<&Value>) -> Vec<PriceConfig> {
        let Some(m) = self.map(v, "pricing") else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(m.len());
        for (pattern, prices) in m {
            let path = join("pricing", pattern);
            let Some(p) = self.map(Some(prices), &path) else {
                continue;
            };
            self.check_keys(
                p,
                &path,
                &["input", "output", "cache_write", "cache_read"],
                &[],
            );
            let mut price = |key: &str| match self.number(p, key, &path) {
                Some(n) if n >= 0.0 => Some(n),
                Some(n) => {
                    self.error(
                        &join(&path, key),
                        format!("must not be negative, found {n}"),
                    );
                    None
                }
                None => None,
            };
            let (input, output) = (price("input"), price("output"));
            let (cache_write, cache_read) = (price("cache_write"), price("cache_read"));
            let (Some(input), Some(output)) = (input, output) else {
                self.error(&path, "input and output prices are required");
                continue;
            };
            out.push(PriceConfig {
                pattern: pattern.clone(),
                input,
                output,
                // Anthropic's rule when not given: writes cost 1.25 times input, reads a tenth.
                cache_write: cache_write.unwrap_or(input * 1.25),
                cache_read: cache_read.unwrap_or(input * 0.1),
            });
        }
        out
    }

    /// `settings.usage`.
    fn usage(&mut self, v: Option<&Value>) -> UsageSettings {
        let path = "settings.usage";
        let mut out = UsageSettings::default();
        let Some(m) = self.map(v, path) else {
            return out;
        };
        self.check_keys(m, path, &["path"], &[]);
        if let Some(p) = self.string(m, "path", path) {
            out.path = p.trim().to_owned();
        }
        out
    }

    fn providers(&mut self, v: Option<&Value>) -> Vec<ProviderConfig> {
        let items = match v {
            Some(Value::Array(items)) => items,
            None | Some(Value::Null) => {
                self.error("providers", "is required: a list of providers");
                return Vec::new();
            }
            Some(_) => {
                self.error("providers", "expected a list");
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.warn(
                "providers",
                "the list is empty: every request will be answered with an error",
            );
        }
        let mut out: Vec<ProviderConfig> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let path = format!("providers[{i}]");
            let Some(m) = self.map(Some(item), &path) else {
                if item.is_null() {
                    self.error(&path, "expected a mapping");
                }
                continue;
            };
            if let Some(p) = self.provider(m, &path) {
                if out.iter().any(|o| o.name == p.name) {
                    self.error(
                        &join(&path, "name"),
                        format!("duplicate provider name {:?}", p.name),
                    );
                } else {
                    out.push(p);
                }
            }
        }
        out
    }

    fn provider(&mut self, m: &Map<String, Value>, path: &str) -> Option<ProviderConfig> {
        self.check_keys(m, path, PROVIDER_KEYS, PROVIDER_IGNORED);
        let name = self.required_string(m, "name", path);
        let label = name.clone().unwrap_or_else(|| path.to_owned());
        let kind = match self
            .required_string(m, "type", path)
            .map(|t| t.to_ascii_lowercase())
        {
            Some(t) if t == "anthropic" => Some(ProviderKind::Anthropic),
            Some(t) if t == "openai" => Some(ProviderKind::Openai),
            Some(t) => {
                self.error(
                    &join(path, "type"),
                    format!("expected \"anthropic\" or \"openai\", found {t:?}"),
                );
                None
            }
            None => None,
        };
        let base_url = self.required_string(m, "base_url", path).and_then(|u| {
            let trimmed = u.trim_end_matches('/').to_owned();
            match reqwest::Url::parse(&trimmed) {
                // Requests are sent with this text as it is: it must also be a valid request URI
                // (an international host in its `xn--` form, spaces percent-encoded).
                Ok(url)
                    if matches!(url.scheme(), "http" | "https")
                        && url.host().is_some()
                        && trimmed.parse::<http::Uri>().is_ok() =>
                {
                    Some(trimmed)
                }
                _ => {
                    self.error(
                        &join(path, "base_url"),
                        format!(
                            "expected an absolute http(s) URL in ASCII (an international host in its xn-- form), found {u:?}"
                        ),
                    );
                    None
                }
            }
        });
        let auth_type = self
            .required_string(m, "auth_type", path)
            .map(|t| t.to_ascii_lowercase());
        if let Some(t) = &auth_type {
            if !matches!(t.as_str(), "api_key" | "auth_token" | "bearer") {
                self.error(
                    &join(path, "auth_type"),
                    format!("expected \"api_key\", \"auth_token\" or \"bearer\", found {t:?}"),
                );
            }
        }
        let mut disabled_reason = None;
        let credential = |value: String| {
            if kind == Some(ProviderKind::Anthropic) && auth_type.as_deref() == Some("api_key") {
                Auth::ApiKey(Secret::new(value))
            } else {
                Auth::Bearer(Secret::new(value))
            }
        };
        let pool = self.key_pool(m, path, &label, &credential);
        let auth = match self.text_or_list(m, "auth_value", path, pool.is_some()) {
            _ if pool.is_some() => pool
                .as_ref()
                .and_then(|p| p.first())
                .map_or(Auth::None, |k| k.auth.clone()),
            None => {
                if !m.contains_key("auth_value") {
                    self.error(
                        &join(path, "auth_value"),
                        "is required (it may be empty, `passthrough` or `${VAR}`)",
                    );
                }
                Auth::None
            }
            Some(Expanded { value, unset }) => {
                let value = value.trim().to_owned();
                if value.eq_ignore_ascii_case("passthrough") {
                    Auth::Passthrough
                } else if value.eq_ignore_ascii_case("oauth") {
                    disabled_reason = Some("auth_value `oauth` is not supported".to_owned());
                    self.warn(
                        &join(path, "auth_value"),
                        format!(
                            "provider {label:?}: `oauth` is not supported; the provider is disabled"
                        ),
                    );
                    Auth::None
                } else if value.is_empty() {
                    let why = if unset.is_empty() {
                        "auth_value is empty".to_owned()
                    } else {
                        format!("environment variable {} is not set", unset.join(", "))
                    };
                    self.warn(
                        &join(path, "auth_value"),
                        format!("provider {label:?} has no credentials ({why})"),
                    );
                    Auth::None
                } else {
                    credential(value)
                }
            }
        };
        let keys = pool.filter(|p| p.len() >= 2).unwrap_or_default();
        let enabled = self.bool(m, "enabled", path, true);
        let proxy = self
            .string(m, "proxy", path)
            .filter(|p| !p.trim().is_empty())
            .and_then(|p| {
                let p = p.trim().to_owned();
                let ok = reqwest::Url::parse(&p)
                    .map(|u| {
                        matches!(u.scheme(), "http" | "https" | "socks5" | "socks5h")
                            && u.host().is_some()
                    })
                    .unwrap_or(false);
                if ok {
                    Some(Secret::new(p))
                } else {
                    self.error(
                        &join(path, "proxy"),
                        format!(
                            "expected an http, https, socks5 or socks5h URL, found {:?}",
                            crate::secret::mask_url_credentials(&p)
                        ),
                    );
                    None
                }
            });
        let max_tokens_cap = self
            .integer(m, "max_tokens_cap", path, 1, i64::MAX)
            .map(|n| n as u64);
        let detected = base_url
            .as_deref()
            .map_or(Dialect::Generic, Dialect::detect);
        let dialect = match self
            .string(m, "dialect", path)
            .map(|d| d.trim().to_ascii_lowercase())
        {
            None => detected,
            Some(d) => match d.as_str() {
                "" | "auto" => detected,
                "openai" => Dialect::Openai,
                "openrouter" => Dialect::Openrouter,
                "deepseek" => Dialect::Deepseek,
                "vllm" => Dialect::Vllm,
                "generic" => Dialect::Generic,
                other => {
                    self.error(
                        &join(path, "dialect"),
                        format!("expected auto, openai, openrouter, deepseek, vllm or generic, found {other:?}"),
                    );
                    Dialect::Generic
                }
            },
        };
        let sanitize_default = base_url
            .as_deref()
            .is_some_and(|u| u.contains("generativelanguage.googleapis.com"));
        let sanitize_schemas = self.bool(m, "sanitize_schemas", path, sanitize_default);
        let responses = self.bool(m, "responses", path, false);
        if responses && kind == Some(ProviderKind::Anthropic) {
            self.error(
                &join(path, "responses"),
                "only an openai-type provider can speak the Responses API",
            );
        }
        Some(ProviderConfig {
            name: name?,
            kind: kind?,
            base_url: base_url?,
            auth,
            keys,
            enabled,
            disabled_reason,
            proxy,
            max_tokens_cap,
            dialect,
            sanitize_schemas,
            models: self.string_list(m, "models", path),
            responses,
        })
    }

    fn routes(&mut self, v: Option<&Value>, providers: &[ProviderConfig]) -> Vec<RouteConfig> {
        let Some(m) = self.map(v, "model_routes") else {
            if v.is_none() {
                self.warn("model_routes", "missing: no model can be routed");
            }
            return Vec::new();
        };
        let mut out = Vec::with_capacity(m.len());
        for (pattern, entries) in m {
            let path = join("model_routes", pattern);
            let items = match entries {
                Value::Array(items) => items.as_slice(),
                Value::Null => &[],
                _ => {
                    self.error(&path, "expected a list of route entries");
                    continue;
                }
            };
            if items.is_empty() {
                self.warn(&path, "the route has no entries");
            }
            let mut route = RouteConfig {
                pattern: pattern.clone(),
                entries: Vec::with_capacity(items.len()),
            };
            for (j, item) in items.iter().enumerate() {
                let entry_path = format!("{path}[{j}]");
                let Some(e) = self.map(Some(item), &entry_path) else {
                    if item.is_null() {
                        self.error(&entry_path, "expected a mapping");
                    }
                    continue;
                };
                if let Some(entry) = self.entry(e, &entry_path, providers) {
                    route.entries.push(entry);
                }
            }
            out.push(route);
        }
        out
    }

    fn entry(
        &mut self,
        m: &Map<String, Value>,
        path: &str,
        providers: &[ProviderConfig],
    ) -> Option<RouteEntry> {
        self.check_keys(m, path, ENTRY_KEYS, ENTRY_IGNORED);
        let provider = self.required_string(m, "provider", path);
        if let Some(name) = &provider {
            if !providers.iter().any(|p| &p.name == name) {
                let msg = match suggestion(name, providers.iter().map(|p| p.name.as_str())) {
                    Some(s) => format!("no provider named {name:?} (did you mean {s:?}?)"),
                    None => format!("no provider named {name:?}"),
                };
                self.error(&join(path, "provider"), msg);
            }
        }
        let model = match self.string(m, "model", path).map(|s| s.trim().to_owned()) {
            None => ModelMapping::Passthrough,
            Some(s) if s.is_empty() || s.eq_ignore_ascii_case("passthrough") => {
                ModelMapping::Passthrough
            }
            Some(s) => ModelMapping::Name(s),
        };
        let priority = self
            .integer(
                m,
                "priority",
                path,
                i64::from(i32::MIN),
                i64::from(i32::MAX),
            )
            .unwrap_or(1);
        let enabled = self.bool(m, "enabled", path, true);
        let weight = self
            .integer(m, "weight", path, 0, i64::from(u32::MAX))
            .map_or(1, |w| w as u32);
        let capabilities = self.capabilities(m, path);
        let when = self.conditions(m.get("when"), &join(path, "when"));
        Some(RouteEntry {
            provider: provider?,
            model,
            priority,
            enabled,
            weight,
            capabilities,
            when,
        })
    }

    /// A boolean that may be absent (`None`).
    fn maybe_bool(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<bool> {
        m.get(key).filter(|v| !v.is_null())?;
        Some(self.bool(m, key, path, false))
    }

    /// A positive token count that may be absent.
    fn tokens(&mut self, m: &Map<String, Value>, key: &str, path: &str) -> Option<u64> {
        let n = self.integer(m, key, path, 0, i64::from(u32::MAX))?;
        if n == 0 {
            self.error(&join(path, key), "must be greater than 0");
            return None;
        }
        Some(n as u64)
    }

    /// The capability keys of a route entry or a `models:` entry.
    fn capabilities(&mut self, m: &Map<String, Value>, path: &str) -> Capabilities {
        let caps = Capabilities {
            context_window: self.tokens(m, "context_window", path),
            max_output_tokens: self.tokens(m, "max_output_tokens", path),
            images: self.maybe_bool(m, "images", path),
            tools: self.maybe_bool(m, "tools", path),
            thinking: self.maybe_bool(m, "thinking", path),
        };
        if let (Some(w), Some(o)) = (caps.context_window, caps.max_output_tokens) {
            if o >= w {
                self.error(
                    &join(path, "max_output_tokens"),
                    format!("must be smaller than context_window ({w}), found {o}"),
                );
            }
        }
        caps
    }

    /// `when:` of a route entry.
    fn conditions(&mut self, v: Option<&Value>, path: &str) -> Conditions {
        let Some(m) = self.map(v, path) else {
            return Conditions::default();
        };
        self.check_keys(m, path, CONDITION_KEYS, &[]);
        let mut header = Vec::new();
        if let Some(h) = self.map(m.get("header"), &join(path, "header")) {
            for (name, value) in h {
                let hpath = join(&join(path, "header"), name);
                if http::HeaderName::from_bytes(name.trim().as_bytes()).is_err() {
                    self.error(&hpath, "not a valid header name");
                    continue;
                }
                match value {
                    Value::String(s) => {
                        header.push((name.trim().to_ascii_lowercase(), self.expand(s).value))
                    }
                    Value::Number(_) | Value::Bool(_) => {
                        header.push((name.trim().to_ascii_lowercase(), value.to_string()))
                    }
                    _ => self.error(&hpath, "expected a value (a glob: `*` and `?` allowed)"),
                }
            }
        }
        Conditions {
            thinking: self.maybe_bool(m, "thinking", path),
            min_input_tokens: self.tokens(m, "min_input_tokens", path),
            images: self.maybe_bool(m, "images", path),
            tools: self.maybe_bool(m, "tools", path),
            background: self.maybe_bool(m, "background", path),
            subagent: self.maybe_bool(m, "subagent", path),
            header,
        }
    }

    /// `models:`: capabilities by upstream model glob.
    fn models(&mut self, v: Option<&Value>) -> Vec<ModelConfig> {
        let Some(m) = self.map(v, "models") else {
            return Vec::new();
        };
        let mut out = Vec::with_capacity(m.len());
        for (pattern, caps) in m {
            let path = join("models", pattern);
            let Some(c) = self.map(Some(caps), &path) else {
                continue;
            };
            self.check_keys(c, &path, CAPABILITY_KEYS, &[]);
            out.push(ModelConfig {
                pattern: pattern.clone(),
                capabilities: self.capabilities(c, &path),
            });
        }
        out
    }

    fn timeout_set(&mut self, m: Option<&Map<String, Value>>, path: &str) -> TimeoutSet {
        let empty = Map::new();
        let m = m.unwrap_or(&empty);
        self.check_keys(
            m,
            path,
            &["connect_timeout", "read_timeout"],
            // `pool_timeout` bounded the earlier program's wait for a free pooled connection;
            // connections here are opened on demand, so there is no such wait.
            &[
                "chunk_timeout",
                "first_chunk_timeout",
                "processing_timeout",
                "pool_timeout",
            ],
        );
        TimeoutSet {
            connect: self.seconds(m, "connect_timeout", path, 30.0),
            read: self.seconds(m, "read_timeout", path, 120.0),
        }
    }

    fn settings(&mut self, m: &Map<String, Value>) -> Settings {
        let path = "settings";
        let empty = Map::new();
        self.check_keys(m, path, SETTINGS_KEYS, SETTINGS_IGNORED);

        let selection_strategy = match self
            .string(m, "selection_strategy", path)
            .map(|s| s.trim().to_ascii_lowercase())
        {
            None => Strategy::Priority,
            Some(s) => match s.as_str() {
                "priority" | "" => Strategy::Priority,
                "round_robin" | "round-robin" | "roundrobin" => Strategy::RoundRobin,
                "random" => Strategy::Random,
                "weighted" => Strategy::Weighted,
                "least_latency" | "latency" => Strategy::LeastLatency,
                other => {
                    self.error(
                        &join(path, "selection_strategy"),
                        format!(
                            "expected priority, round_robin, random, weighted or least_latency, found {other:?}"
                        ),
                    );
                    Strategy::Priority
                }
            },
        };
        let failure_cooldown = if m.contains_key("failure_cooldown") {
            self.seconds(m, "failure_cooldown", path, 60.0)
        } else {
            self.seconds(m, "cooldown_seconds", path, 60.0)
        };
        let unhealthy_threshold = self
            .integer(m, "unhealthy_threshold", path, 1, i64::from(u32::MAX))
            .unwrap_or(1) as u32;

        let timeouts_map = self
            .map(m.get("timeouts"), "settings.timeouts")
            .unwrap_or(&empty);
        self.check_keys(
            timeouts_map,
            "settings.timeouts",
            &["non_streaming", "streaming", "caching"],
            &["health_check"],
        );
        let ns = self.map(
            timeouts_map.get("non_streaming"),
            "settings.timeouts.non_streaming",
        );
        let non_streaming = self.timeout_set(ns, "settings.timeouts.non_streaming");
        let st = self.map(timeouts_map.get("streaming"), "settings.timeouts.streaming");
        let streaming = self.timeout_set(st, "settings.timeouts.streaming");
        let caching = self
            .map(timeouts_map.get("caching"), "settings.timeouts.caching")
            .unwrap_or(&empty);
        self.check_keys(
            caching,
            "settings.timeouts.caching",
            &["deduplication_timeout"],
            &["cache_operation_timeout"],
        );
        let deduplication_timeout = self.seconds(
            caching,
            "deduplication_timeout",
            "settings.timeouts.caching",
            300.0,
        );

        let unhealthy_http_codes = match m.get("unhealthy_http_codes") {
            None | Some(Value::Null) => StatusSet::default_unhealthy(),
            Some(Value::Array(items)) => {
                let mut set = StatusSet::empty();
                for (i, item) in items.iter().enumerate() {
                    let code = match item {
                        Value::Number(n) => n.as_u64(),
                        Value::String(s) => self.expand(s).value.trim().parse::<u64>().ok(),
                        _ => None,
                    };
                    match code {
                        Some(c) if (100..600).contains(&c) => set.insert(c as u16),
                        _ => self.error(
                            &format!("settings.unhealthy_http_codes[{i}]"),
                            "expected an HTTP status from 100 to 599",
                        ),
                    }
                }
                set
            }
            Some(_) => {
                self.error(
                    "settings.unhealthy_http_codes",
                    "expected a list of HTTP statuses",
                );
                StatusSet::default_unhealthy()
            }
        };
        let unhealthy_exception_patterns =
            self.string_list(m, "unhealthy_exception_patterns", path);
        let body_patterns = self.string_list(m, "unhealthy_response_body_patterns", path);
        let mut valid = Vec::with_capacity(body_patterns.len());
        for (i, p) in body_patterns.iter().enumerate() {
            match regex::Regex::new(p) {
                Ok(_) => valid.push(p.clone()),
                Err(e) => self.error(
                    &format!("settings.unhealthy_response_body_patterns[{i}]"),
                    format!("invalid regex: {e}"),
                ),
            }
        }
        let unhealthy_response_body_patterns = if valid.is_empty() {
            None
        } else {
            RegexSet::new(&valid).ok()
        };

        let tc = self
            .map(m.get("token_counting"), "settings.token_counting")
            .unwrap_or(&empty);
        let tc_path = "settings.token_counting";
        self.check_keys(
            tc,
            tc_path,
            &[
                "always_use_local",
                "failure_threshold",
                "api_failure_cooldown",
                "timeout_override",
            ],
            &[],
        );
        let token_counting = TokenCounting {
            always_use_local: self.bool(tc, "always_use_local", tc_path, false),
            failure_threshold: self
                .integer(tc, "failure_threshold", tc_path, 1, i64::from(u32::MAX))
                .unwrap_or(2) as u32,
            api_failure_cooldown: self.seconds(tc, "api_failure_cooldown", tc_path, 300.0),
            timeout: self.seconds(tc, "timeout_override", tc_path, 10.0),
        };

        let dd = self
            .map(m.get("deduplication"), "settings.deduplication")
            .unwrap_or(&empty);
        let dd_path = "settings.deduplication";
        self.check_keys(
            dd,
            dd_path,
            &["enabled", "include_max_tokens_in_signature"],
            // The earlier program kept a failed stream's flight this long; here a flight ends
            // with its answer and errors are never cached.
            &["sse_error_cleanup_delay"],
        );
        let deduplication = Deduplication {
            enabled: self.bool(dd, "enabled", dd_path, true),
            include_max_tokens_in_signature: self.bool(
                dd,
                "include_max_tokens_in_signature",
                dd_path,
                false,
            ),
        };

        let log_level = self
            .string(m, "log_level", path)
            .unwrap_or_else(|| "INFO".to_owned());
        if !matches!(
            log_level.trim().to_ascii_uppercase().as_str(),
            "TRACE" | "DEBUG" | "INFO" | "WARN" | "WARNING" | "ERROR" | "CRITICAL"
        ) {
            self.error(
                "settings.log_level",
                format!("expected DEBUG, INFO, WARNING, ERROR or CRITICAL, found {log_level:?}"),
            );
        }

        let au = self.map(m.get("auth"), "settings.auth").unwrap_or(&empty);
        let au_path = "settings.auth";
        self.check_keys(
            au,
            au_path,
            &["enabled", "api_keys", "admin_keys", "exempt_paths"],
            &[],
        );
        let auth = InboundAuth {
            enabled: self.bool(au, "enabled", au_path, false),
            api_keys: self
                .string_list(au, "api_keys", au_path)
                .into_iter()
                .filter(|k| !k.is_empty())
                .map(Secret::new)
                .collect(),
            admin_keys: self
                .string_list(au, "admin_keys", au_path)
                .into_iter()
                .filter(|k| !k.is_empty())
                .map(Secret::new)
                .collect(),
            // Absent: `/health` needs no key (load balancers and probes call it); `[]`: every path does.
            exempt_paths: if au.contains_key("exempt_paths") {
                self.string_list(au, "exempt_paths", au_path)
            } else {
                vec!["/health".to_owned()]
            },
        };

        let port = self
            .integer(m, "port", path, 0, 65535)
            .map_or(9090, |p| p as u16);
        let state = self.state(m.get("state"));
        let usage = self.usage(m.get("usage"));
        Settings {
            selection_strategy,
            failure_cooldown,
            unhealthy_threshold,
            unhealthy_reset_on_success: self.bool(m, "unhealthy_reset_on_success", path, true),
            unhealthy_reset_timeout: self.seconds(m, "unhealthy_reset_timeout", path, 300.0),
            sticky_provider_duration: self.seconds(m, "sticky_provider_duration", path, 300.0),
            timeout: self.seconds(m, "timeout_seconds", path, 300.0),
            timeouts: Timeouts {
                non_streaming,
                streaming,
                deduplication: deduplication_timeout,
            },
            unhealthy_http_codes,
            unhealthy_exception_patterns,
            unhealthy_response_body_patterns,
            token_counting,
            deduplication,
            max_cache_size: self.unsigned(m, "max_cache_size", path, 0),
            cache_ttl: self.seconds(m, "cache_ttl_seconds", path, 300.0),
            log_level,
            log_color: self.bool(m, "log_color", path, true),
            log_file_path: self
                .string(m, "log_file_path", path)
                .unwrap_or_else(|| "logs/logs.jsonl".to_owned()),
            host: self
                .string(m, "host", path)
                .unwrap_or_else(|| "127.0.0.1".to_owned()),
            port,
            app_name: self
                .string(m, "app_name", path)
                .unwrap_or_else(|| "claude-balancer".to_owned()),
            app_version: self
                .string(m, "app_version", path)
                .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_owned()),
            reload: self.bool(m, "reload", path, false),
            auth,
            max_request_bytes: self.unsigned(m, "max_request_bytes", path, 32 * 1024 * 1024)
                as usize,
            max_concurrent_requests: self.unsigned(m, "max_concurrent_requests", path, 0),
            shutdown_grace: self.seconds(m, "shutdown_grace_seconds", path, 30.0),
            state,
            usage,
        }
    }

    /// `settings.state`: the backend of state shared between instances.
    fn state(&mut self, v: Option<&Value>) -> StateSettings {
        let path = "settings.state";
        let empty = Map::new();
        let m = self.map(v, path).unwrap_or(&empty);
        self.check_keys(m, path, &["backend", "redis", "instance_name"], &[]);
        let mut out = StateSettings::default();
        match self.string(m, "backend", path).as_deref().map(str::trim) {
            None | Some("memory") => {}
            Some("redis") => out.backend = StateBackend::Redis,
            Some(other) => self.error(
                &join(path, "backend"),
                format!("expected memory or redis, found {other:?}"),
            ),
        }
        out.instance_name = self
            .string(m, "instance_name", path)
            .map(|n| n.trim().to_owned())
            .filter(|n| !n.is_empty());
        let redis_path = "settings.state.redis";
        let r = self.map(m.get("redis"), redis_path).unwrap_or(&empty);
        self.check_keys(r, redis_path, &["url", "key_prefix"], &[]);
        if let Some(prefix) = self.string(r, "key_prefix", redis_path) {
            out.key_prefix = prefix;
        }
        match self.text(r, "url", redis_path) {
            Some(url) if !url.unset.is_empty() => {
                let shown: Vec<String> = url.unset.iter().map(|v| format!("${{{v}}}")).collect();
                if out.backend == StateBackend::Redis {
                    self.error(
                        &join(redis_path, "url"),
                        format!("uses {} which is not set", shown.join(", ")),
                    );
                }
            }
            Some(url) => {
                let scheme_ok = ["redis://", "rediss://", "redis+unix://", "unix://"]
                    .iter()
                    .any(|s| url.value.starts_with(s));
                if !scheme_ok {
                    self.error(
                        &join(redis_path, "url"),
                        "expected a redis:// or rediss:// URL",
                    );
                } else {
                    out.redis_url = Some(Secret::new(url.value));
                }
            }
            None if out.backend == StateBackend::Redis => self.error(
                &join(redis_path, "url"),
                "required when settings.state.backend is redis",
            ),
            None => {}
        }
        out
    }
}
