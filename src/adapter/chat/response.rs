//! An Anthropic `Message` as a `chat.completion` (`openai-front.md` §2.5-2.7).

use serde_json::{Value, json};

use super::ChatContext;
use crate::adapter::ids::tool_id_to_upstream;

/// OpenAI's `finish_reason` for an Anthropic `stop_reason` (§2.6); `tool_use` only counts when a
/// tool call was written.
pub fn finish_reason(stop_reason: Option<&str>, tool_calls: bool) -> &'static str {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => "length",
        Some("tool_use") if tool_calls => "tool_calls",
        Some("refusal") => "content_filter",
        _ if tool_calls => "tool_calls",
        _ => "stop",
    }
}

/// An Anthropic `usage` object as OpenAI counts it: the whole prompt (cached tokens included),
/// the cached part read, the part written, the output, and the thinking among the output.
pub struct Counts {
    pub prompt: u64,
    pub read: u64,
    pub write: u64,
    pub output: u64,
    pub reasoning: u64,
}

impl Counts {
    pub fn of(u: &Value) -> Self {
        let n = |k: &str| u.get(k).and_then(Value::as_u64).unwrap_or(0);
        let (read, write) = (
            n("cache_read_input_tokens"),
            n("cache_creation_input_tokens"),
        );
        Self {
            prompt: n("input_tokens") + read + write,
            read,
            write,
            output: n("output_tokens"),
            reasoning: u
                .pointer("/output_tokens_details/thinking_tokens")
                .and_then(Value::as_u64)
                .unwrap_or(0),
        }
    }
}

/// OpenAI's `usage` for an Anthropic `usage` object (§2.7): the prompt counts cached tokens.
pub fn usage(u: &Value) -> Value {
    let Counts {
        prompt,
        read,
        write,
        output: completion,
        reasoning,
    } = Counts::of(u);
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    })
}

/// A tool_use block's id as the client knows it (an id the front end encoded goes back decoded).
pub fn call_id(id: &str) -> String {
    tool_id_to_upstream(id)
}

/// A complete Anthropic message as a `chat.completion` with the given id and creation time.
pub fn completion(message: &Value, ctx: &ChatContext, id: &str, created: u64) -> Value {
    let mut text = String::new();
    let mut reasoning = String::new();
    let mut calls = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block.get("type").and_then(Value::as_str) {
            Some("text") => text.push_str(block.get("text").and_then(Value::as_str).unwrap_or("")),
            Some("thinking") => {
                reasoning.push_str(block.get("thinking").and_then(Value::as_str).unwrap_or(""));
            }
            Some("tool_use") => {
                let args = block
                    .get("input")
                    .map_or_else(|| "{}".to_owned(), Value::to_string);
                calls.push(json!({"id": call_id(block.get("id").and_then(Value::as_str).unwrap_or("")), "type": "function",
                    "function": {"name": block.get("name").and_then(Value::as_str).unwrap_or(""), "arguments": args}}));
            }
            // Redacted thinking and server-tool blocks have no Chat Completions form.
            _ => {}
        }
    }
    let stop = message.get("stop_reason").and_then(Value::as_str);
    let mut msg = json!({
        "role": "assistant",
        "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { json!(text) },
        "refusal": null,
    });
    if !reasoning.is_empty() {
        msg["reasoning_content"] = json!(reasoning);
    }
    let any_calls = !calls.is_empty();
    if any_calls {
        msg["tool_calls"] = Value::Array(calls);
    }
    json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": ctx.model,
        "choices": [{"index": 0, "message": msg, "finish_reason": finish_reason(stop, any_calls), "logprobs": null}],
        "usage": usage(message.get("usage").unwrap_or(&Value::Null)),
        "system_fingerprint": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ChatContext {
        ChatContext {
            model: "asked-for".into(),
            include_usage: false,
        }
    }

    #[test]
    fn a_message_with_thinking_text_and_tools_becomes_one_choice() {
        let m = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "upstream",
            "content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "I will "},
                {"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"path": "a"}}, {"type": "text", "text": "look."},
                {"type": "tool_use", "id": "toolu_2", "name": "ls", "input": {}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 10, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 5, "output_tokens": 7}});
        let c = completion(&m, &ctx(), "chatcmpl-x", 42);
        assert_eq!(c["model"], "asked-for");
        assert_eq!(c["object"], "chat.completion");
        let msg = &c["choices"][0]["message"];
        assert_eq!(msg["content"], "I will look.");
        assert_eq!(msg["reasoning_content"], "hmm");
        assert_eq!(
            msg["tool_calls"][0],
            json!({"id": "toolu_1", "type": "function", "function": {"name": "read", "arguments": "{\"path\":\"a\"}"}})
        );
        assert_eq!(msg["tool_calls"][1]["function"]["arguments"], "{}");
        assert_eq!(c["choices"][0]["finish_reason"], "tool_calls");
        assert_eq!(c["usage"]["prompt_tokens"], 115);
        assert_eq!(c["usage"]["completion_tokens"], 7);
        assert_eq!(c["usage"]["total_tokens"], 122);
        assert_eq!(c["usage"]["prompt_tokens_details"]["cached_tokens"], 100);
        assert_eq!(c["usage"]["prompt_tokens_details"]["cache_write_tokens"], 5);
    }

    #[test]
    fn finish_reasons_follow_the_table() {
        assert_eq!(finish_reason(Some("end_turn"), false), "stop");
        assert_eq!(finish_reason(Some("stop_sequence"), false), "stop");
        assert_eq!(finish_reason(Some("max_tokens"), false), "length");
        assert_eq!(
            finish_reason(Some("model_context_window_exceeded"), false),
            "length"
        );
        assert_eq!(
            finish_reason(Some("tool_use"), false),
            "stop",
            "no call was written"
        );
        assert_eq!(finish_reason(Some("tool_use"), true), "tool_calls");
        assert_eq!(finish_reason(Some("refusal"), false), "content_filter");
        assert_eq!(finish_reason(Some("pause_turn"), false), "stop");
        assert_eq!(finish_reason(None, false), "stop");
    }

    #[test]
    fn a_tool_only_answer_has_null_content_and_encoded_ids_go_back_decoded() {
        let encoded = crate::adapter::ids::tool_id_from_upstream(Some("call.1"));
        let m = json!({"content": [{"type": "tool_use", "id": encoded, "name": "a", "input": {}}], "stop_reason": "tool_use", "usage": {}});
        let c = completion(&m, &ctx(), "x", 1);
        assert!(c["choices"][0]["message"]["content"].is_null());
        assert_eq!(c["choices"][0]["message"]["tool_calls"][0]["id"], "call.1");
    }
}
