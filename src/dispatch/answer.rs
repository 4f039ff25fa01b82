//! The typed result of a request: what the failover loop (or the cache, or the balancer itself)
//! answered, and everything that is known about how. The HTTP response is built from an [`Answer`]
//! in one place, `respond`; nothing about a request travels through HTTP headers inside the
//! process, and an `Answer` can be rendered in another wire format without re-reading its bytes to
//! learn what it is.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::Stream;
use http::{HeaderMap, StatusCode};
use serde::Serialize;

use crate::error::ApiError;

/// An Anthropic event stream going to the client. Every item holds one or more *whole* events
/// (never a partial one), so a consumer can read each item on its own.
pub type Events = Pin<Box<dyn Stream<Item = Bytes> + Send + 'static>>;

/// What the client gets.
pub enum Body {
    /// A complete JSON document: a `Message` for a 2xx, or the provider's own error body for a
    /// client fault passed on unchanged.
    Json(Bytes),
    /// A committed Anthropic event stream.
    Stream(Events),
    /// An error written by the balancer (or mapped from a provider's error by conversion).
    Error(ApiError),
}

impl fmt::Debug for Body {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Body::Json(b) => write!(f, "Json({} bytes)", b.len()),
            Body::Stream(_) => f.write_str("Stream"),
            Body::Error(e) => f.debug_tuple("Error").field(e).finish(),
        }
    }
}

/// The wire format of an answer's body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Wire {
    /// Anthropic Messages: a `Message`, an Anthropic event stream or an Anthropic error body.
    #[default]
    Anthropic,
    /// OpenAI Chat Completions, as an openai-type provider wrote it (the Chat Completions front
    /// end's fast path): a `chat.completion`, chunks ending with `data: [DONE]`.
    Chat,
    /// OpenAI Responses, as an openai-type provider that speaks it wrote it: a `response`
    /// object, or its typed events.
    Responses,
}

/// Who produced the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A provider, asked for this model name.
    Provider {
        name: String,
        upstream_model: String,
    },
    /// The balancer counted the tokens itself.
    LocalCount,
    /// The balancer answered without asking anyone (a refusal, a routing error, all attempts
    /// failed).
    Balancer,
}

impl Source {
    pub fn provider(&self) -> Option<&str> {
        match self {
            Source::Provider { name, .. } => Some(name),
            _ => None,
        }
    }
}

/// Whether the answer came through the cache or a shared flight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheStatus {
    /// Coalescing and the cache are both off.
    Off,
    /// This request made its own upstream call.
    Miss,
    /// Served from the response cache.
    Hit,
    /// Joined an identical request's upstream call.
    Coalesced,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Off => "off",
            CacheStatus::Miss => "miss",
            CacheStatus::Hit => "hit",
            CacheStatus::Coalesced => "coalesced",
        }
    }
}

/// Why an attempt failed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultClass {
    /// 429, 503, 529 or an overloaded/rate-limit error event.
    Overloaded,
    /// 401 or 403: the provider refused the balancer's credentials.
    Credentials,
    Timeout,
    /// Connection, DNS or TLS failure.
    Transport,
    /// Any other unhealthy status, error body or matching pattern.
    Other,
}

impl FaultClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FaultClass::Overloaded => "overloaded",
            FaultClass::Credentials => "credentials",
            FaultClass::Timeout => "timeout",
            FaultClass::Transport => "transport",
            FaultClass::Other => "other",
        }
    }
}

/// How one attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AttemptOutcome {
    /// The answer went to the client.
    Committed,
    /// A status outside `unhealthy_http_codes`: returned unchanged, no penalty.
    ClientFault,
    /// A provider fault: counted against the provider, next candidate.
    Fault,
    /// The candidate cannot express this request: skipped without penalty.
    Unsupported,
    /// The candidate's model cannot hold the request (too long; no images, tools or thinking):
    /// skipped before any call, without penalty.
    Skipped,
}

