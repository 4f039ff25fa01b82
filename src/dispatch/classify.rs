//! Telling a provider fault from an answer: the fault policy compiled from a configuration, and
//! the fault values the loop records.

use std::time::Duration;

use regex::RegexSet;

use super::answer::FaultClass;
use crate::config::{Settings, StatusSet};
use crate::upstream::TransportError;

/// Why an attempt failed over.
#[derive(Debug, Clone)]
pub struct Fault {
    pub class: FaultClass,
    pub reason: String,
    pub retry_after: Option<Duration>,
    /// The provider's status, for an unhealthy status.
    pub status: Option<u16>,
    /// The provider's `anthropic-ratelimit-*` headers, for an unhealthy status (a key pool reads
    /// them).
    pub rate_limits: http::HeaderMap,
}

impl Fault {
    pub fn new(class: FaultClass, reason: impl Into<String>) -> Self {
        Self {
            class,
            reason: reason.into(),
            retry_after: None,
            status: None,
            rate_limits: http::HeaderMap::new(),
        }
    }
}

/// What counts as a provider fault, built once per loaded configuration.
#[derive(Debug, Clone)]
pub struct FaultPolicy {
    /// `unhealthy_http_codes`.
    pub unhealthy_codes: StatusSet,
    /// `unhealthy_exception_patterns`: substrings of an error body that make any status a fault.
    pub error_patterns: Vec<String>,
    /// `unhealthy_response_body_patterns`: regexes over a 2xx body or the events before commit.
    pub body_patterns: Option<RegexSet>,
}

impl FaultPolicy {
    pub fn new(s: &Settings) -> Self {
        Self {
            unhealthy_codes: s.unhealthy_http_codes.clone(),
            error_patterns: s
                .unhealthy_exception_patterns
                .iter()
                .filter(|p| !p.is_empty())
                .cloned()
                .collect(),
            body_patterns: s.unhealthy_response_body_patterns.clone(),
        }
    }

    /// Every status counts as a fault (count_tokens: anything but an answer falls back to the
    /// next provider or the local count).
    pub fn every_status() -> Self {
        let mut all = StatusSet::empty();
        for s in 100..600 {
            all.insert(s);
        }
        Self {
            unhealthy_codes: all,
            error_patterns: Vec::new(),
            body_patterns: None,
        }
    }

    /// Whether a non-2xx answer is a provider fault (its status is unhealthy, or its body matches
    /// an exception pattern) rather than a client fault.
    pub fn is_unhealthy(&self, status: u16, body: &[u8]) -> bool {
        if self.unhealthy_codes.contains(status) {
            return true;
        }
        if self.error_patterns.is_empty() {
            return false;
        }
        let text = String::from_utf8_lossy(body);
        self.error_patterns
            .iter()
            .any(|p| text.contains(p.as_str()))
    }

    /// A fault when a successful-looking body (or the events before commit) matches
    /// `unhealthy_response_body_patterns`.
    pub fn body_fault(&self, body: &[u8]) -> Option<Fault> {
        let set = self.body_patterns.as_ref()?;
        let text = String::from_utf8_lossy(body);
        set.is_match(&text).then(|| {
            Fault::new(
                FaultClass::Other,
                format!(
                    "response matched unhealthy_response_body_patterns: {}",
                    clip(text.trim())
                ),
            )
        })
    }
}

pub(crate) fn transport_fault(e: TransportError) -> Fault {
    let class = if e.is_timeout() {
        FaultClass::Timeout
    } else {
        FaultClass::Transport
    };
    Fault::new(class, e.to_string())
}

/// The Anthropic or OpenAI error message of a body, else the body itself, clipped to
/// [`CLIP`]: the loop masks secrets in it and only then cuts it to its final length, so a key
/// across the final cut is masked whole.
fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    if let Ok(v) = serde_json::from_str::<serde_json::Value>(text) {
        let err = v.get("error").unwrap_or(&v);
        let kind = err.get("type").and_then(|t| t.as_str());
        let msg = err.get("message").and_then(|m| m.as_str());
        match (kind, msg) {
            (Some(k), Some(m)) => return clip(&format!("{k}: {m}")),
            (None, Some(m)) => return clip(m),
            _ => {}
        }
    }
    clip(text)
}

