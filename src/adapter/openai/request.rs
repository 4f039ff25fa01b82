//! Anthropic request → Chat Completions request (the protocol reference's request mapping sections:
//! top level, system prompt, messages, images, tools, limits, thinking).

use serde_json::{Map, Value, json};

use super::Options;
use crate::adapter::ids::tool_id_to_upstream;
use crate::config::Dialect;

/// A request the conversion cannot express: answered with a 400 naming the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unsupported {
    pub field: String,
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Claude Code's attribution block at the start of the system prompt (dropped on translation).
const ATTRIBUTION_PREFIX: &str = "x-anthropic-billing-header:";

fn text_of(v: &Value) -> Option<&str> {
    v.get("text").and_then(Value::as_str)
}

fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// Texts of a `system` value (a string or text blocks), without the attribution block.
fn system_texts(system: &Value, out: &mut Vec<String>) {
    match system {
        Value::String(s) if !is_blank(s) => out.push(s.clone()),
        Value::Array(blocks) => {
            for b in blocks {
                if let Some(t) = text_of(b) {
                    if !is_blank(t) && !t.trim_start().starts_with(ATTRIBUTION_PREFIX) {
                        out.push(t.to_owned());
                    }
                }
            }
        }
        _ => {}
    }
}

fn image_part(block: &Value) -> Option<Value> {
    let source = block.get("source")?;
    let url = match source.get("type").and_then(Value::as_str)? {
        "base64" => format!(
            "data:{};base64,{}",
            source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("image/png"),
            source.get("data").and_then(Value::as_str).unwrap_or("")
        ),
        "url" => source.get("url").and_then(Value::as_str)?.to_owned(),
        _ => return None,
    };
    Some(json!({"type": "image_url", "image_url": {"url": url}}))
}

/// Parts for a `document` block (C.5).
fn document_parts(block: &Value, parts: &mut Vec<Value>) {
    let title = block.get("title").and_then(Value::as_str);
    let Some(source) = block.get("source") else {
        return;
    };
    match source.get("type").and_then(Value::as_str) {
        Some("base64") => {
            let media = source
                .get("media_type")
                .and_then(Value::as_str)
                .unwrap_or("application/pdf");
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            parts.push(json!({"type": "file", "file": {
                "filename": title.unwrap_or("document.pdf"),
                "file_data": format!("data:{media};base64,{data}"),
            }}));
        }
        Some("text") => {
            let data = source.get("data").and_then(Value::as_str).unwrap_or("");
            let text = match title {
                Some(t) => format!("{t}\n\n{data}"),
                None => data.to_owned(),
            };
            parts.push(json!({"type": "text", "text": text}));
        }
        Some("content") => match source.get("content") {
            Some(Value::String(s)) => parts.push(json!({"type": "text", "text": s})),
            Some(Value::Array(items)) => {
                for item in items {
                    match item.get("type").and_then(Value::as_str) {
                        Some("text") => {
                            if let Some(t) = text_of(item) {
                                parts.push(json!({"type": "text", "text": t}));
                            }
                        }
                        Some("image") => parts.extend(image_part(item)),
                        _ => {}
                    }
                }
            }
            _ => {}
        },
        Some("url") => {
            let url = source.get("url").and_then(Value::as_str).unwrap_or("");
            parts.push(
                json!({"type": "text", "text": format!("[document: {}]", title.unwrap_or(url))}),
            );
        }
        _ => {}
    }
}

/// Text for a `search_result` block.
fn search_result_text(block: &Value) -> String {
    let mut s = String::new();
    if let Some(t) = block.get("title").and_then(Value::as_str) {
        s.push_str(t);
        s.push('\n');
    }
    if let Some(src) = block.get("source").and_then(Value::as_str) {
        s.push_str(src);
        s.push('\n');
    }
    if let Some(items) = block.get("content").and_then(Value::as_array) {
        for i in items {
            if let Some(t) = text_of(i) {
                s.push_str(t);
                s.push('\n');
            }
        }
    }
    s.trim_end().to_owned()
}

