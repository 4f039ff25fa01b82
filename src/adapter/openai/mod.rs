//! Anthropic Messages ⇄ OpenAI Chat Completions (the protocol reference's Chat Completions and conversion parts).
//!
//! - [`request`]: an Anthropic request body to a Chat Completions body (C.2-C.8).
//! - [`response`]: a Chat Completions answer to an Anthropic `Message` (C.9-C.11).
//! - [`stream`]: the state machine that turns Chat Completions chunks into Anthropic SSE events
//!   (C.12-C.13).
//! - [`errors`]: OpenAI-style error bodies to Anthropic errors (C.14).

pub mod errors;
pub mod hygiene;
pub mod request;
pub mod response;
pub mod stream;

use serde_json::Value;

use crate::config::Dialect;

/// What the conversion needs to know about the provider and the client's request.
#[derive(Debug, Clone)]
pub struct Options {
    pub dialect: Dialect,
    pub max_tokens_cap: Option<u64>,
    pub sanitize_schemas: bool,
}

/// What the response side needs to remember from the request.
#[derive(Debug, Clone, Default)]
pub struct ReplyContext {
    /// The model name the client asked for: echoed in every answer.
    pub model: String,
    /// Whether the client asked for thinking; reasoning is dropped otherwise.
    pub thinking: bool,
    /// The client's stop sequences, to report which one matched.
    pub stop_sequences: Vec<String>,
    /// A local estimate of the prompt's tokens, for `message_start` and missing usage.
    pub input_estimate: u64,
}

impl ReplyContext {
    pub fn from_request(body: &Value, input_estimate: u64) -> Self {
        let thinking = body
            .get("thinking")
            .and_then(|t| t.get("type"))
            .and_then(Value::as_str)
            .is_some_and(|t| t == "enabled" || t == "adaptive");
        let stop_sequences = body
            .get("stop_sequences")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            model: body
                .get("model")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            thinking,
            stop_sequences,
            input_estimate,
        }
    }
}

/// Anthropic usage from an OpenAI `usage` object (C.11): all three input fields, always.
pub fn usage_to_anthropic(
    usage: Option<&Value>,
    fallback_input: u64,
    fallback_output: u64,
) -> Value {
    let Some(u) = usage.filter(|u| u.is_object()) else {
        return serde_json::json!({
            "input_tokens": fallback_input,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": fallback_output,
        });
    };
    let num = |v: Option<&Value>| v.and_then(Value::as_u64).unwrap_or(0);
    let prompt = num(u.get("prompt_tokens"));
    let completion = u
        .get("completion_tokens")
        .and_then(Value::as_u64)
        .unwrap_or(fallback_output);
    let details = u.get("prompt_tokens_details");
    let read = [
        details.and_then(|d| d.get("cached_tokens")),
        u.get("prompt_cache_hit_tokens"),
        u.get("cached_tokens"),
    ]
    .into_iter()
    .map(num)
    .find(|n| *n > 0)
    .unwrap_or(0);
    let write = num(details.and_then(|d| d.get("cache_write_tokens")));
    let mut out = serde_json::json!({
        "input_tokens": prompt.saturating_sub(read + write),
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "output_tokens": completion,
    });
    if let Some(r) = u
        .pointer("/completion_tokens_details/reasoning_tokens")
        .and_then(Value::as_u64)
    {
        out["output_tokens_details"] = serde_json::json!({ "thinking_tokens": r });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_reports_all_three_input_fields() {
        let u = usage_to_anthropic(
            Some(
                &json!({"prompt_tokens":5120,"completion_tokens":88,"prompt_tokens_details":{"cached_tokens":4096}}),
            ),
            1,
            1,
        );
        assert_eq!(
            u,
            json!({"input_tokens":1024,"cache_creation_input_tokens":0,"cache_read_input_tokens":4096,"output_tokens":88})
        );
        let ds = usage_to_anthropic(
            Some(
                &json!({"prompt_tokens":100,"completion_tokens":5,"prompt_cache_hit_tokens":60,"prompt_cache_miss_tokens":40}),
            ),
            1,
            1,
        );
        assert_eq!(ds["input_tokens"], 40);
        assert_eq!(ds["cache_read_input_tokens"], 60);
        let moon = usage_to_anthropic(
            Some(&json!({"prompt_tokens":100,"completion_tokens":5,"cached_tokens":30})),
            1,
            1,
        );
        assert_eq!(moon["cache_read_input_tokens"], 30);
        let or = usage_to_anthropic(
            Some(
                &json!({"prompt_tokens":100,"completion_tokens":5,"prompt_tokens_details":{"cached_tokens":10,"cache_write_tokens":20},"completion_tokens_details":{"reasoning_tokens":3}}),
            ),
            1,
            1,
        );
        assert_eq!(or["input_tokens"], 70);
        assert_eq!(or["cache_creation_input_tokens"], 20);
        assert_eq!(or["output_tokens_details"]["thinking_tokens"], 3);
        let none = usage_to_anthropic(None, 42, 7);
        assert_eq!(
            none,
            json!({"input_tokens":42,"cache_creation_input_tokens":0,"cache_read_input_tokens":0,"output_tokens":7})
        );
    }
}