/// The longest text a fault reason carries before it is masked: far past the final cut, so a
/// key split here is dropped by that cut.
const CLIP: usize = 4096;

fn clip(s: &str) -> String {
    cut(s, CLIP)
}

/// A fault reason cut to its final length (after masking).
pub(crate) fn truncate(s: &str) -> String {
    cut(s, 200)
}

fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

/// The fault for an unhealthy status.
pub(crate) fn status_fault(status: u16, body: &[u8], retry: Option<Duration>) -> Fault {
    let class = match status {
        429 | 503 | 529 => FaultClass::Overloaded,
        401 | 403 => FaultClass::Credentials,
        408 | 504 => FaultClass::Timeout,
        _ => FaultClass::Other,
    };
    let detail = snippet(body);
    let reason = if detail.is_empty() {
        format!("HTTP {status}")
    } else {
        format!("HTTP {status}: {detail}")
    };
    Fault {
        class,
        reason,
        retry_after: retry,
        status: Some(status),
        rate_limits: http::HeaderMap::new(),
    }
}

/// The class of an Anthropic error type.
pub(crate) fn class_of_error_type(kind: &str) -> FaultClass {
    match kind {
        "overloaded_error" | "rate_limit_error" => FaultClass::Overloaded,
        "authentication_error" | "permission_error" => FaultClass::Credentials,
        "timeout_error" => FaultClass::Timeout,
        _ => FaultClass::Other,
    }
}

/// The fault for an error event or a `{"type":"error"}` body before commit.
pub(crate) fn error_payload_fault(payload: &str) -> Fault {
    let v: serde_json::Value = serde_json::from_str(payload).unwrap_or_default();
    let kind = v
        .pointer("/error/type")
        .and_then(|t| t.as_str())
        .unwrap_or("error");
    Fault::new(
        class_of_error_type(kind),
        format!(
            "error before the first event: {}",
            snippet(payload.as_bytes())
        ),
    )
}

/// `{"type":"error",…}` at the top level.
pub(crate) fn is_error_body(body: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow, rename = "type")]
        kind: Option<std::borrow::Cow<'a, str>>,
    }
    let trimmed = body.trim_ascii_start();
    trimmed.starts_with(b"{")
        && serde_json::from_slice::<Probe<'_>>(trimmed)
            .is_ok_and(|p| p.kind.as_deref() == Some("error"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_patterns_are_judged_by_the_policy() {
        let mut codes = StatusSet::empty();
        codes.insert(500);
        let p = FaultPolicy {
            unhealthy_codes: codes,
            error_patterns: vec!["quota exceeded".into()],
            body_patterns: Some(RegexSet::new([r#""type":\s*"error""#]).unwrap()),
        };
        assert!(p.is_unhealthy(500, b""));
        assert!(!p.is_unhealthy(400, b"{\"message\":\"bad\"}"));
        assert!(p.is_unhealthy(400, b"{\"message\":\"quota exceeded\"}"));
        assert!(p.body_fault(br#"{"type": "error"}"#).is_some());
        assert!(p.body_fault(br#"{"type":"message"}"#).is_none());
        assert!(FaultPolicy::every_status().is_unhealthy(418, b""));
    }

    #[test]
    fn status_faults_are_classed() {
        assert_eq!(status_fault(529, b"", None).class, FaultClass::Overloaded);
        assert_eq!(status_fault(403, b"", None).class, FaultClass::Credentials);
        assert_eq!(status_fault(504, b"", None).class, FaultClass::Timeout);
        let f = status_fault(
            500,
            br#"{"error":{"type":"api_error","message":"boom"}}"#,
            None,
        );
        assert_eq!((f.class, f.status), (FaultClass::Other, Some(500)));
        assert_eq!(f.reason, "HTTP 500: api_error: boom");
        assert_eq!(
            error_payload_fault(
                r#"{"type":"error","error":{"type":"rate_limit_error","message":"x"}}"#
            )
            .class,
            FaultClass::Overloaded
        );
    }
}