/// A tool result's content as tool-message text; images and documents go to `media`.
fn tool_result_text(block: &Value, media: &mut Vec<Value>) -> String {
    let mut text = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => {
            let mut pieces: Vec<String> = Vec::new();
            for item in items {
                match item.get("type").and_then(Value::as_str) {
                    Some("text") => pieces.extend(text_of(item).map(str::to_owned)),
                    Some("image") => {
                        if let Some(p) = image_part(item) {
                            media.push(p);
                            pieces.push(format!("[image {} attached below]", media.len()));
                        }
                    }
                    Some("document") => {
                        let before = media.len();
                        document_parts(item, media);
                        if media.len() > before {
                            pieces.push(format!("[document {} attached below]", media.len()));
                        }
                    }
                    Some("search_result") => pieces.push(search_result_text(item)),
                    Some("tool_reference") => {
                        let name = item
                            .get("tool_name")
                            .or_else(|| item.get("name"))
                            .and_then(Value::as_str)
                            .unwrap_or("?");
                        pieces.push(format!("[tool reference: {name}]"));
                    }
                    _ => {}
                }
            }
            pieces.join("\n")
        }
        Some(other) => other.to_string(),
    };
    if text.is_empty() {
        text = "(no output)".to_owned();
    }
    if block.get("is_error").and_then(Value::as_bool) == Some(true) {
        text = format!("[tool error] {text}");
    }
    text
}

/// The history field that carries earlier reasoning back, per dialect (C.8.4, B.8).
fn reasoning_field(dialect: Dialect) -> Option<&'static str> {
    match dialect {
        Dialect::Openai => None,
        Dialect::Openrouter | Dialect::Vllm => Some("reasoning"),
        Dialect::Deepseek | Dialect::Generic => Some("reasoning_content"),
    }
}

struct Converter<'a> {
    opts: &'a Options,
    out: Vec<Value>,
    /// Tool-call ids (upstream form) of the last assistant message still waiting for results.
    open_calls: Vec<String>,
}

