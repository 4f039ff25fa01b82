//! A deterministic stand-in for a model, enough for an agent loop: it answers a prompt containing
//! `use the tool NAME {json}` with that tool call, a tool result with text quoting it, a prompt
//! containing `think` with reasoning first, and anything else with a short text. It speaks the
//! Anthropic Messages dialect at `/v1/messages` and Chat Completions at `/chat/completions`,
//! streaming or not.

use serde_json::{Value, json};

/// What the model decided to say.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub reasoning: Option<String>,
    pub text: Option<String>,
    pub tool: Option<(String, Value)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Anthropic,
    Openai,
}

/// The dialect a request path speaks.
pub fn dialect_of(path: &str) -> Dialect {
    if path
        .split('?')
        .next()
        .unwrap_or("")
        .ends_with("/chat/completions")
    {
        Dialect::Openai
    } else {
        Dialect::Anthropic
    }
}

fn texts(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| match p.get("type").and_then(Value::as_str) {
                Some("text") => p.get("text").and_then(Value::as_str).map(str::to_owned),
                Some("tool_result") => Some(texts(p.get("content").unwrap_or(&Value::Null))),
                _ => None,
            })
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    let mut out: String = s.chars().take(200).collect();
    if out.len() < s.len() {
        out.push('…');
    }
    out
}

/// Finds `use the tool NAME {json}` in a prompt.
fn tool_request(prompt: &str) -> Option<(String, Value)> {
    let at = prompt.find("use the tool ")?;
    let rest = &prompt[at + "use the tool ".len()..];
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .collect();
    let brace = rest.find('{')?;
    let mut de = serde_json::Deserializer::from_str(&rest[brace..]).into_iter::<Value>();
    let input = de.next()?.ok()?;
    (!name.is_empty()).then_some((name, input))
}

/// A value that fits a JSON schema: the first `enum` value, `"mock"` for strings, 1 for numbers,
/// every property of an object (references into `$defs` followed).
fn sample(schema: &Value, root: &Value, depth: usize) -> Value {
    if depth > 8 {
        return Value::Null;
    }
    if let Some(r) = schema.get("$ref").and_then(Value::as_str) {
        let path = r.trim_start_matches('#');
        return root
            .pointer(path)
            .map_or(Value::Null, |s| sample(s, root, depth + 1));
    }
    if let Some(first) = schema
        .get("enum")
        .and_then(Value::as_array)
        .and_then(|e| e.first())
    {
        return first.clone();
    }
    if let Some(c) = schema.get("const") {
        return c.clone();
    }
    if let Some(first) = ["anyOf", "oneOf", "allOf"].iter().find_map(|k| {
        schema
            .get(*k)
            .and_then(Value::as_array)
            .and_then(|a| a.first())
    }) {
        return sample(first, root, depth + 1);
    }
    let kind = match schema.get("type") {
        Some(Value::Array(kinds)) => kinds.iter().find_map(Value::as_str).unwrap_or("null"),
        Some(Value::String(k)) => k.as_str(),
        _ if schema.get("properties").is_some() => "object",
        _ => "string",
    };
    match kind {
        "object" => {
            let mut out = serde_json::Map::new();
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (k, v) in props {
                    out.insert(k.clone(), sample(v, root, depth + 1));
                }
            }
            Value::Object(out)
        }
        "array" => json!([sample(
            schema.get("items").unwrap_or(&json!({})),
            root,
            depth + 1
        )]),
        "integer" => json!(1),
        "number" => json!(1.5),
        "boolean" => json!(true),
        "null" => Value::Null,
        _ => json!("mock"),
    }
}

/// The JSON schema a request asks the answer to follow, in either dialect.
fn wanted_schema(body: &Value) -> Option<&Value> {
    body.pointer("/output_config/format/schema")
        .or_else(|| body.pointer("/response_format/json_schema/schema"))
}