/// One attempt, as logged and counted.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt {
    pub provider: String,
    pub upstream_model: String,
    pub outcome: AttemptOutcome,
    /// The fault class of a fault.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub class: Option<FaultClass>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// How long the attempt took, in milliseconds (microsecond precision).
    #[serde(rename = "ms", serialize_with = "millis")]
    pub took: Duration,
    /// The fault or skip reason, already redacted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((d.as_secs_f64() * 1_000_000.0).round() / 1000.0)
}

/// Token usage, as Anthropic reports it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_input_tokens: u64,
    pub cache_creation_input_tokens: u64,
}

impl Usage {
    /// All four kinds together.
    pub fn total(&self) -> u64 {
        self.input_tokens
            + self.output_tokens
            + self.cache_read_input_tokens
            + self.cache_creation_input_tokens
    }
}

/// The usage fields of an Anthropic `usage` object (read without building a JSON tree).
#[derive(Debug, Default, serde::Deserialize)]
struct UsageFields {
    input_tokens: Option<u64>,
    output_tokens: Option<u64>,
    cache_read_input_tokens: Option<u64>,
    cache_creation_input_tokens: Option<u64>,
}

/// A message or an event, as far as usage goes: `usage` at the top or inside `message`.
#[derive(Debug, Default, serde::Deserialize)]
struct WithUsage {
    usage: Option<UsageFields>,
    message: Option<Box<WithUsage>>,
}

impl Usage {
    /// Overwrites the fields present in an Anthropic `usage` object.
    fn merge(&mut self, u: UsageFields) {
        let set = |field: &mut u64, v: Option<u64>| {
            if let Some(n) = v {
                *field = n;
            }
        };
        set(&mut self.input_tokens, u.input_tokens);
        set(&mut self.output_tokens, u.output_tokens);
        set(&mut self.cache_read_input_tokens, u.cache_read_input_tokens);
        set(
            &mut self.cache_creation_input_tokens,
            u.cache_creation_input_tokens,
        );
    }

    /// Merges the usage of a message or event in JSON text, if it has any.
    pub fn merge_json(&mut self, json: &[u8]) {
        if let Ok(w) = serde_json::from_slice::<WithUsage>(json) {
            for u in [w.message.and_then(|m| m.usage), w.usage]
                .into_iter()
                .flatten()
            {
                self.merge(u);
            }
        }
    }

    /// Merges the usage of a Responses `response` object, or of an event carrying one, in JSON
    /// text.
    pub fn merge_responses_json(&mut self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct WithUsage {
            usage: Option<serde_json::Value>,
            response: Option<Box<WithUsage>>,
        }
        let Ok(w) = serde_json::from_slice::<WithUsage>(json) else {
            return;
        };
        if let Some(u) = w.usage.or_else(|| w.response.and_then(|r| r.usage)) {
            self.merge_responses(&u);
        }
    }

    /// Merges a Responses `usage` object (`input_tokens` there counts the cached ones).
    pub fn merge_responses(&mut self, u: &serde_json::Value) {
        if !u.is_object() {
            return;
        }
        let cached = u
            .pointer("/input_tokens_details/cached_tokens")
            .and_then(serde_json::Value::as_u64);
        self.merge(UsageFields {
            input_tokens: u
                .get("input_tokens")
                .and_then(serde_json::Value::as_u64)
                .map(|i| i.saturating_sub(cached.unwrap_or(0))),
            output_tokens: u.get("output_tokens").and_then(serde_json::Value::as_u64),
            cache_read_input_tokens: cached,
            cache_creation_input_tokens: None,
        });
    }

    /// Merges the usage of a Chat Completions answer or chunk in JSON text, if it has any.
    pub fn merge_chat_json(&mut self, json: &[u8]) {
        #[derive(serde::Deserialize)]
        struct WithChatUsage {
            usage: Option<serde_json::Value>,
        }
        if let Ok(WithChatUsage { usage: Some(u) }) = serde_json::from_slice(json) {
            self.merge_chat(&u);
        }
    }

