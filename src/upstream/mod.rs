//! The upstream side: one pooled HTTP client per outbound proxy, the runtime form of a provider,
//! and the header rules for requests to providers and responses from them.

pub mod client;
pub mod sse;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use http::Uri;
use http::header::{AUTHORIZATION, HeaderMap, HeaderName, HeaderValue};

pub use client::{Client, TransportError, UpstreamResponse};

use crate::config::{Auth, ProviderConfig, ProviderKind};
use crate::secret::Secret;

/// A configured provider, ready to be called.
#[derive(Debug)]
pub struct Provider {
    pub config: ProviderConfig,
    /// `config.name`, shared (the affinity book keeps it without a copy).
    pub name: Arc<str>,
    pub client: Client,
    /// `POST` target for messages (anthropic) or chat completions (openai).
    pub messages_url: String,
    /// `POST` target for count_tokens (anthropic only).
    pub count_tokens_url: String,
    /// `POST` target for the Responses API (openai only).
    pub responses_url: String,
    /// `messages_url` parsed once.
    messages_target: Option<Uri>,
    /// `Basic` credentials from a `base_url` written as `https://user:password@host/…`, sent when
    /// the request carries no other `authorization` (as reqwest did).
    url_credentials: Option<HeaderValue>,
}

impl Provider {
    pub fn new(config: ProviderConfig, client: Client) -> Self {
        let (base, url_credentials) = split_credentials(&config.base_url);
        let base = base.trim_end_matches('/');
        let (messages_url, count_tokens_url) = match config.kind {
            ProviderKind::Anthropic => {
                let v1 = if base.ends_with("/v1") {
                    base.to_owned()
                } else {
                    format!("{base}/v1")
                };
                (
                    format!("{v1}/messages"),
                    format!("{v1}/messages/count_tokens"),
                )
            }
            ProviderKind::Openai => (format!("{base}/chat/completions"), String::new()),
        };
        let responses_url = format!("{base}/responses");
        Self {
            name: Arc::from(config.name.as_str()),
            config,
            client,
            messages_target: messages_url.parse().ok(),
            messages_url,
            count_tokens_url,
            responses_url,
            url_credentials,
        }
    }

    /// `POST`s to `responses_url`.
    pub async fn post_responses(
        &self,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let target = target(&self.responses_url, None)?;
        self.post(target, headers, body).await
    }

    /// `POST`s to `messages_url`, with the client's query string if it sent one.
    pub async fn post_messages(
        &self,
        query: Option<&str>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let target = match (&self.messages_target, query) {
            (Some(uri), None) => uri.clone(),
            _ => target(&self.messages_url, query)?,
        };
        self.post(target, headers, body).await
    }

    /// `POST`s to `count_tokens_url`, with the client's query string if it sent one.
    pub async fn post_count_tokens(
        &self,
        query: Option<&str>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        let target = target(&self.count_tokens_url, query)?;
        self.post(target, headers, body).await
    }

