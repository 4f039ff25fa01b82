//! The OpenAI Responses API front end (`openai-front.md` §3), stateless: a Responses request as an
//! Anthropic request, and an Anthropic answer as a `response` object or its typed event stream.
//! Pure.
//!
//! - [`request`]: input items, tools, instructions, reasoning and text format to an Anthropic body.
//! - this module: the `response` object of a complete message (§3.4), usage, and the reasoning
//!   item's `encrypted_content`, which carries signed thinking from one turn to the next.
//! - [`stream`]: the state machine that turns Anthropic events into Responses events (§3.5).

pub mod request;
pub mod stream;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

use crate::adapter::ids::base62;

/// How a tool the model calls is shown to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolKind {
    /// `custom_tool_call` with the string `input`.
    Custom,
    /// `local_shell_call` with an `exec` action.
    LocalShell,
}

/// What the rendering of an answer needs to know about its request.
#[derive(Debug, Clone, PartialEq)]
pub struct ResponsesContext {
    /// The model name the client asked for: echoed in every answer.
    pub model: String,
    /// The request's fields a `response` object repeats (tools, tool_choice, instructions, …).
    pub echo: Value,
    /// The tools that are not functions, by name.
    pub tools: Vec<(String, ToolKind)>,
}

impl ResponsesContext {
    fn kind_of(&self, name: &str) -> Option<ToolKind> {
        self.tools.iter().find(|(n, _)| n == name).map(|(_, k)| *k)
    }
}

/// Prefix of the reasoning item's `encrypted_content` this gateway writes.
const BLOB_PREFIX: &str = "cbr1.";

/// Thinking blocks (with their signatures) as a reasoning item's `encrypted_content`.
pub fn encrypt(blocks: &[Value]) -> String {
    let json = json!({"v": 1, "blocks": blocks}).to_string();
    format!("{BLOB_PREFIX}{}", URL_SAFE_NO_PAD.encode(json))
}

/// The thinking blocks of an `encrypted_content` this gateway wrote; `None` for anything else.
pub fn decrypt(blob: &str) -> Option<Vec<Value>> {
    let bytes = URL_SAFE_NO_PAD
        .decode(blob.strip_prefix(BLOB_PREFIX)?)
        .ok()?;
    let v: Value = serde_json::from_slice(&bytes).ok()?;
    let blocks: Vec<Value> = v.get("blocks")?.as_array()?.clone();
    let valid = blocks.iter().all(|b| match b["type"].as_str() {
        Some("thinking") => b["thinking"].is_string() && b["signature"].is_string(),
        Some("redacted_thinking") => b["data"].is_string(),
        _ => false,
    });
    (valid && !blocks.is_empty()).then_some(blocks)
}

/// A Responses request body without the reasoning items whose `encrypted_content` this gateway
/// wrote (from an Anthropic-native turn): a provider that speaks the API itself would reject
/// them. `None` when there are none.
pub fn strip_gateway_reasoning(body: &[u8]) -> Option<bytes::Bytes> {
    memchr::memmem::find(body, format!("\"{BLOB_PREFIX}").as_bytes())?;
    let mut v: Value = serde_json::from_slice(body).ok()?;
    let items = v.get_mut("input")?.as_array_mut()?;
    let before = items.len();
    items.retain(|i| {
        !(i["type"] == "reasoning"
            && i["encrypted_content"]
                .as_str()
                .is_some_and(|e| e.starts_with(BLOB_PREFIX)))
    });
    (items.len() < before).then(|| bytes::Bytes::from(v.to_string()))
}

/// `resp_` plus 24 random base62 characters.
pub fn response_id() -> String {
    format!("resp_{}", base62(24))
}

/// An output item id with its prefix (`msg`, `rs`, `fc`, `ctc`, `lsh`).
pub fn item_id(prefix: &str) -> String {
    format!("{prefix}_{}", base62(24))
}

/// The Responses `usage` for an Anthropic `usage` object (§3.4): input counts cached tokens.
pub fn usage(u: &Value) -> Value {
    let crate::adapter::chat::response::Counts {
        prompt: input,
        read,
        write,
        output,
        reasoning,
    } = crate::adapter::chat::response::Counts::of(u);
    json!({
        "input_tokens": input,
        "input_tokens_details": {"cached_tokens": read, "cache_write_tokens": write},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": input + output,
    })
}

