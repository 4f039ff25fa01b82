//! Chat Completions answer → Anthropic `Message` (the protocol reference's non-streaming response,
//! finish reason and usage mapping sections).

use serde_json::{Value, json};

use super::{ReplyContext, usage_to_anthropic};
use crate::adapter::ids::{message_id, thinking_signature, tool_id_from_upstream};

/// Reasoning text of a message or delta: `reasoning_details`, then `reasoning`, then
/// `reasoning_content` (never two of them: servers fill several with the same text).
pub fn reasoning_text(m: &Value) -> Option<String> {
    if let Some(details) = m.get("reasoning_details").and_then(Value::as_array) {
        let text: String = details
            .iter()
            .filter_map(|d| match d.get("type").and_then(Value::as_str) {
                Some("reasoning.text") => d.get("text").and_then(Value::as_str),
                Some("reasoning.summary") => d.get("summary").and_then(Value::as_str),
                _ => None,
            })
            .collect();
        if !text.is_empty() {
            return Some(text);
        }
    }
    ["reasoning", "reasoning_content"]
        .into_iter()
        .filter_map(|k| m.get(k).and_then(Value::as_str))
        .find(|s| !s.is_empty())
        .map(str::to_owned)
}

/// Splits `<think>…</think>` at the start of a complete content string.
pub fn split_think_tags(content: &str) -> (Option<String>, String) {
    let trimmed = content.trim_start();
    if let Some(rest) = trimmed.strip_prefix("<think>") {
        if let Some(end) = rest.find("</think>") {
            return (
                Some(rest[..end].to_owned()),
                rest[end + "</think>".len()..].to_owned(),
            );
        }
        return (Some(rest.to_owned()), String::new());
    }
    (None, content.to_owned())
}

/// Tool arguments as an `input` object (C.12.6): empty is `{}`, a JSON string holding an object is
/// unwrapped, anything else that parses is kept, and unparseable text is kept as a string value
/// under `_raw` so nothing is silently lost.
pub fn parse_arguments(args: &str) -> Value {
    if args.trim().is_empty() {
        return json!({});
    }
    match serde_json::from_str::<Value>(args) {
        Ok(Value::Object(o)) => Value::Object(o),
        Ok(Value::String(inner)) => match serde_json::from_str::<Value>(&inner) {
            Ok(Value::Object(o)) => Value::Object(o),
            _ => json!({ "_raw": inner }),
        },
        Ok(other) => json!({ "_raw": other }),
        Err(_) => json!({ "_raw": args }),
    }
}

/// The Anthropic stop reason for what was produced (C.10). Returns `(stop_reason, stop_sequence)`.
pub fn stop_reason(
    finish: Option<&str>,
    tools_emitted: bool,
    text: &str,
    native_stop: Option<&Value>,
    ctx: &ReplyContext,
) -> (&'static str, Option<String>) {
    if tools_emitted {
        return ("tool_use", None);
    }
    match finish {
        Some("length") => ("max_tokens", None),
        Some("content_filter") => ("refusal", None),
        Some("stop") | None => {
            // vLLM reports the matched stop string; otherwise look at the end of the text.
            let matched = native_stop
                .and_then(Value::as_str)
                .filter(|s| ctx.stop_sequences.iter().any(|x| x == s))
                .map(str::to_owned)
                .or_else(|| {
                    ctx.stop_sequences
                        .iter()
                        .find(|s| !s.is_empty() && text.ends_with(s.as_str()))
                        .cloned()
                });
            match matched {
                Some(s) => ("stop_sequence", Some(s)),
                None => ("end_turn", None),
            }
        }
        Some(other) => {
            if other != "tool_calls" && other != "function_call" {
                tracing::debug!(
                    finish_reason = other,
                    "unknown finish_reason mapped to end_turn"
                );
            }
            ("end_turn", None)
        }
    }
}

/// Converts a non-streaming Chat Completions answer. `None` when it has no `choices[0]`.
pub fn to_message(answer: &Value, ctx: &ReplyContext) -> Option<Value> {
    let choice = answer.get("choices")?.as_array()?.first()?;
    let msg = choice.get("message").unwrap_or(&Value::Null);
    let mut content: Vec<Value> = Vec::new();
    let raw_text = msg.get("content").and_then(Value::as_str).unwrap_or("");
    let (tag_reasoning, text) = split_think_tags(raw_text);
    let reasoning = reasoning_text(msg)
        .or(tag_reasoning)
        .filter(|r| !r.is_empty());
    if let (Some(r), true) = (&reasoning, ctx.thinking) {
        content
            .push(json!({"type": "thinking", "thinking": r, "signature": thinking_signature(r)}));
    }
    if !text.trim().is_empty() {
        content.push(json!({"type": "text", "text": text}));
    }
    if let Some(refusal) = msg
        .get("refusal")
        .and_then(Value::as_str)
        .filter(|r| !r.trim().is_empty())
    {
        content.push(json!({"type": "text", "text": refusal}));
    }
    let mut tools_emitted = false;
    if let Some(calls) = msg.get("tool_calls").and_then(Value::as_array) {
        for call in calls {
            let f = call.get("function").unwrap_or(&Value::Null);
            let Some(name) = f
                .get("name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
            else {
                continue;
            };
            let args = match f.get("arguments") {
                Some(Value::String(s)) => parse_arguments(s),
                Some(Value::Object(o)) => Value::Object(o.clone()),
                _ => json!({}),
            };
            content.push(json!({
                "type": "tool_use",
                "id": tool_id_from_upstream(call.get("id").and_then(Value::as_str)),
                "name": name,
                "input": args,
            }));
            tools_emitted = true;
        }
    }
    let finish = choice.get("finish_reason").and_then(Value::as_str);
    let (stop, stop_sequence) =
        stop_reason(finish, tools_emitted, &text, choice.get("stop_reason"), ctx);
    let output_estimate = (text.len() as u64 / 4).max(1);
    let mut message = json!({
        "id": message_id(),
        "type": "message",
        "role": "assistant",
        "model": ctx.model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": stop_sequence,
        "usage": usage_to_anthropic(answer.get("usage"), ctx.input_estimate, output_estimate),
    });
    if stop == "refusal" {
        message["stop_details"] =
            json!({"type": "refusal", "category": null, "explanation": "upstream content filter"});
    }
    Some(message)
}