impl Converter<'_> {
    /// Closes an assistant turn whose calls got no result: synthetic tool messages (C.4.3).
    fn close_open_calls(&mut self) {
        for id in std::mem::take(&mut self.open_calls) {
            self.out.push(json!({"role": "tool", "tool_call_id": id, "content": "[no result: tool call was interrupted]"}));
        }
    }

    fn user(&mut self, content: &Value) {
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => Vec::new(),
        };
        let mut parts: Vec<Value> = Vec::new();
        let mut media: Vec<Value> = Vec::new();
        let mut orphan_texts: Vec<String> = Vec::new();
        let mut tool_messages: Vec<Value> = Vec::new();
        let mut answered: Vec<String> = Vec::new();
        for block in &blocks {
            match block.get("type").and_then(Value::as_str) {
                Some("tool_result") => {
                    let id = tool_id_to_upstream(
                        block
                            .get("tool_use_id")
                            .and_then(Value::as_str)
                            .unwrap_or(""),
                    );
                    let text = tool_result_text(block, &mut media);
                    if self.open_calls.contains(&id) && !answered.contains(&id) {
                        answered.push(id.clone());
                        tool_messages
                            .push(json!({"role": "tool", "tool_call_id": id, "content": text}));
                    } else {
                        orphan_texts.push(format!("[tool result for {id}]: {text}"));
                    }
                }
                Some("text") => {
                    if let Some(t) = text_of(block).filter(|t| !is_blank(t)) {
                        parts.push(json!({"type": "text", "text": t}));
                    }
                }
                Some("image") => parts.extend(image_part(block)),
                Some("document") => document_parts(block, &mut parts),
                Some("search_result") => {
                    parts.push(json!({"type": "text", "text": search_result_text(block)}))
                }
                _ => {
                    if let Some(t) = text_of(block).filter(|t| !is_blank(t)) {
                        parts.push(json!({"type": "text", "text": t}));
                    }
                }
            }
        }
        // Tool messages first, directly after the assistant's calls, in the calls' order.
        let open = std::mem::take(&mut self.open_calls);
        for id in &open {
            match tool_messages.iter().position(|m| m["tool_call_id"] == id.as_str()) {
                Some(i) => self.out.push(tool_messages.remove(i)),
                None => self.out.push(json!({"role": "tool", "tool_call_id": id, "content": "[no result: tool call was interrupted]"})),
            }
        }
        let mut all: Vec<Value> = orphan_texts
            .into_iter()
            .map(|t| json!({"type": "text", "text": t}))
            .collect();
        all.extend(parts);
        all.extend(media);
        if all.is_empty() {
            return;
        }
        let content = if all.len() == 1 && all[0]["type"] == "text" {
            all[0]["text"].clone()
        } else {
            Value::Array(all)
        };
        self.out.push(json!({"role": "user", "content": content}));
    }

    fn assistant(&mut self, content: &Value) {
        self.close_open_calls();
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => Vec::new(),
        };
        let mut texts: Vec<String> = Vec::new();
        let mut reasoning: Vec<String> = Vec::new();
        let mut calls: Vec<Value> = Vec::new();
        for block in &blocks {
            match block.get("type").and_then(Value::as_str) {
                Some("text") => {
                    texts.extend(text_of(block).filter(|t| !is_blank(t)).map(str::to_owned))
                }
                Some("thinking") => {
                    if let Some(t) = block
                        .get("thinking")
                        .and_then(Value::as_str)
                        .filter(|t| !t.is_empty())
                    {
                        reasoning.push(t.to_owned());
                    }
                }
                Some("tool_use") => {
                    let id =
                        tool_id_to_upstream(block.get("id").and_then(Value::as_str).unwrap_or(""));
                    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
                    let arguments = if input.is_null() {
                        "{}".to_owned()
                    } else {
                        input.to_string()
                    };
                    calls.push(json!({"id": id, "type": "function", "function": {
                        "name": block.get("name").and_then(Value::as_str).unwrap_or(""),
                        "arguments": arguments,
                    }}));
                }
                Some("server_tool_use") => {
                    let name = block
                        .get("name")
                        .and_then(Value::as_str)
                        .unwrap_or("server tool");
                    let input = block.get("input").map(Value::to_string).unwrap_or_default();
                    texts.push(format!("[{name} {input}]"));
                }
                Some(t) if t.ends_with("_tool_result") => {
                    texts.push(format!("[{t}]"));
                }
                _ => {} // redacted_thinking and anything unknown: dropped (C.8.4)
            }
        }
        if texts.is_empty() && calls.is_empty() && reasoning.is_empty() {
            return;
        }
        let mut msg = Map::new();
        msg.insert("role".into(), json!("assistant"));
        msg.insert("content".into(), json!(texts.join("\n\n")));
        if let Some(field) = reasoning_field(self.opts.dialect) {
            if !reasoning.is_empty() {
                msg.insert(field.into(), json!(reasoning.join("\n\n")));
            } else if self.opts.dialect == Dialect::Deepseek && !calls.is_empty() {
                // DeepSeek's thinking mode refuses tool-call turns without it (C.16 #29).
                msg.insert(field.into(), json!(""));
            }
        }
        if !calls.is_empty() {
            self.open_calls = calls
                .iter()
                .filter_map(|c| c["id"].as_str().map(str::to_owned))
                .collect();
            msg.insert("tool_calls".into(), Value::Array(calls));
        }
        self.out.push(Value::Object(msg));
    }
}

/// JSON-schema keywords strict backends (Gemini-style) reject (C.6).
const UNSUPPORTED_SCHEMA_KEYS: &[&str] = &[
    "$schema",
    "$id",
    "$ref",
    "$comment",
    "additionalProperties",
    "patternProperties",
    "propertyNames",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "const",
    "examples",
    "default",
    "title",
    "oneOf",
    "allOf",
    "not",
    "if",
    "then",
    "else",
];

/// Removes the keywords strict backends reject, recursively; a `type` list keeps its first non-null
/// type, and `format` is kept only for `enum` and `date-time`.
pub fn sanitize_schema(schema: &mut Value) {
    match schema {
        Value::Object(map) => {
            for key in UNSUPPORTED_SCHEMA_KEYS {
                map.remove(*key);
            }
            if map
                .get("format")
                .and_then(Value::as_str)
                .is_some_and(|f| f != "enum" && f != "date-time")
            {
                map.remove("format");
            }
            if let Some(Value::Array(types)) = map.get("type") {
                let first = types
                    .iter()
                    .find(|t| t.as_str() != Some("null"))
                    .or(types.first())
                    .cloned();
                match first {
                    Some(t) => {
                        map.insert("type".into(), t);
                    }
                    None => {
                        map.remove("type");
                    }
                }
            }
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                for v in props.values_mut() {
                    sanitize_schema(v);
                }
            }
            for key in ["items", "anyOf"] {
                if let Some(v) = map.get_mut(key) {
                    sanitize_schema(v);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sanitize_schema),
        _ => {}
    }
}

fn is_server_tool(tool: &Value) -> bool {
    tool.get("type")
        .and_then(Value::as_str)
        .is_some_and(|t| t != "custom" && t != "function")
}

/// `budget_tokens` to an effort level (C.8.1).
fn effort_for_budget(budget: u64) -> &'static str {
    if budget < 4096 {
        "low"
    } else if budget < 16384 {
        "medium"
    } else {
        "high"
    }
}