    /// Every request to this provider goes out here, with the `base_url`'s credentials if any.
    async fn post(
        &self,
        target: Uri,
        headers: HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, TransportError> {
        self.client
            .post(target, self.with_url_credentials(headers), body)
            .await
    }

    fn with_url_credentials(&self, mut headers: HeaderMap) -> HeaderMap {
        if let Some(basic) = &self.url_credentials {
            headers
                .entry(AUTHORIZATION)
                .or_insert_with(|| basic.clone());
        }
        headers
    }

    pub fn has_credentials(&self) -> bool {
        !matches!(self.config.auth, Auth::None)
    }
}

/// `base_url` without its user and password, and those as a `Basic` credential.
fn split_credentials(base_url: &str) -> (String, Option<HeaderValue>) {
    let Ok(mut url) = reqwest::Url::parse(base_url) else {
        return (base_url.to_owned(), None);
    };
    if url.username().is_empty() && url.password().is_none() {
        return (base_url.to_owned(), None);
    }
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let user = decode(url.username());
    let password = url.password().map(decode).unwrap_or_default();
    let _ = url.set_username("");
    let _ = url.set_password(None);
    let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let basic = HeaderValue::from_str(&format!("Basic {token}"))
        .ok()
        .map(|mut v| {
            v.set_sensitive(true);
            v
        });
    (url.as_str().to_owned(), basic)
}

fn target(url: &str, query: Option<&str>) -> Result<Uri, TransportError> {
    let parsed = match query {
        Some(q) => format!("{url}?{q}").parse::<Uri>(),
        None => url.parse::<Uri>(),
    };
    parsed.map_err(|e| TransportError::new(format!("base_url does not make a request URL: {e}")))
}

/// Installs the TLS crypto provider once per process (rustls is built without a default one).
pub fn install_crypto_provider() {
    // An Err means a provider is already installed, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// HTTP clients shared across reloads, one per (outbound proxy, connect timeout).
#[derive(Debug, Default)]
pub struct ClientPool {
    clients: Mutex<HashMap<(Option<String>, Duration), Client>>,
}

impl ClientPool {
    pub fn get(&self, proxy: Option<&Secret>, connect_timeout: Duration) -> Result<Client, String> {
        let key = (proxy.map(|p| p.expose().to_owned()), connect_timeout);
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = clients.get(&key) {
            return Ok(c.clone());
        }
        let client = match proxy {
            Some(p) => Client::proxied(p, connect_timeout)?,
            None => Client::direct(connect_timeout)?,
        };
        clients.insert(key, client.clone());
        Ok(client)
    }
}

/// Request headers never forwarded to a provider: hop-by-hop headers, the client's credentials
/// (a provider gets its own), and `accept-encoding` (responses are relayed uncompressed).
const DROPPED_REQUEST_HEADERS: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "content-length",
    "accept-encoding",
    "x-api-key",
    "authorization",
];

/// The headers for a request to an anthropic-type provider: the client's headers minus the
/// dropped ones, plus the provider's credentials (or the client's own, for `passthrough`).
pub fn anthropic_request_headers(client: &HeaderMap, auth: &Auth) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if !DROPPED_REQUEST_HEADERS.contains(&name.as_str()) {
            out.append(name.clone(), value.clone());
        }
    }
    if !out.contains_key("anthropic-version") {
        out.insert(
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static("2023-06-01"),
        );
    }
    if !out.contains_key(http::header::CONTENT_TYPE) {
        out.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    apply_auth(&mut out, client, auth, AuthStyle::Anthropic);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthStyle {
    /// `api_key` means `x-api-key`; `auth_token` means a bearer token.
    Anthropic,
    /// Always a bearer token.
    Openai,
}

pub fn apply_auth(out: &mut HeaderMap, client: &HeaderMap, auth: &Auth, style: AuthStyle) {
    let bearer = |s: &Secret| HeaderValue::from_str(&format!("Bearer {}", s.expose())).ok();
    match auth {
        Auth::ApiKey(key) if style == AuthStyle::Anthropic => {
            if let Ok(mut v) = HeaderValue::from_str(key.expose()) {
                v.set_sensitive(true);
                out.insert(HeaderName::from_static("x-api-key"), v);
            }
        }
        Auth::ApiKey(key) | Auth::Bearer(key) => {
            if let Some(mut v) = bearer(key) {
                v.set_sensitive(true);
                out.insert(AUTHORIZATION, v);
            }
        }
        Auth::Passthrough => {
            for name in ["x-api-key", "authorization"] {
                if let Some(v) = client.get(name) {
                    out.insert(HeaderName::from_static(name), v.clone());
                }
            }
        }
        Auth::None => {}
    }
}

/// Response headers of a provider that the client gets back.
pub fn client_response_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::new();
    for (name, value) in upstream {
        let n = name.as_str();
        if matches!(
            n,
            "content-type"
                | "request-id"
                | "retry-after"
                | "retry-after-ms"
                | "x-should-retry"
                | "anthropic-organization-id"
                | "anthropic-workspace-id"
        ) || n.starts_with("anthropic-ratelimit-")
        {
            out.append(name.clone(), value.clone());
        }
    }
    out
}

