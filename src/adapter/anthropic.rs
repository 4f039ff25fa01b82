//! Passthrough's one history repair (the protocol reference's passthrough rules): thinking blocks signed by this gateway
//! (made while the session was on an OpenAI-compatible route) are removed before the request goes
//! to an Anthropic-native provider, which would answer 400 "Invalid `signature`".

use bytes::Bytes;
use serde_json::Value;

use super::ids::{SIGNATURE_PREFIX, is_gateway_signature};
use crate::error::ApiError;

/// An Anthropic-type provider's 400 that says the context overflowed in its own words (a relay
/// in front of another model: "maximum context length is 131072 tokens…"), rewritten in the
/// wording Claude Code acts on (`prompt is too long`: it compacts). `None` for any other error,
/// and for Anthropic's own wordings, which pass unchanged. `estimate`: the request's input size.
pub fn context_overflow(body: &[u8], estimate: u64) -> Option<ApiError> {
    let (message, code) = super::openai::errors::error_parts(body);
    if message.contains("prompt is too long")
        || message.contains("exceed context limit")
        || !super::openai::errors::is_context_overflow(&message, &code)
    {
        return None;
    }
    Some(ApiError::invalid_request(
        super::openai::errors::context_overflow_message(&message, estimate),
    ))
}

/// The body without gateway-signed thinking blocks, or `None` when it has none (the common case,
/// decided by a byte search without parsing).
pub fn strip_gateway_thinking(body: &[u8]) -> Option<Bytes> {
    let needle = format!("\"{SIGNATURE_PREFIX}");
    memchr::memmem::find(body, needle.as_bytes())?;
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let mut changed = false;
    if let Some(messages) = v.get_mut("messages").and_then(Value::as_array_mut) {
        for m in messages {
            if let Some(blocks) = m.get_mut("content").and_then(Value::as_array_mut) {
                let before = blocks.len();
                blocks.retain(|b| {
                    !(b.get("type").and_then(Value::as_str) == Some("thinking")
                        && b.get("signature")
                            .and_then(Value::as_str)
                            .is_some_and(is_gateway_signature))
                });
                changed |= blocks.len() != before;
            }
        }
    }
    if changed && thinking_loses_its_turn(&v) {
        // An open tool loop whose last assistant turn began with the thinking just removed:
        // with thinking on, Anthropic would refuse it ("Expected `thinking`…"); it goes without.
        if let Some(o) = v.as_object_mut() {
            o.remove("thinking");
        }
    }
    changed.then(|| Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
}

/// Thinking is on, the conversation ends in tool results, and the assistant turn that called
/// the tools does not begin with thinking.
fn thinking_loses_its_turn(v: &Value) -> bool {
    let on = matches!(
        v.pointer("/thinking/type").and_then(Value::as_str),
        Some("enabled" | "adaptive")
    );
    let Some(messages) = v.get("messages").and_then(Value::as_array) else {
        return false;
    };
    let first_type = |m: &Value| {
        m.get("content")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
            .and_then(|b| b.get("type"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let loop_open = messages
        .last()
        .is_some_and(|m| first_type(m).as_deref() == Some("tool_result"));
    let thinks = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("assistant"))
        .is_some_and(|m| {
            matches!(
                first_type(m).as_deref(),
                Some("thinking" | "redacted_thinking")
            )
        });
    on && loop_open && !thinks
}

#[cfg(test)]
mod overflow_tests {
    use super::*;

    #[test]
    fn a_relay_s_context_overflow_takes_the_wording_claude_code_compacts_on() {
        let relay = br#"{"type":"error","error":{"type":"invalid_request_error","message":"This model's maximum context length is 131072 tokens. However, you requested 140000 tokens (132000 in the messages, 8000 in the completion)."}}"#;
        let e = context_overflow(relay, 1).unwrap();
        assert_eq!(e.status, 400);
        assert_eq!(e.error_type, "invalid_request_error");
        assert_eq!(
            e.message,
            "prompt is too long: 132000 tokens > 131072 maximum"
        );
        let own = br#"{"type":"error","error":{"type":"invalid_request_error","message":"prompt is too long: 210000 tokens > 200000 maximum"}}"#;
        assert!(context_overflow(own, 1).is_none());
        let other = br#"{"type":"error","error":{"type":"invalid_request_error","message":"max_tokens: must be at most 8192"}}"#;
        assert!(context_overflow(other, 1).is_none());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ids::thinking_signature;
    use serde_json::json;

    #[test]
    fn removes_only_gateway_signed_thinking() {
        let body = json!({"model":"m","messages":[
            {"role":"user","content":"hi"},
            {"role":"assistant","content":[
                {"type":"thinking","thinking":"mine","signature": thinking_signature("mine")},
                {"type":"thinking","thinking":"theirs","signature":"EqQBCkgIBhAB"},
                {"type":"text","text":"answer"}]}]});
        let out = strip_gateway_thinking(body.to_string().as_bytes()).unwrap();
        let v: Value = serde_json::from_slice(&out).unwrap();
        let blocks = v["messages"][1]["content"].as_array().unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[0]["signature"], "EqQBCkgIBhAB");
        assert!(strip_gateway_thinking(br#"{"model":"m","messages":[]}"#).is_none());
    }

    #[test]
    fn an_open_loop_that_loses_its_thinking_goes_without_thinking() {
        let body = |last_user: Value| {
            json!({"model":"m","thinking":{"type":"enabled","budget_tokens":2048},"messages":[
                {"role":"user","content":"go"},
                {"role":"assistant","content":[
                    {"type":"thinking","thinking":"mine","signature": thinking_signature("mine")},
                    {"type":"tool_use","id":"t1","name":"a","input":{}}]},
                last_user]})
        };
        let open = body(
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"x"}]}),
        );
        let v: Value =
            serde_json::from_slice(&strip_gateway_thinking(open.to_string().as_bytes()).unwrap())
                .unwrap();
        assert!(v.get("thinking").is_none());
        let closed = body(
            json!({"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"x"}, {"type":"text","text":"and"}]}),
        );
        let mut closed = closed;
        closed["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role":"assistant","content":"ok"}));
        closed["messages"]
            .as_array_mut()
            .unwrap()
            .push(json!({"role":"user","content":"next"}));
        let v: Value =
            serde_json::from_slice(&strip_gateway_thinking(closed.to_string().as_bytes()).unwrap())
                .unwrap();
        assert_eq!(
            v["thinking"]["type"], "enabled",
            "a closed loop keeps thinking"
        );
    }
}
