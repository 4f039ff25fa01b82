//! Reading just enough of a request body (model, stream, session, the `provider` field) and
//! rewriting only the top-level `model` and `provider` members of the original bytes.
//!
//! The body is scanned once to check it (`canonical::scan`); it is never re-serialised: the rewrite splices the
//! original bytes, so everything else (key order, whitespace, unknown fields) reaches the
//! provider exactly as the client sent it.

use std::ops::Range;

use bytes::{Bytes, BytesMut};
use serde::Deserialize;

use super::canonical::{self, Kind, ScanError};

use crate::error::ApiError;

/// What the balancer needs to know about a request body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    pub model: String,
    pub stream: bool,
    /// The non-standard `provider` field: the client asks for this provider first.
    pub provider: Option<String>,
    /// The session id inside `metadata.user_id`, if any.
    pub metadata_session: Option<String>,
    /// Hash of the canonical body without `stream` and `max_tokens` (deduplication and cache key).
    pub signature: u128,
    /// Hash of `max_tokens`, for `include_max_tokens_in_signature`.
    pub max_tokens_hash: Option<u128>,
    /// The body may hold thinking blocks signed by this gateway (see `canonical::Head`).
    pub gateway_signed: bool,
    /// What the request asks of a model (size, images, tools, thinking), for routing.
    pub shape: canonical::Shape,
}

/// Validates a `/v1/messages` or `count_tokens` body and extracts its envelope and signature.
/// The longest `model` (and non-standard `provider`) a request may name. Real model names are
/// far shorter; the bound keeps client strings out of the logs and books at a known size.
pub const MAX_NAME_BYTES: usize = 256;

pub fn parse(body: &[u8]) -> Result<Envelope, ApiError> {
    parse_with(body, true)
}

/// [`parse`], computing the signature only when `sign` (coalescing or the cache need it).
pub fn parse_with(body: &[u8], sign: bool) -> Result<Envelope, ApiError> {
    let head = canonical::scan(body, sign).map_err(|e| match e {
        ScanError::Data(m) => ApiError::invalid_request(format!("invalid request body: {m}")),
        ScanError::Syntax(m) => {
            ApiError::invalid_request(format!("request body is not valid JSON: {m}"))
        }
    })?;
    if let Some(name) = &head.duplicate {
        let shown: String = name.chars().take(64).collect();
        return Err(ApiError::invalid_request(format!(
            "member {shown:?} appears more than once at the top level of the body"
        )));
    }
    let model = match (head.model, head.model_present) {
        (Some(m), _) if m.len() > MAX_NAME_BYTES => {
            return Err(ApiError::invalid_request(format!(
                "model: longer than {MAX_NAME_BYTES} bytes"
            )));
        }
        (Some(m), _) if !m.trim().is_empty() => m,
        (Some(_), _) => return Err(ApiError::invalid_request("model: must not be empty")),
        (None, true) => {
            return Err(ApiError::invalid_request(
                "model: Input should be a valid string",
            ));
        }
        (None, false) => return Err(ApiError::invalid_request("model: Field required")),
    };
    match head.messages_kind {
        Some(Kind::Array) => {}
        Some(_) => {
            return Err(ApiError::invalid_request(
                "messages: Input should be a valid list",
            ));
        }
        None => return Err(ApiError::invalid_request("messages: Field required")),
    }
    let metadata_session = head
        .metadata
        .as_ref()
        .and_then(|m| m.get("user_id"))
        .and_then(|u| u.as_str())
        .and_then(session_from_user_id);
    if head
        .provider
        .as_ref()
        .is_some_and(|p| p.len() > MAX_NAME_BYTES)
    {
        return Err(ApiError::invalid_request(format!(
            "provider: longer than {MAX_NAME_BYTES} bytes"
        )));
    }
    Ok(Envelope {
        model,
        stream: head.stream.unwrap_or(false),
        provider: head.provider.filter(|p| !p.is_empty()),
        metadata_session,
        signature: head.signature,
        max_tokens_hash: head.max_tokens,
        gateway_signed: head.gateway_signed,
        shape: head.shape,
    })
}