/// Converts an Anthropic Messages request into a Chat Completions request for `model`.
pub fn convert(
    body: &Value,
    model: &str,
    stream: bool,
    opts: &Options,
) -> Result<Value, Unsupported> {
    let mut out = Map::new();
    out.insert("model".into(), json!(model));

    // System prompt: system blocks, then mid-conversation system messages, folded into one (C.3).
    let mut system: Vec<String> = Vec::new();
    if let Some(s) = body.get("system") {
        system_texts(s, &mut system);
    }
    let mut conv = Converter {
        opts,
        out: Vec::new(),
        open_calls: Vec::new(),
    };
    let messages = body
        .get("messages")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or(&[]);
    for (i, m) in messages.iter().enumerate() {
        let content = m.get("content").unwrap_or(&Value::Null);
        match m.get("role").and_then(Value::as_str) {
            Some("user") => conv.user(content),
            Some("assistant") => conv.assistant(content),
            Some("system") => system_texts(content, &mut system),
            other => {
                return Err(Unsupported {
                    field: format!("messages[{i}].role"),
                    reason: format!("unknown role {:?}", other.unwrap_or("(none)")),
                });
            }
        }
    }
    conv.close_open_calls();
    let mut msgs = Vec::with_capacity(conv.out.len() + 1);
    if !system.is_empty() {
        msgs.push(json!({"role": "system", "content": system.join("\n\n")}));
    }
    msgs.extend(conv.out);
    out.insert("messages".into(), Value::Array(msgs));

    // Tools (C.6).
    let mut server_tool_names: Vec<String> = Vec::new();
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        let mut functions = Vec::with_capacity(tools.len());
        for (i, t) in tools.iter().enumerate() {
            // Loaded on demand by Anthropic's tool search: no place in Chat Completions (hygiene).
            if super::hygiene::deferred(t) {
                continue;
            }
            if is_server_tool(t) {
                let kind = t.get("type").and_then(Value::as_str).unwrap_or("");
                let name = t.get("name").and_then(Value::as_str).unwrap_or(kind);
                return Err(Unsupported {
                    field: format!("tools[{i}]"),
                    reason: format!(
                        "server tool `{name}` ({kind}) runs only on Anthropic-native providers; this route's provider is OpenAI-compatible"
                    ),
                });
            }
            let mut parameters = t
                .get("input_schema")
                .cloned()
                .unwrap_or_else(|| json!({"type": "object"}));
            if opts.sanitize_schemas {
                sanitize_schema(&mut parameters);
            }
            functions.push(json!({"type": "function", "function": {
                "name": t.get("name").and_then(Value::as_str).unwrap_or(""),
                "description": t.get("description").and_then(Value::as_str).unwrap_or(""),
                "parameters": parameters,
            }}));
            server_tool_names.clear();
        }
        if !functions.is_empty() {
            out.insert("tools".into(), Value::Array(functions));
        }
    }
    if let Some(tc) = body.get("tool_choice") {
        let disable_parallel =
            tc.get("disable_parallel_tool_use").and_then(Value::as_bool) == Some(true);
        let choice = match tc.get("type").and_then(Value::as_str) {
            Some("auto") => Some(json!("auto")),
            Some("any") => Some(json!("required")),
            Some("none") => Some(json!("none")),
            Some("tool") => {
                let name = tc.get("name").and_then(Value::as_str).unwrap_or("");
                Some(json!({"type": "function", "function": {"name": name}}))
            }
            _ => None,
        };
        if let Some(c) = choice {
            if out.contains_key("tools") {
                out.insert("tool_choice".into(), c);
                if disable_parallel {
                    out.insert("parallel_tool_calls".into(), json!(false));
                }
            }
        }
    }

    // Limits and sampling (C.2, C.7).
    if let Some(max) = body.get("max_tokens").and_then(Value::as_u64) {
        let max = opts.max_tokens_cap.map_or(max, |cap| max.min(cap));
        let key = if opts.dialect == Dialect::Openai {
            "max_completion_tokens"
        } else {
            "max_tokens"
        };
        out.insert(key.into(), json!(max));
    }
    if let Some(stops) = body.get("stop_sequences").and_then(Value::as_array) {
        let stops: Vec<Value> = stops
            .iter()
            .filter(|s| s.is_string())
            .take(4)
            .cloned()
            .collect();
        if !stops.is_empty() {
            out.insert("stop".into(), Value::Array(stops));
        }
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = body.get(key).filter(|v| v.is_number()) {
            out.insert(key.into(), v.clone());
        }
    }
    if let Some(k) = body.get("top_k").filter(|v| v.is_number()) {
        if matches!(
            opts.dialect,
            Dialect::Openrouter | Dialect::Vllm | Dialect::Generic
        ) {
            out.insert("top_k".into(), k.clone());
        }
    }
    out.insert("stream".into(), json!(stream));
    if stream {
        out.insert("stream_options".into(), json!({"include_usage": true}));
    }

    // Thinking (C.8.1).
    let thinking = body.get("thinking");
    let kind = thinking
        .and_then(|t| t.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("disabled");
    let budget = thinking
        .and_then(|t| t.get("budget_tokens"))
        .and_then(Value::as_u64);
    let effort = body
        .pointer("/output_config/effort")
        .and_then(Value::as_str);
    match opts.dialect {
        Dialect::Openrouter => {
            let reasoning = match (kind, budget, effort) {
                ("enabled", Some(b), _) => Some(json!({"max_tokens": b})),
                ("enabled" | "adaptive", _, Some(e)) => {
                    Some(json!({"effort": if e == "max" { "xhigh" } else { e }}))
                }
                ("enabled" | "adaptive", _, None) => Some(json!({"enabled": true})),
                _ => None,
            };
            if let Some(r) = reasoning {
                out.insert("reasoning".into(), r);
            }
        }
        Dialect::Deepseek => {
            let on = kind == "enabled" || kind == "adaptive";
            out.insert(
                "thinking".into(),
                json!({"type": if on { "enabled" } else { "disabled" }}),
            );
            let level = match (kind, budget, effort) {
                ("enabled", Some(b), _) => Some(effort_for_budget(b)),
                ("enabled" | "adaptive", _, Some(e)) => Some(e),
                _ => None,
            };
            if let Some(l) = level {
                out.insert("reasoning_effort".into(), json!(l));
            }
        }
        Dialect::Openai => {
            let level = match (kind, budget, effort) {
                ("enabled", Some(b), _) => Some(effort_for_budget(b)),
                ("enabled" | "adaptive", _, Some("xhigh" | "max")) => Some("high"),
                ("enabled" | "adaptive", _, Some(e)) => Some(e),
                _ => None,
            };
            if let Some(l) = level {
                out.insert("reasoning_effort".into(), json!(l));
            }
        }
        Dialect::Vllm | Dialect::Generic => {
            // Only an explicit budget asks for reasoning: Claude Code sends adaptive thinking for every
            // unknown model name, and many compatible servers reject reasoning_effort on models that
            // do not reason. Adaptive thinking leaves the model's default.
            if let ("enabled", Some(b)) = (kind, budget) {
                out.insert("reasoning_effort".into(), json!(effort_for_budget(b)));
            }
        }
    }

    // Structured output (C.2).
    if let Some(format) = body.pointer("/output_config/format") {
        if format.get("type").and_then(Value::as_str) == Some("json_schema") {
            let rf = if opts.dialect == Dialect::Deepseek {
                json!({"type": "json_object"})
            } else {
                json!({"type": "json_schema", "json_schema": {
                    "name": "output",
                    "schema": format.get("schema").cloned().unwrap_or_else(|| json!({})),
                    "strict": true,
                }})
            };
            out.insert("response_format".into(), rf);
        }
    }
    Ok(Value::Object(out))
}