/// Decides the answer to a request body in either dialect.
pub fn think(body: &Value, dialect: Dialect) -> Answer {
    if let Some(schema) = wanted_schema(body) {
        return Answer {
            reasoning: None,
            text: Some(sample(schema, schema, 0).to_string()),
            tool: None,
        };
    }
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let last = messages.last().cloned().unwrap_or(Value::Null);
    let role = last.get("role").and_then(Value::as_str).unwrap_or("");
    let content = last.get("content").cloned().unwrap_or(Value::Null);
    let tool_result = match dialect {
        Dialect::Openai if role == "tool" => Some(texts(&content)),
        Dialect::Anthropic if role == "user" => content.as_array().and_then(|parts| {
            parts
                .iter()
                .find(|p| p.get("type").and_then(Value::as_str) == Some("tool_result"))
                .map(|p| texts(p.get("content").unwrap_or(&Value::Null)))
        }),
        _ => None,
    };
    if let Some(result) = tool_result {
        return Answer {
            reasoning: None,
            text: Some(format!("The tool said: {}", short(&result))),
            tool: None,
        };
    }
    // The user's own words: the last text part (Claude Code puts reminders before it).
    let prompt = match &content {
        Value::Array(parts) => parts
            .iter()
            .rev()
            .find_map(|p| {
                p.get("text")
                    .and_then(Value::as_str)
                    .filter(|t| !t.starts_with("<system-reminder>"))
            })
            .unwrap_or("")
            .to_owned(),
        other => texts(other),
    };
    let reasoning = prompt
        .contains("think")
        .then(|| format!("Thinking about: {}", short(&prompt)));
    if let Some(tool) = tool_request(&prompt) {
        return Answer {
            reasoning,
            text: Some(format!("I will use {}.", tool.0)),
            tool: Some(tool),
        };
    }
    Answer {
        reasoning,
        text: Some(format!(
            "Hello from the mock provider. You said: {}",
            short(&prompt)
        )),
        tool: None,
    }
}

fn words(text: &str) -> Vec<String> {
    text.split_inclusive(' ').map(str::to_owned).collect()
}

fn halves(s: &str) -> (String, String) {
    let mut mid = s.len() / 2;
    while !s.is_char_boundary(mid) {
        mid += 1;
    }
    (s[..mid].to_owned(), s[mid..].to_owned())
}

const INPUT_TOKENS: u64 = 25;

fn output_tokens(a: &Answer) -> u64 {
    let n = a.text.as_deref().map_or(0, str::len)
        + a.reasoning.as_deref().map_or(0, str::len)
        + a.tool.as_ref().map_or(0, |t| t.1.to_string().len());
    (n as u64 / 4).max(1)
}

/// A complete Anthropic `Message`.
pub fn anthropic_message(a: &Answer, model: &str) -> Value {
    let mut content = Vec::new();
    if let Some(r) = &a.reasoning {
        content.push(json!({"type": "thinking", "thinking": r, "signature": "mock-signature"}));
    }
    if let Some(t) = &a.text {
        content.push(json!({"type": "text", "text": t}));
    }
    if let Some((name, input)) = &a.tool {
        content
            .push(json!({"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": input}));
    }
    json!({"id": "msg_mock", "type": "message", "role": "assistant", "model": model, "content": content,
        "stop_reason": if a.tool.is_some() { "tool_use" } else { "end_turn" }, "stop_sequence": null,
        "usage": {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": output_tokens(a)}})
}

/// An Anthropic event stream, one event per item.
pub fn anthropic_events(a: &Answer, model: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut ev = |name: &str, data: Value| out.push(format!("event: {name}\ndata: {data}\n\n"));
    ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": INPUT_TOKENS, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    );
    let mut index = 0;
    if let Some(r) = &a.reasoning {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}),
        );
        for w in words(r) {
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "thinking_delta", "thinking": w}}),
            );
        }
        ev(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": index, "delta": {"type": "signature_delta", "signature": "mock-signature"}}),
        );
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        );
        index += 1;
    }
    if let Some(t) = &a.text {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}),
        );
        ev("ping", json!({"type": "ping"}));
        for w in words(t) {
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": w}}),
            );
        }
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        );
        index += 1;
    }
    if let Some((name, input)) = &a.tool {
        ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": "toolu_mock_1", "name": name, "input": {}}}),
        );
        let (x, y) = halves(&input.to_string());
        for piece in [x, y] {
            ev(
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": piece}}),
            );
        }
        ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        );
    }
    ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": if a.tool.is_some() { "tool_use" } else { "end_turn" }, "stop_sequence": null},
        "usage": {"output_tokens": output_tokens(a)}}),
    );
    ev("message_stop", json!({"type": "message_stop"}));
    out
}

/// A complete Chat Completions answer.
pub fn openai_message(a: &Answer, model: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": a.text.clone().unwrap_or_default()});
    if let Some(r) = &a.reasoning {
        message["reasoning_content"] = json!(r);
    }
    if let Some((name, input)) = &a.tool {
        message["tool_calls"] = json!([{"id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": input.to_string()}}]);
    }
    json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_760_000_000u64, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": if a.tool.is_some() { "tool_calls" } else { "stop" }}],
        "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": output_tokens(a), "total_tokens": INPUT_TOKENS + output_tokens(a)}})
}