/// Parses `retry-after` (integer seconds) or `retry-after-ms`.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) = headers
        .get("retry-after-ms")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
    {
        // The same bound as the seconds form: a huge hint must neither overflow a deadline nor
        // keep a provider out for good.
        if (0.0..86_400_000.0).contains(&ms) {
            return Some(Duration::from_secs_f64(ms / 1000.0));
        }
    }
    headers
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
        .map(Duration::from_secs_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_hints_are_bounded_to_a_day() {
        let hint = |name: &str, value: &str| {
            let mut h = HeaderMap::new();
            h.insert(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
            retry_after(&h)
        };
        assert_eq!(
            hint("retry-after-ms", "1500"),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(hint("retry-after", "7"), Some(Duration::from_secs(7)));
        assert_eq!(hint("retry-after-ms", "1e30"), None);
        assert_eq!(hint("retry-after-ms", "86400000"), None);
        assert_eq!(hint("retry-after", "86400"), None);
        assert_eq!(hint("retry-after", "-1"), None);
    }

    fn provider(kind: ProviderKind, base: &str) -> Provider {
        let config = ProviderConfig {
            name: "p".into(),
            kind,
            base_url: base.into(),
            auth: Auth::None,
            keys: Vec::new(),
            enabled: true,
            disabled_reason: None,
            proxy: None,
            max_tokens_cap: None,
            dialect: crate::config::Dialect::Generic,
            sanitize_schemas: false,
            models: Vec::new(),
            responses: false,
        };
        Provider::new(config, Client::direct(Duration::from_secs(1)).unwrap())
    }

    #[test]
    fn credentials_in_the_base_url_become_basic_auth_and_leave_the_url() {
        let p = provider(
            ProviderKind::Anthropic,
            "https://us%40r:p%3Ass@relay.example/x",
        );
        assert_eq!(p.messages_url, "https://relay.example/x/v1/messages");
        let sent = p.with_url_credentials(HeaderMap::new());
        // base64("us@r:p:ss")
        assert_eq!(sent["authorization"], "Basic dXNAcjpwOnNz");
        let shown = format!("{p:?}");
        assert!(
            !shown.contains("dXNAcjpwOnNz") && !shown.contains("p%3Ass") && !shown.contains("p:ss"),
            "{shown}"
        );
        // A credential of the provider's own wins.
        let mut own = HeaderMap::new();
        own.insert(AUTHORIZATION, HeaderValue::from_static("Bearer k"));
        assert_eq!(p.with_url_credentials(own)["authorization"], "Bearer k");
        let plain = provider(ProviderKind::Anthropic, "https://relay.example/x");
        assert!(plain.with_url_credentials(HeaderMap::new()).is_empty());
    }

    #[test]
    fn urls_follow_the_base_url() {
        let p = provider(ProviderKind::Anthropic, "https://relay.example/claudecode");
        assert_eq!(
            p.messages_url,
            "https://relay.example/claudecode/v1/messages"
        );
        assert_eq!(
            p.count_tokens_url,
            "https://relay.example/claudecode/v1/messages/count_tokens"
        );
        let p = provider(ProviderKind::Anthropic, "https://api.example/v1");
        assert_eq!(p.messages_url, "https://api.example/v1/messages");
        let p = provider(ProviderKind::Openai, "https://openrouter.example/api/v1");
        assert_eq!(
            p.messages_url,
            "https://openrouter.example/api/v1/chat/completions"
        );
    }

    #[test]
    fn client_credentials_never_reach_a_provider_with_its_own() {
        let mut client = HeaderMap::new();
        client.insert("x-api-key", HeaderValue::from_static("client-key"));
        client.insert(
            "authorization",
            HeaderValue::from_static("Bearer client-token"),
        );
        client.insert("anthropic-beta", HeaderValue::from_static("a,b"));
        client.insert("accept-encoding", HeaderValue::from_static("gzip"));
        client.insert("connection", HeaderValue::from_static("keep-alive"));
        let out = anthropic_request_headers(&client, &Auth::ApiKey(Secret::new("own-key")));
        assert_eq!(out.get("x-api-key").unwrap(), "own-key");
        assert!(out.get("authorization").is_none());
        assert_eq!(out.get("anthropic-beta").unwrap(), "a,b");
        assert_eq!(out.get("anthropic-version").unwrap(), "2023-06-01");
        assert!(out.get("accept-encoding").is_none());
        assert!(out.get("connection").is_none());

        let out = anthropic_request_headers(&client, &Auth::Bearer(Secret::new("tok")));
        assert_eq!(out.get("authorization").unwrap(), "Bearer tok");
        assert!(out.get("x-api-key").is_none());

        let out = anthropic_request_headers(&client, &Auth::Passthrough);
        assert_eq!(out.get("x-api-key").unwrap(), "client-key");
        assert_eq!(out.get("authorization").unwrap(), "Bearer client-token");

        let out = anthropic_request_headers(&client, &Auth::None);
        assert!(out.get("x-api-key").is_none() && out.get("authorization").is_none());
    }

    #[test]
    fn retry_after_parses_seconds_and_ms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", HeaderValue::from_static("1500"));
        assert_eq!(retry_after(&h), Some(Duration::from_millis(1500)));
        let mut h = HeaderMap::new();
        h.insert(
            "retry-after",
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
    }
}
