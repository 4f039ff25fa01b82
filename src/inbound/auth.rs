//! Inbound keys (`settings.auth`): who may call the balancer, and who may use its admin endpoints.
//!
//! Keys arrive as `x-api-key` or `Authorization: Bearer`. They are compared in constant time
//! against every configured key. With `auth.enabled`, every path except `exempt_paths` needs a
//! client key; admin paths need a key from `admin_keys` when that list is set (otherwise a client
//! key when auth is enabled).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode, Uri};
use subtle::ConstantTimeEq;

use crate::clients::Caller;
use crate::error::ApiError;
use crate::secret::Secret;
use crate::state::AppState;

/// Paths that show or change the balancer's own state.
pub const ADMIN_PATHS: &[&str] = &[
    "/providers",
    "/providers/reload",
    "/metrics",
    "/dashboard",
    "/dashboard/data",
    "/cache/clear",
    "/usage",
];

pub fn is_admin(path: &str) -> bool {
    ADMIN_PATHS.contains(&path)
}

/// Every credential a client presented, in order: its `x-api-key`, then the token of an
/// `Authorization: Bearer …` header (the scheme in any letter case, as HTTP allows). The key check
/// and redaction both read credentials here and nowhere else.
pub fn client_credentials(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    let key = headers.get("x-api-key").map(|k| k.as_bytes().trim_ascii());
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| bearer_token(v.as_bytes()));
    key.into_iter().chain(bearer).filter(|c| !c.is_empty())
}

/// The token of a `Bearer` authorization value.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let value = value.trim_ascii();
    let (scheme, rest) = value.split_at_checked(6)?;
    (scheme.eq_ignore_ascii_case(b"bearer") && rest.first().is_some_and(u8::is_ascii_whitespace))
        .then(|| rest.trim_ascii())
}

/// The key the client presented, if any: the first of [`client_credentials`].
fn presented(headers: &HeaderMap) -> Option<&[u8]> {
    client_credentials(headers).next()
}

/// Whether `key` equals one of `keys`, without an early exit that would time the comparison.
pub fn matches_any(key: &[u8], keys: &[Secret]) -> bool {
    let mut found = subtle::Choice::from(0u8);
    for k in keys {
        found |= key.ct_eq(k.expose().as_bytes());
    }
    found.into()
}

/// The 401 for a key check that failed with `message`.
pub fn refuse(message: &str) -> Response {
    ApiError::new(StatusCode::UNAUTHORIZED, "authentication_error", message).into_response()
}

/// Who a request to `uri` comes from, or why it may not pass (for [`refuse`]).
///
/// With named clients configured, every path but `exempt_paths` needs a key, as with
/// `auth.enabled`: a client's key (the request is then that client's), an `auth.api_keys` key or
/// an admin key. Admin paths need an admin key when `admin_keys` is set.
pub fn check(state: &AppState, uri: &Uri, headers: &HeaderMap) -> Result<Caller, &'static str> {
    let runtime = state.runtime();
    let auth = &runtime.config.settings.auth;
    let path = uri.path();
    if auth.exempt_paths.iter().any(|p| p == path) {
        return Ok(Caller::default());
    }
    // The dashboard page is opened in a browser: it may carry its key as `?key=`.
    let query_key = if path.starts_with("/dashboard") {
        uri.query()
            .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key=")))
            .map(str::as_bytes)
    } else {
        None
    };
    let key = presented(headers).or(query_key);
    if is_admin(path) && !auth.admin_keys.is_empty() {
        if !key.is_some_and(|k| matches_any(k, &auth.admin_keys)) {
            return Err("an admin key is required for this endpoint");
        }
        return Ok(Caller::default());
    }
    let clients = &runtime.clients;
    if !auth.enabled && clients.is_empty() {
        return Ok(Caller::default());
    }
    if let Some(k) = key {
        if let Some(client) = clients.identify(k) {
            return Ok(Caller(Some(client)));
        }
        if matches_any(k, &auth.api_keys) || matches_any(k, &auth.admin_keys) {
            return Ok(Caller::default());
        }
    }
    Err("invalid or missing API key for this balancer")
}

/// [`check`] as a router layer: the request goes on with its [`Caller`] as an extension.
pub async fn guard(
    State(state): State<Arc<AppState>>,
    mut request: Request,
    next: Next,
) -> Response {
    match check(&state, request.uri(), request.headers()) {
        Ok(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        Err(why) if is_openai_path(request.uri().path()) => refuse_openai(why),
        Err(why) => refuse(why),
    }
}

/// The OpenAI front end's paths, whose errors take OpenAI's shape.
pub fn is_openai_path(path: &str) -> bool {
    path.starts_with("/v1/chat/") || path.starts_with("/v1/responses")
}

/// A 401 in OpenAI's error shape.
pub fn refuse_openai(message: &str) -> Response {
    crate::error::openai_response(
        StatusCode::UNAUTHORIZED,
        "invalid_request_error",
        message,
        Some("invalid_api_key"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_match_exactly() {
        let keys = vec![Secret::new("key-one"), Secret::new("key-two")];
        assert!(matches_any(b"key-two", &keys));
        assert!(!matches_any(b"key-tw", &keys));
        assert!(!matches_any(b"key-twoo", &keys));
        assert!(!matches_any(b"", &keys));
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer  key-one ".parse().unwrap());
        assert_eq!(presented(&h), Some(&b"key-one"[..]));
    }

    #[test]
    fn credentials_are_read_whatever_the_scheme_case() {
        for value in ["Bearer k-1", "bearer k-1", "BEARER  k-1 ", "BeArEr\tk-1"] {
            let mut h = HeaderMap::new();
            h.insert("authorization", value.parse().unwrap());
            let got: Vec<&[u8]> = client_credentials(&h).collect();
            assert_eq!(got, vec![&b"k-1"[..]], "{value:?}");
        }
        let mut h = HeaderMap::new();
        h.insert("authorization", "Basic abc".parse().unwrap());
        h.insert("x-api-key", "k-2".parse().unwrap());
        let got: Vec<&[u8]> = client_credentials(&h).collect();
        assert_eq!(got, vec![&b"k-2"[..]]);
        h.insert("authorization", "bearer k-3".parse().unwrap());
        let got: Vec<&[u8]> = client_credentials(&h).collect();
        assert_eq!(got, vec![&b"k-2"[..], &b"k-3"[..]]);
    }
}
