//! Anthropic errors in OpenAI's shape (`openai-front.md` §2.9):
//! `{"error": {"message", "type", "param", "code"}}` with the statuses OpenAI uses.

use http::StatusCode;
use serde_json::{Value, json};

use super::Refusal;

/// The status and body of an error for an OpenAI client, from the Anthropic error type and the
/// status it had. The message is kept: clients and agents match context-overflow wording in it.
pub fn openai_error(status: u16, anthropic_type: &str, message: &str) -> (StatusCode, Value) {
    let too_long = message.starts_with("prompt is too long")
        || message.starts_with("input length and `max_tokens` exceed context limit");
    let (status, kind, code, param): (u16, &str, Option<&str>, Option<&str>) = match anthropic_type
    {
        "invalid_request_error" if too_long => (
            400,
            "invalid_request_error",
            Some("context_length_exceeded"),
            Some("messages"),
        ),
        "invalid_request_error" => (
            if status == 413 { 413 } else { 400 },
            "invalid_request_error",
            None,
            None,
        ),
        "authentication_error" => (401, "invalid_request_error", Some("invalid_api_key"), None),
        "permission_error" => (403, "permission_error", None, None),
        "not_found_error" if message.contains("model") => (
            404,
            "invalid_request_error",
            Some("model_not_found"),
            Some("model"),
        ),
        "not_found_error" => (404, "invalid_request_error", None, None),
        "request_too_large" => (413, "invalid_request_error", None, None),
        "rate_limit_error" => (429, "rate_limit_error", Some("rate_limit_exceeded"), None),
        "billing_error" => (402, "insufficient_quota", Some("insufficient_quota"), None),
        "overloaded_error" => (503, "server_error", Some("server_is_overloaded"), None),
        "timeout_error" => (
            if status == 408 { 408 } else { 504 },
            "server_error",
            Some("timeout"),
            None,
        ),
        _ => (
            if status >= 500 { status } else { 500 },
            "server_error",
            None,
            None,
        ),
    };
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({"error": {"message": message, "type": kind, "param": param, "code": code}}),
    )
}

/// An Anthropic error body (`{"type":"error","error":{...}}`), as a provider wrote it, for an
/// OpenAI client; a body that is not one keeps its text as the message.
pub fn from_anthropic_body(status: u16, body: &[u8]) -> (StatusCode, Value) {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let kind = v
        .pointer("/error/type")
        .and_then(Value::as_str)
        .unwrap_or_else(|| crate::error::error_type_for_status(status));
    let message = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(2000).collect());
    openai_error(status, kind, &message)
}

/// A front-end refusal: a 400 naming the parameter.
pub fn refusal(r: &Refusal) -> (StatusCode, Value) {
    (
        StatusCode::BAD_REQUEST,
        json!({"error": {"message": r.message, "type": "invalid_request_error", "param": r.param, "code": null}}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_codes_follow_the_table() {
        let cases = [
            (
                400,
                "invalid_request_error",
                "prompt is too long: 210000 tokens > 200000 maximum",
                400,
                "invalid_request_error",
                Some("context_length_exceeded"),
            ),
            (
                400,
                "invalid_request_error",
                "bad",
                400,
                "invalid_request_error",
                None,
            ),
            (
                401,
                "authentication_error",
                "no",
                401,
                "invalid_request_error",
                Some("invalid_api_key"),
            ),
            (403, "permission_error", "no", 403, "permission_error", None),
            (
                404,
                "not_found_error",
                "model \"x\" matches no entry",
                404,
                "invalid_request_error",
                Some("model_not_found"),
            ),
            (
                413,
                "request_too_large",
                "big",
                413,
                "invalid_request_error",
                None,
            ),
            (
                429,
                "rate_limit_error",
                "slow",
                429,
                "rate_limit_error",
                Some("rate_limit_exceeded"),
            ),
            (
                529,
                "overloaded_error",
                "busy",
                503,
                "server_error",
                Some("server_is_overloaded"),
            ),
            (502, "api_error", "all failed", 502, "server_error", None),
            (
                504,
                "timeout_error",
                "slow",
                504,
                "server_error",
                Some("timeout"),
            ),
        ];
        for (status, kind, message, want_status, want_type, want_code) in cases {
            let (s, body) = openai_error(status, kind, message);
            assert_eq!(s.as_u16(), want_status, "{kind}");
            assert_eq!(body["error"]["type"], want_type, "{kind}");
            assert_eq!(body["error"]["code"].as_str(), want_code, "{kind}");
            assert_eq!(body["error"]["message"], message);
        }
    }

    #[test]
    fn a_provider_body_is_read_or_kept_as_text() {
        let (s, b) = from_anthropic_body(
            429,
            br#"{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}"#,
        );
        assert_eq!(
            (s.as_u16(), b["error"]["message"].as_str()),
            (429, Some("slow down"))
        );
        let (s, b) = from_anthropic_body(400, b"plain words");
        assert_eq!(
            (s.as_u16(), b["error"]["message"].as_str()),
            (400, Some("plain words"))
        );
    }
}
