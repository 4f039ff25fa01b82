//! OpenAI-style error bodies → Anthropic errors (the protocol reference's error mapping section).

use http::StatusCode;
use regex::Regex;
use serde_json::Value;
use std::sync::LazyLock;

use crate::error::{ApiError, error_type_for_status};

/// The message and code of an OpenAI, OpenRouter or Mistral-style error body.
pub fn error_parts(body: &[u8]) -> (String, String) {
    let text = String::from_utf8_lossy(body);
    let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
    let err = v.get("error").filter(|e| e.is_object()).unwrap_or(&v);
    let message = err
        .get("message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .or_else(|| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.trim().chars().take(500).collect());
    let code = err
        .get("code")
        .or_else(|| err.get("type"))
        .map(|c| {
            c.as_str()
                .map(str::to_owned)
                .unwrap_or_else(|| c.to_string())
        })
        .unwrap_or_default();
    (message, code)
}

static NUMBERS: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\d[\d,]*")
        .unwrap_or_else(|_| Regex::new("$^").unwrap_or_else(|_| unreachable_regex()))
});

fn unreachable_regex() -> Regex {
    // Both patterns above are constant and valid; this is never reached.
    Regex::new("").unwrap_or_else(|_| std::process::abort())
}

fn numbers(s: &str) -> Vec<u64> {
    NUMBERS
        .find_iter(s)
        .filter_map(|m| m.as_str().replace(',', "").parse().ok())
        .collect()
}

pub(crate) fn is_context_overflow(message: &str, code: &str) -> bool {
    let m = message.to_ascii_lowercase();
    code == "context_length_exceeded"
        || [
            "maximum context length",
            "context length",
            "prompt is too long",
            "too many tokens",
            "context window",
            "input is too long",
            "reduce the length",
            "context_length_exceeded",
        ]
        .iter()
        .any(|p| m.contains(p))
}

/// Rewrites a context-overflow message into the wording Claude Code acts on: `prompt is too long`
/// (it compacts) or `input length and max_tokens exceed context limit` (it lowers max_tokens).
/// `estimate` is the local prompt estimate, used when the upstream gave no numbers.
pub fn context_overflow_message(message: &str, estimate: u64) -> String {
    let lower = message.to_ascii_lowercase();
    let n = numbers(message);
    // vLLM: "maximum context length is L tokens. However, you requested T tokens (A in the messages, B in the completion)".
    if lower.contains("in the completion") && n.len() >= 4 {
        let (limit, input, output) = (n[0], n[2], n[3]);
        if input > limit {
            return format!("prompt is too long: {input} tokens > {limit} maximum");
        }
        return format!(
            "input length and `max_tokens` exceed context limit: {input} + {output} > {limit}, decrease input length or `max_tokens` and try again"
        );
    }
    // OpenAI: "maximum context length is L tokens. However, your messages resulted in N tokens".
    if n.len() >= 2 {
        let (limit, total) = if lower
            .find("maximum")
            .zip(lower.find("resulted"))
            .is_some_and(|(a, b)| a < b)
        {
            (n[0], n[1])
        } else {
            (n[0].min(n[1]), n[0].max(n[1]))
        };
        if total > limit {
            return format!("prompt is too long: {total} tokens > {limit} maximum");
        }
    }
    let limit = n
        .first()
        .copied()
        .filter(|l| *l < estimate)
        .unwrap_or(estimate.saturating_sub(1));
    format!(
        "prompt is too long: {} tokens > {limit} maximum",
        estimate.max(limit + 1)
    )
}

/// An OpenAI-side error that goes back to the client (a client fault) in Anthropic form.
pub fn to_anthropic(status: u16, body: &[u8], provider: &str, estimate: u64) -> ApiError {
    let (message, code) = error_parts(body);
    if matches!(status, 400 | 413 | 422) && is_context_overflow(&message, &code) {
        return ApiError::invalid_request(context_overflow_message(&message, estimate));
    }
    let (status, kind) = match status {
        400 | 422 => (StatusCode::BAD_REQUEST, "invalid_request_error"),
        // The provider refused the balancer's own credentials: never a 401 to the client.
        401 | 403
            if code.contains("moderation")
                || message.to_ascii_lowercase().contains("moderation") =>
        {
            (StatusCode::BAD_REQUEST, "invalid_request_error")
        }
        401 | 403 => (StatusCode::BAD_GATEWAY, "api_error"),
        502 | 503 => (
            StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
            "overloaded_error",
        ),
        408 => (StatusCode::GATEWAY_TIMEOUT, "timeout_error"),
        s => (
            StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY),
            error_type_for_status(s),
        ),
    };
    ApiError::new(status, kind, format!("upstream ({provider}): {message}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn context_overflow_is_rewritten_in_claude_codes_words() {
        let openai = br#"{"error":{"message":"This model's maximum context length is 128000 tokens. However, your messages resulted in 140000 tokens. Please reduce the length of the messages.","type":"invalid_request_error","param":"messages","code":"context_length_exceeded"}}"#;
        let e = to_anthropic(400, openai, "p", 1000);
        assert_eq!(e.status, 400);
        assert_eq!(e.error_type, "invalid_request_error");
        assert_eq!(
            e.message,
            "prompt is too long: 140000 tokens > 128000 maximum"
        );

        let vllm = br#"{"object":"error","message":"This model's maximum context length is 32768 tokens. However, you requested 33000 tokens (1000 in the messages, 32000 in the completion). Please reduce the length of the messages or completion.","type":"BadRequestError","param":null,"code":400}"#;
        let e = to_anthropic(400, vllm, "p", 1000);
        assert_eq!(
            e.message,
            "input length and `max_tokens` exceed context limit: 1000 + 32000 > 32768, decrease input length or `max_tokens` and try again"
        );

        let vague = br#"{"error":{"message":"context window exceeded"}}"#;
        let e = to_anthropic(400, vague, "p", 5000);
        assert_eq!(e.message, "prompt is too long: 5000 tokens > 4999 maximum");
    }

    #[test]
    fn other_errors_keep_their_text_with_the_right_type() {
        let e = to_anthropic(
            400,
            br#"{"error":{"message":"bad tool schema","type":"invalid_request_error"}}"#,
            "or",
            1,
        );
        assert_eq!(e.message, "upstream (or): bad tool schema");
        assert_eq!(e.status, 400);
        let e = to_anthropic(
            401,
            br#"{"error":{"code":401,"message":"No auth credentials found"}}"#,
            "or",
            1,
        );
        assert_eq!((e.status.as_u16(), e.error_type), (502, "api_error"));
        let e = to_anthropic(
            503,
            br#"{"error":{"code":503,"message":"No available providers"}}"#,
            "or",
            1,
        );
        assert_eq!((e.status.as_u16(), e.error_type), (529, "overloaded_error"));
        let e = to_anthropic(429, b"slow down", "or", 1);
        assert_eq!((e.status.as_u16(), e.error_type), (429, "rate_limit_error"));
    }
}