/// The `response` object: status, output items and usage around the echoed request.
pub fn envelope(
    ctx: &ResponsesContext,
    id: &str,
    created: u64,
    status: &str,
    output: Vec<Value>,
    usage: Value,
) -> Value {
    let e = &ctx.echo;
    let or = |k: &str, d: Value| e.get(k).cloned().unwrap_or(d);
    json!({
        "id": id,
        "object": "response",
        "created_at": created,
        "status": status,
        "background": false,
        "error": null,
        "incomplete_details": null,
        "instructions": or("instructions", Value::Null),
        "max_output_tokens": or("max_output_tokens", Value::Null),
        "metadata": or("metadata", json!({})),
        "model": ctx.model,
        "output": output,
        "parallel_tool_calls": or("parallel_tool_calls", json!(true)),
        "previous_response_id": null,
        "prompt_cache_key": or("prompt_cache_key", Value::Null),
        "reasoning": or("reasoning", json!({"effort": null, "summary": null})),
        "service_tier": or("service_tier", Value::Null),
        "store": or("store", json!(false)),
        "temperature": or("temperature", Value::Null),
        "text": or("text", json!({"format": {"type": "text"}})),
        "tool_choice": or("tool_choice", json!("auto")),
        "tools": or("tools", json!([])),
        "top_p": or("top_p", Value::Null),
        "truncation": "disabled",
        "usage": usage,
        "user": or("user", Value::Null),
    })
}

/// The output item of a completed tool_use block (`input` as the model wrote it).
pub fn call_item(
    ctx: &ResponsesContext,
    id: &str,
    call_id: &str,
    name: &str,
    input: &Value,
) -> Value {
    match ctx.kind_of(name) {
        Some(ToolKind::Custom) => {
            json!({"type": "custom_tool_call", "id": id, "call_id": call_id, "name": name,
            "input": input.get("input").and_then(Value::as_str).map_or_else(|| input.to_string(), str::to_owned), "status": "completed"})
        }
        Some(ToolKind::LocalShell) => {
            let mut action = json!({"type": "exec", "command": input.get("command").cloned().unwrap_or(json!([])), "env": {}});
            if let Some(w) = input.get("workdir") {
                action["working_directory"] = w.clone();
            }
            if let Some(t) = input.get("timeout_ms") {
                action["timeout_ms"] = t.clone();
            }
            json!({"type": "local_shell_call", "id": id, "call_id": call_id, "status": "completed", "action": action})
        }
        None => json!({"type": "function_call", "id": id, "call_id": call_id, "name": name,
            "arguments": input.to_string(), "status": "completed"}),
    }
}