/// Claude Code's `metadata.user_id`: a JSON string with `session_id`, or the older
/// `user_<hash>_account_<uuid>_session_<uuid>` form.
pub fn session_from_user_id(user_id: &str) -> Option<String> {
    if user_id.trim_start().starts_with('{') {
        #[derive(Deserialize)]
        struct Ids {
            session_id: Option<String>,
        }
        return serde_json::from_str::<Ids>(user_id)
            .ok()?
            .session_id
            .filter(|s| !s.is_empty());
    }
    user_id
        .rsplit_once("_session_")
        .map(|(_, s)| s.to_owned())
        .filter(|s| !s.is_empty())
}

/// One top-level member of a JSON object, as byte ranges of the original text.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    key: Range<usize>,
    value: Range<usize>,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// `i` is at an opening quote; returns the index after the closing quote.
fn skip_string(b: &[u8], mut i: usize) -> Option<usize> {
    i += 1;
    loop {
        let j = i + memchr::memchr2(b'"', b'\\', b.get(i..)?)?;
        if b[j] == b'\\' {
            i = j + 2;
        } else {
            return Some(j + 1);
        }
    }
}

/// `i` is at the start of a value; returns the index after it.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            None
        }
        _ => {
            let mut j = i;
            while j < b.len() && !matches!(b[j], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r')
            {
                j += 1;
            }
            Some(j)
        }
    }
}

/// The top-level members of a JSON object (assumed valid: [`parse`] ran first).
fn members(b: &[u8]) -> Option<Vec<Member>> {
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    let mut out = Vec::new();
    if b.get(i) == Some(&b'}') {
        return Some(out);
    }
    loop {
        let key_end = skip_string(b, i)?;
        let key = i + 1..key_end - 1;
        i = skip_ws(b, key_end);
        if b.get(i) != Some(&b':') {
            return None;
        }
        let value_start = skip_ws(b, i + 1);
        let value_end = skip_value(b, value_start)?;
        out.push(Member {
            key,
            value: value_start..value_end,
        });
        i = skip_ws(b, value_end);
        match b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => return Some(out),
            _ => return None,
        }
    }
}