    /// Merges a Chat Completions `usage` object (the prompt's cached tokens counted apart, as
    /// Anthropic counts them).
    pub fn merge_chat(&mut self, u: &serde_json::Value) {
        if !u.is_object() {
            return;
        }
        let a = crate::adapter::openai::usage_to_anthropic(Some(u), 0, 0);
        let n = |k: &str| a.get(k).and_then(serde_json::Value::as_u64);
        self.merge(UsageFields {
            input_tokens: n("input_tokens"),
            output_tokens: n("output_tokens"),
            cache_read_input_tokens: n("cache_read_input_tokens"),
            cache_creation_input_tokens: n("cache_creation_input_tokens"),
        });
    }

    /// The usage of a complete message.
    pub fn of_message(json: &[u8]) -> Self {
        let mut u = Self::default();
        u.merge_json(json);
        u
    }
}

/// Everything the balancer answers one request with.
#[derive(Debug)]
pub struct Answer {
    /// For [`Body::Json`] and [`Body::Stream`]; an [`Body::Error`] carries its own.
    pub status: StatusCode,
    /// The provider's response headers that go on to the client (request id, rate limits,
    /// retry hints), already filtered.
    pub headers: HeaderMap,
    pub source: Source,
    /// The route (pattern as written) the request matched.
    pub route: Option<Arc<str>>,
    /// The attempts this request made, in order (none when it was served by the cache or joined
    /// another request's flight).
    pub attempts: Vec<Attempt>,
    pub cache: CacheStatus,
    pub body: Body,
    /// The wire format of `body` (an [`Body::Error`] is typed and has none).
    pub wire: Wire,
    /// Known for a complete JSON message; a stream's is read as its events pass.
    pub usage: Option<Usage>,
}

impl Answer {
    /// The balancer's own error.
    pub fn error(error: ApiError) -> Self {
        Self {
            status: error.status,
            headers: HeaderMap::new(),
            source: Source::Balancer,
            route: None,
            attempts: Vec::new(),
            cache: CacheStatus::Off,
            body: Body::Error(error),
            wire: Wire::Anthropic,
            usage: None,
        }
    }

    /// The HTTP status the client gets.
    pub fn status(&self) -> StatusCode {
        match &self.body {
            Body::Error(e) => e.status,
            _ => self.status,
        }
    }

    pub fn is_stream(&self) -> bool {
        matches!(self.body, Body::Stream(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attempt_serialises_as_the_summary_line_expects() {
        let a = Attempt {
            provider: "A".into(),
            upstream_model: "m".into(),
            outcome: AttemptOutcome::Fault,
            class: Some(FaultClass::Overloaded),
            status: Some(529),
            took: Duration::from_micros(1_234_567),
            reason: Some("HTTP 529".into()),
        };
        let v = serde_json::to_value(&a).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"provider":"A","upstream_model":"m","outcome":"fault","class":"overloaded","status":529,"ms":1234.567,"reason":"HTTP 529"})
        );
    }

    #[test]
    fn usage_is_read_from_a_message_or_an_event() {
        let m = br#"{"type":"message","usage":{"input_tokens":12,"output_tokens":3,"cache_read_input_tokens":4}}"#;
        assert_eq!(
            Usage::of_message(m),
            Usage {
                input_tokens: 12,
                output_tokens: 3,
                cache_read_input_tokens: 4,
                cache_creation_input_tokens: 0
            }
        );
        let mut u = Usage::default();
        u.merge_json(br#"{"type":"message_start","message":{"usage":{"input_tokens":7}}}"#);
        u.merge_json(br#"{"type":"message_delta","usage":{"output_tokens":9}}"#);
        assert_eq!((u.input_tokens, u.output_tokens), (7, 9));
    }
}