/// A message item holding one text.
pub fn message_item(id: &str, text: &str, status: &str) -> Value {
    json!({"type": "message", "id": id, "role": "assistant", "status": status,
        "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]})
}

/// A reasoning item: the readable thinking as its summary, the signed blocks in
/// `encrypted_content`.
pub fn reasoning_item(id: &str, text: &str, blocks: &[Value]) -> Value {
    let summary = if text.is_empty() {
        json!([])
    } else {
        json!([{"type": "summary_text", "text": text}])
    };
    json!({"type": "reasoning", "id": id, "summary": summary, "encrypted_content": encrypt(blocks), "status": "completed"})
}

/// The status and the reason a response ends with, for an Anthropic `stop_reason`.
pub fn ending(stop_reason: Option<&str>) -> (&'static str, Option<&'static str>) {
    match stop_reason {
        Some("max_tokens" | "model_context_window_exceeded") => {
            ("incomplete", Some("max_output_tokens"))
        }
        Some("refusal") => ("incomplete", Some("content_filter")),
        _ => ("completed", None),
    }
}

/// A complete Anthropic message as a `response` object.
pub fn response(message: &Value, ctx: &ResponsesContext, id: &str, created: u64) -> Value {
    let mut output = Vec::new();
    for block in message
        .get("content")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        match block["type"].as_str() {
            Some("text") => output.push(message_item(
                &item_id("msg"),
                block["text"].as_str().unwrap_or(""),
                "completed",
            )),
            Some("thinking") => output.push(reasoning_item(
                &item_id("rs"),
                block["thinking"].as_str().unwrap_or(""),
                std::slice::from_ref(block),
            )),
            Some("redacted_thinking") => {
                output.push(reasoning_item(
                    &item_id("rs"),
                    "",
                    std::slice::from_ref(block),
                ));
            }
            Some("tool_use") => output.push(call_item(
                ctx,
                &item_id("fc"),
                block["id"].as_str().unwrap_or(""),
                block["name"].as_str().unwrap_or(""),
                block.get("input").unwrap_or(&json!({})),
            )),
            _ => {}
        }
    }
    let (status, reason) = ending(message.get("stop_reason").and_then(Value::as_str));
    let mut r = envelope(
        ctx,
        id,
        created,
        status,
        output,
        usage(message.get("usage").unwrap_or(&Value::Null)),
    );
    if let Some(reason) = reason {
        r["incomplete_details"] = json!({"reason": reason});
    }
    r
}

/// The `code` of a failed response for an Anthropic error: Codex gives up on
/// `context_length_exceeded`, `insufficient_quota` and `invalid_prompt`, and retries the rest.
pub fn failure_code(anthropic_type: &str, message: &str) -> &'static str {
    match anthropic_type {
        "invalid_request_error"
            if message.starts_with("prompt is too long")
                || message.starts_with("input length and `max_tokens` exceed context limit") =>
        {
            "context_length_exceeded"
        }
        "invalid_request_error" => "invalid_prompt",
        "rate_limit_error" => "rate_limit_exceeded",
        "billing_error" => "insufficient_quota",
        _ => "server_error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> ResponsesContext {
        ResponsesContext {
            model: "asked".into(),
            echo: json!({"tools": [{"type": "function", "name": "shell"}], "store": false}),
            tools: vec![("apply_patch".into(), ToolKind::Custom)],
        }
    }

    #[test]
    fn only_this_gateways_reasoning_items_are_stripped_for_a_native_provider() {
        let ours = encrypt(&[json!({"type": "thinking", "thinking": "t", "signature": "s"})]);
        let body = json!({"model": "m", "input": [{"role": "user", "content": "x"},
            {"type": "reasoning", "summary": [], "encrypted_content": ours},
            {"type": "reasoning", "summary": [], "encrypted_content": "gAAAA-theirs"}]});
        let stripped: Value =
            serde_json::from_slice(&strip_gateway_reasoning(body.to_string().as_bytes()).unwrap())
                .unwrap();
        assert_eq!(stripped["input"].as_array().unwrap().len(), 2);
        assert_eq!(stripped["input"][1]["encrypted_content"], "gAAAA-theirs");
        assert!(strip_gateway_reasoning(b"{\"model\":\"m\",\"input\":\"hi\"}").is_none());
    }

    #[test]
    fn encrypted_content_round_trips_and_foreign_blobs_are_refused() {
        let blocks = vec![
            json!({"type": "thinking", "thinking": "t", "signature": "s"}),
            json!({"type": "redacted_thinking", "data": "d"}),
        ];
        assert_eq!(decrypt(&encrypt(&blocks)), Some(blocks));
        assert_eq!(decrypt("gAAAAB-openai-blob"), None);
        assert_eq!(decrypt(&format!("{BLOB_PREFIX}not-base64!")), None);
        let forged = format!(
            "{BLOB_PREFIX}{}",
            URL_SAFE_NO_PAD.encode(r#"{"blocks":[{"type":"text","text":"x"}]}"#)
        );
        assert_eq!(decrypt(&forged), None);
    }

    #[test]
    fn a_message_becomes_items_in_order_with_usage() {
        let m = json!({"content": [{"type": "thinking", "thinking": "hmm", "signature": "s"}, {"type": "text", "text": "Patching."},
            {"type": "tool_use", "id": "toolu_1", "name": "shell", "input": {"command": ["ls"]}},
            {"type": "tool_use", "id": "toolu_2", "name": "apply_patch", "input": {"input": "*** Begin Patch"}}],
            "stop_reason": "tool_use", "usage": {"input_tokens": 5, "cache_read_input_tokens": 90, "output_tokens": 12}});
        let r = response(&m, &ctx(), "resp_1", 9);
        assert_eq!(r["status"], "completed");
        assert_eq!(r["model"], "asked");
        assert_eq!(r["tools"][0]["name"], "shell");
        let out = r["output"].as_array().unwrap();
        assert_eq!(out[0]["type"], "reasoning");
        assert_eq!(out[0]["summary"][0]["text"], "hmm");
        assert_eq!(
            decrypt(out[0]["encrypted_content"].as_str().unwrap()).unwrap()[0]["signature"],
            "s"
        );
        assert_eq!(out[1]["content"][0]["text"], "Patching.");
        assert_eq!(out[2]["type"], "function_call");
        assert_eq!(out[2]["call_id"], "toolu_1");
        assert_eq!(out[2]["arguments"], "{\"command\":[\"ls\"]}");
        assert_eq!(
            out[3],
            json!({"type": "custom_tool_call", "id": out[3]["id"], "call_id": "toolu_2", "name": "apply_patch", "input": "*** Begin Patch", "status": "completed"})
        );
        assert_eq!(r["usage"]["input_tokens"], 95);
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 90);
        assert_eq!(r["usage"]["total_tokens"], 107);
        let cut = response(
            &json!({"content": [], "stop_reason": "max_tokens", "usage": {}}),
            &ctx(),
            "r",
            1,
        );
        assert_eq!(
            (
                cut["status"].as_str(),
                cut["incomplete_details"]["reason"].as_str()
            ),
            (Some("incomplete"), Some("max_output_tokens"))
        );
    }
}