/// A Chat Completions stream, one `data:` event per item, ending with `[DONE]`.
pub fn openai_events(a: &Answer, model: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut chunk = |delta: Value, finish: Option<&str>| {
        let c = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_760_000_000u64, "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        out.push(format!("data: {c}\n\n"));
    };
    chunk(json!({"role": "assistant", "content": ""}), None);
    if let Some(r) = &a.reasoning {
        for w in words(r) {
            chunk(json!({"reasoning_content": w}), None);
        }
    }
    if let Some(t) = &a.text {
        for w in words(t) {
            chunk(json!({"content": w}), None);
        }
    }
    if let Some((name, input)) = &a.tool {
        let (x, y) = halves(&input.to_string());
        chunk(
            json!({"tool_calls": [{"index": 0, "id": "call_mock_1", "type": "function", "function": {"name": name, "arguments": x}}]}),
            None,
        );
        chunk(
            json!({"tool_calls": [{"index": 0, "function": {"arguments": y}}]}),
            None,
        );
    }
    chunk(
        json!({}),
        Some(if a.tool.is_some() {
            "tool_calls"
        } else {
            "stop"
        }),
    );
    let usage = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "model": model, "choices": [],
        "usage": {"prompt_tokens": INPUT_TOKENS, "completion_tokens": output_tokens(a), "total_tokens": INPUT_TOKENS + output_tokens(a)}});
    out.push(format!("data: {usage}\n\n"));
    out.push("data: [DONE]\n\n".to_owned());
    out
}

/// The events of an answer in the request's dialect (streaming).
pub fn events(body: &Value, dialect: Dialect) -> Vec<String> {
    let a = think(body, dialect);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("mock");
    match dialect {
        Dialect::Anthropic => anthropic_events(&a, model),
        Dialect::Openai => openai_events(&a, model),
    }
}

/// The complete answer in the request's dialect (non-streaming).
pub fn message(body: &Value, dialect: Dialect) -> Value {
    let a = think(body, dialect);
    let model = body.get("model").and_then(Value::as_str).unwrap_or("mock");
    match dialect {
        Dialect::Anthropic => anthropic_message(&a, model),
        Dialect::Openai => openai_message(&a, model),
    }
}

/// An error as the first event of a 200 stream, in the dialect.
pub fn stream_error(dialect: Dialect) -> String {
    match dialect {
        Dialect::Anthropic => "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}\n\n".to_owned(),
        Dialect::Openai => "data: {\"error\":{\"message\":\"The server is overloaded\",\"type\":\"server_error\"}}\n\n".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_brain_calls_tools_quotes_results_and_thinks() {
        let ask = json!({"messages": [{"role": "user", "content": "please use the tool Bash {\"command\":\"echo hi\"} now"}]});
        let a = think(&ask, Dialect::Anthropic);
        assert_eq!(
            a.tool,
            Some(("Bash".to_owned(), json!({"command": "echo hi"})))
        );
        let result = json!({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "hi\n"}]}]});
        assert_eq!(
            think(&result, Dialect::Anthropic).text.as_deref(),
            Some("The tool said: hi")
        );
        let oa = json!({"messages": [{"role": "tool", "tool_call_id": "c", "content": "42"}]});
        assert_eq!(
            think(&oa, Dialect::Openai).text.as_deref(),
            Some("The tool said: 42")
        );
        assert!(
            think(
                &json!({"messages": [{"role": "user", "content": "think first"}]}),
                Dialect::Openai
            )
            .reasoning
            .is_some()
        );
        let schema = json!({"type": "object", "properties": {"name": {"type": "string"}, "n": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}}, "kind": {"$ref": "#/$defs/Kind"}}, "$defs": {"Kind": {"enum": ["a", "b"]}}});
        let structured = think(
            &json!({"output_config": {"format": {"type": "json_schema", "schema": schema}}, "messages": []}),
            Dialect::Anthropic,
        );
        assert_eq!(
            serde_json::from_str::<Value>(structured.text.as_deref().unwrap()).unwrap(),
            json!({"name": "mock", "n": 1, "tags": ["mock"], "kind": "a"})
        );
        assert_eq!(dialect_of("/v1/chat/completions"), Dialect::Openai);
        assert_eq!(dialect_of("/v1/messages?beta=true"), Dialect::Anthropic);
    }
}
