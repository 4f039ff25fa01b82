//! Passthrough's one history repair (the protocol reference's passthrough rules): thinking blocks signed by this gateway
//! (made while the session was on an OpenAI-compatible route) are removed before the request goes
//! to an Anthropic-native provider, which would answer 400 "Invalid `signature`".

use bytes::Bytes;
use serde_json::Value;

use super::ids::{SIGNATURE_PREFIX, is_gateway_signature};

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
    changed.then(|| Bytes::from(serde_json::to_vec(&v).unwrap_or_default()))
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
}