/// Returns `body` with the top-level `model` set to `model` and the `provider` member removed.
/// When nothing changes, the original bytes are returned without copying.
pub fn rewrite(body: &Bytes, model: &str, current_model: &str, strip_provider: bool) -> Bytes {
    if model == current_model && !strip_provider {
        return body.clone();
    }
    let Some(members) = members(body) else {
        return body.clone();
    };
    let mut edits: Vec<(Range<usize>, Vec<u8>)> = Vec::new();
    for (n, m) in members.iter().enumerate() {
        // Compared as a parser reads it: `"mod\u0065l"` is the model too.
        let key = canonical::member_name(&body[m.key.clone()]);
        let key: &[u8] = &key;
        if key == b"model" && model != current_model {
            let json = serde_json::to_vec(model).unwrap_or_default();
            edits.push((m.value.clone(), json));
        } else if key == b"provider" && strip_provider {
            // Remove the member with one adjacent comma.
            let range = if let Some(next) = members.get(n + 1) {
                (m.key.start - 1)..(next.key.start - 1)
            } else if n > 0 {
                members[n - 1].value.end..m.value.end
            } else {
                (m.key.start - 1)..m.value.end
            };
            edits.push((range, Vec::new()));
        }
    }
    if edits.is_empty() {
        return body.clone();
    }
    let mut out = BytesMut::with_capacity(body.len() + model.len());
    let mut last = 0;
    for (range, replacement) in edits {
        out.extend_from_slice(&body[last..range.start]);
        out.extend_from_slice(&replacement);
        last = range.end;
    }
    out.extend_from_slice(&body[last..]);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn parse_extracts_the_envelope() {
        let body = br#"{"model":"claude-sonnet-4-6","messages":[],"stream":true,"provider":"GAC",
            "metadata":{"user_id":"{\"device_id\":\"d\",\"account_uuid\":\"\",\"session_id\":\"s-1\"}"}}"#;
        let env = parse(body).unwrap();
        let unsigned = parse_with(body, false).unwrap();
        assert_eq!((unsigned.signature, unsigned.max_tokens_hash), (0, None));
        assert_eq!(
            Envelope {
                signature: env.signature,
                max_tokens_hash: env.max_tokens_hash,
                ..unsigned
            },
            env
        );
        assert_ne!(env.signature, 0);
        assert!(parse(br#"{"model":"m","messages":[]} trailing"#).is_err());
        assert_eq!(env.model, "claude-sonnet-4-6");
        assert!(env.stream);
        assert_eq!(env.provider.as_deref(), Some("GAC"));
        assert_eq!(env.metadata_session.as_deref(), Some("s-1"));
    }

    #[test]
    fn parse_rejects_bad_bodies_with_400() {
        for body in [
            &b"{"[..],
            b"[]",
            br#"{"messages":[]}"#,
            br#"{"model":"m"}"#,
            br#"{"model":5,"messages":[]}"#,
            br#"{"model":"m","messages":{}}"#,
        ] {
            let e = parse(body).unwrap_err();
            assert_eq!(e.status, 400, "{}", String::from_utf8_lossy(body));
            assert_eq!(e.error_type, "invalid_request_error");
            assert_eq!(parse_with(body, false).unwrap_err().status, 400);
        }
    }

    #[test]
    fn the_signature_ignores_order_whitespace_stream_and_max_tokens_only() {
        let sig = |b: &str| parse(b.as_bytes()).unwrap().signature;
        let base = sig(
            r#"{"model":"m","max_tokens":10,"stream":true,"messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[1,2]}}"#,
        );
        let same = [
            r#"{ "messages" : [ {"content":"hi","role":"user"} ], "model":"m", "metadata":{"b":[1, 2],"a":1.0} }"#,
            r#"{"model":"m","max_tokens":99999,"stream":false,"messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[1,2]}}"#,
        ];
        for b in same {
            assert_eq!(sig(b), base, "{b}");
        }
        let different = [
            r#"{"model":"m2","messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[1,2]}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi!"}],"metadata":{"a":1,"b":[1,2]}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[2,1]}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[1,2]},"temperature":0}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":"1","b":[1,2]}}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"a":1,"b":[1,2]},"provider":"P"}"#,
        ];
        for b in different {
            assert_ne!(sig(b), base, "{b}");
        }
        let with = parse(br#"{"model":"m","messages":[],"max_tokens":5}"#).unwrap();
        let other = parse(br#"{"model":"m","messages":[],"max_tokens":6}"#).unwrap();
        assert_eq!(with.signature, other.signature);
        assert_ne!(with.max_tokens_hash, other.max_tokens_hash);
    }

    #[test]
    fn old_user_id_form() {
        assert_eq!(
            session_from_user_id("user_abc_account_123_session_77-88").as_deref(),
            Some("77-88")
        );
        assert_eq!(session_from_user_id("plain"), None);
    }

    #[test]
    fn rewrite_changes_only_model_and_provider() {
        let body = Bytes::from_static(
            br#"{ "provider" : "X", "model": "claude-x", "messages": [{"role":"user","content":"model \"provider\""}], "z":{"model":"inner"} }"#,
        );
        let out = rewrite(&body, "mapped/name", "claude-x", true);
        let v: Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(
            v,
            json!({"model":"mapped/name","messages":[{"role":"user","content":"model \"provider\""}],"z":{"model":"inner"}})
        );
        // Untouched parts are byte-identical.
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains(r#""messages": [{"role":"user","content":"model \"provider\""}], "z":{"model":"inner"} }"#));
    }

    #[test]
    fn rewrite_removes_provider_in_any_position() {
        for body in [
            r#"{"model":"m","provider":"P"}"#,
            r#"{"provider":"P","model":"m"}"#,
            r#"{"model":"m","provider":"P","messages":[]}"#,
        ] {
            let out = rewrite(&Bytes::from(body), "m", "m", true);
            let v: Value = serde_json::from_slice(&out).unwrap();
            assert!(v.get("provider").is_none(), "{body}");
            assert_eq!(v["model"], "m");
        }
    }

    #[test]
    fn unchanged_body_is_not_copied() {
        let body = Bytes::from_static(br#"{"model":"m","messages":[]}"#);
        let out = rewrite(&body, "m", "m", false);
        assert_eq!(out.as_ptr(), body.as_ptr());
    }
}
