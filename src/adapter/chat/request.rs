//! A Chat Completions request (the OpenAI front end) as an Anthropic Messages request
//! (`openai-front.md` §2.1-2.4). Pure: a JSON value in, a JSON value or a refusal out.

use base64::Engine as _;
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::Refusal;
use crate::adapter::ids::{tool_id_from_upstream, valid_anthropic_id};

/// What the conversion needs beyond the request.
#[derive(Debug, Clone, Copy)]
pub struct FrontOptions {
    /// `max_tokens` when the client sets neither `max_completion_tokens` nor `max_tokens`
    /// (Anthropic requires one).
    pub default_max_tokens: u64,
}

impl Default for FrontOptions {
    fn default() -> Self {
        Self {
            default_max_tokens: DEFAULT_MAX_TOKENS,
        }
    }
}

/// The output budget of a request that names none: what every current Claude model can give.
pub const DEFAULT_MAX_TOKENS: u64 = 8192;

/// The smallest thinking budget Anthropic accepts.
const MIN_THINKING_BUDGET: u64 = 1024;

/// A converted request: the Anthropic body and what the answer's rendering needs to know.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    pub body: Value,
    pub stream: bool,
    /// `stream_options.include_usage`: the stream ends with a usage chunk.
    pub include_usage: bool,
}

pub(crate) fn refuse(param: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        message: message.into(),
        param: Some(param.to_owned()),
    }
}

pub(crate) fn is_blank(s: &str) -> bool {
    s.trim().is_empty()
}

/// The thinking budget for a `reasoning_effort`, within `max_tokens` (OpenAI counts reasoning in
/// the completion's budget, so at least [`MIN_VISIBLE_TOKENS`] are left for the answer): `None`
/// for no thinking. Each level's budget reads as the same level again where a budget is turned
/// back into an effort (an openai-type provider behind an Anthropic request).
pub(crate) fn thinking_budget(effort: &str, max_tokens: u64) -> Option<u64> {
    let wanted = match effort {
        "low" => 2048,
        "medium" => 8192,
        "high" => 16384,
        "xhigh" | "max" => 32000,
        _ => return None,
    };
    let budget = wanted.min(max_tokens.saturating_sub(MIN_VISIBLE_TOKENS));
    (budget >= MIN_THINKING_BUDGET).then_some(budget)
}

/// What a thinking budget leaves, at least, for the visible answer.
const MIN_VISIBLE_TOKENS: u64 = 1024;

/// A tool-call id as Anthropic accepts it (kept when valid, encoded reversibly otherwise); the
/// same function for `tool_calls[].id` and `tool_call_id`, so the pair still matches.
pub(crate) fn tool_id(id: &str) -> String {
    if valid_anthropic_id(id) {
        id.to_owned()
    } else {
        tool_id_from_upstream(Some(id))
    }
}

/// Prompt-cache breakpoints an OpenAI client cannot write (OpenAI caches prompts by itself):
/// the last system block, the last tool and the last block of the last turn, so each request
/// reads the cache the one before wrote.
pub(crate) fn add_cache_breakpoints(body: &mut Value) {
    let ephemeral = || json!({"type": "ephemeral"});
    if let Some(last) = body
        .get_mut("system")
        .and_then(Value::as_array_mut)
        .and_then(|s| s.last_mut())
    {
        last["cache_control"] = ephemeral();
    }
    if let Some(last) = body
        .get_mut("tools")
        .and_then(Value::as_array_mut)
        .and_then(|t| t.last_mut())
    {
        last["cache_control"] = ephemeral();
    }
    if let Some(last) = body
        .get_mut("messages")
        .and_then(Value::as_array_mut)
        .and_then(|m| m.last_mut())
        .and_then(|m| m.get_mut("content"))
        .and_then(Value::as_array_mut)
        .and_then(|c| c.last_mut())
    {
        if matches!(
            last["type"].as_str(),
            Some("text" | "image" | "tool_result" | "document")
        ) {
            last["cache_control"] = ephemeral();
        }
    }
}

/// A `data:` URL's media type and base64 payload.
fn data_url(url: &str) -> Option<(&str, &str)> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    let media = meta.strip_suffix(";base64")?;
    Some((media, data))
}

const IMAGE_TYPES: [&str; 4] = ["image/jpeg", "image/png", "image/gif", "image/webp"];

/// One content part of a user (or system) message as Anthropic blocks.
pub(crate) fn user_part(part: &Value, at: &str, out: &mut Vec<Value>) -> Result<(), Refusal> {
    match part.get("type").and_then(Value::as_str).unwrap_or("") {
        "text" | "input_text" => {
            let text = part.get("text").and_then(Value::as_str).unwrap_or("");
            if !is_blank(text) {
                out.push(json!({"type": "text", "text": text}));
            }
        }
        "image_url" => {
            let url = part
                .pointer("/image_url/url")
                .or_else(|| part.get("image_url"))
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(at, "image_url.url is missing"))?;
            out.push(image_block(url, at)?);
        }
        "input_audio" => {
            return Err(refuse(
                at,
                "audio input is not supported by this model's provider",
            ));
        }
        "file" => {
            let file = part.get("file").unwrap_or(&Value::Null);
            let Some(data) = file.get("file_data").and_then(Value::as_str) else {
                return Err(refuse(
                    at,
                    "file_id cannot be resolved by this gateway: send the file inline as file_data",
                ));
            };
            let (media, payload) = data_url(data).unwrap_or(("application/pdf", data));
            if media != "application/pdf" {
                return Err(refuse(
                    at,
                    format!("files of type {media} are not supported; only PDF documents"),
                ));
            }
            out.push(json!({"type": "document", "source": {"type": "base64", "media_type": media, "data": payload}}));
        }
        "refusal" => {
            if let Some(t) = part.get("refusal").and_then(Value::as_str) {
                if !is_blank(t) {
                    out.push(json!({"type": "text", "text": t}));
                }
            }
        }
        other => {
            return Err(refuse(
                at,
                format!("content part type {other:?} is not supported"),
            ));
        }
    }
    Ok(())
}

fn image_block(url: &str, at: &str) -> Result<Value, Refusal> {
    if let Some((media, data)) = data_url(url) {
        if !IMAGE_TYPES.contains(&media) {
            return Err(refuse(
                at,
                format!("image type {media} is not supported (jpeg, png, gif or webp)"),
            ));
        }
        if base64::engine::general_purpose::STANDARD
            .decode(data.as_bytes())
            .is_err()
        {
            return Err(refuse(at, "the image's data URL is not valid base64"));
        }
        return Ok(
            json!({"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}),
        );
    }
    if url.starts_with("https://") || url.starts_with("http://") {
        return Ok(json!({"type": "image", "source": {"type": "url", "url": url}}));
    }
    Err(refuse(at, "an image must be a data: URL or an http(s) URL"))
}

/// The blocks of a message's `content` (a string or parts).
fn content_blocks(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    let mut out = Vec::new();
    match content {
        Value::Null => {}
        Value::String(s) => {
            if !is_blank(s) {
                out.push(json!({"type": "text", "text": s}));
            }
        }
        Value::Array(parts) => {
            for (j, part) in parts.iter().enumerate() {
                user_part(part, &format!("{at}.content[{j}]"), &mut out)?;
            }
        }
        _ => {
            return Err(refuse(
                &format!("{at}.content"),
                "must be a string or a list of parts",
            ));
        }
    }
    Ok(out)
}

/// The plain text of a message's content (system messages, tool results).
pub(crate) fn plain_text(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .filter_map(|p| p.get("text").and_then(Value::as_str))
            .collect::<Vec<_>>()
            .join("\n"),
        _ => String::new(),
    }
}

/// Builds the Anthropic message list: merges same-role turns, puts tool results first.
#[derive(Default)]
pub(crate) struct History {
    pub(crate) messages: Vec<Value>,
    /// The tool_use ids of the last assistant turn still waiting for their results.
    pub(crate) open_calls: Vec<String>,
}

impl History {
    pub(crate) fn push(&mut self, role: &str, blocks: Vec<Value>) {
        if blocks.is_empty() {
            return;
        }
        // A new turn after unanswered calls: the calls are closed first, so their results lead.
        self.close_open_calls();
        self.append(role, blocks);
    }

    /// Adds blocks to the conversation, merged into the last turn when it has the same role.
    fn append(&mut self, role: &str, blocks: Vec<Value>) {
        if let Some(last) = self.messages.last_mut() {
            if last["role"] == role {
                if let Some(content) = last["content"].as_array_mut() {
                    content.extend(blocks);
                    return;
                }
            }
        }
        self.messages
            .push(json!({"role": role, "content": Value::Array(blocks)}));
    }

    /// A tool result for an open call goes first in the user turn after the call; one for no
    /// open call becomes text (Anthropic rejects an orphan `tool_result`).
    pub(crate) fn tool_result(&mut self, id: &str, content: Value) {
        let content = match content {
            Value::String(s) if is_blank(&s) => json!("(empty result)"),
            Value::Array(a) if a.is_empty() => json!("(empty result)"),
            Value::Null => json!("(empty result)"),
            other => other,
        };
        let Some(at) = self.open_calls.iter().position(|c| c == id) else {
            let text = match &content {
                Value::String(s) => s.clone(),
                other => plain_text(other),
            };
            self.append(
                "user",
                vec![json!({"type": "text", "text": format!("[tool result for {id}]: {text}")})],
            );
            return;
        };
        self.open_calls.remove(at);
        let block = json!({"type": "tool_result", "tool_use_id": id, "content": content});
        match self.messages.last_mut() {
            Some(last) if last["role"] == "user" => {
                if let Some(content) = last["content"].as_array_mut() {
                    // After the results already there, before any text.
                    let first_other = content
                        .iter()
                        .position(|b| b["type"] != "tool_result")
                        .unwrap_or(content.len());
                    content.insert(first_other, block);
                }
            }
            _ => self
                .messages
                .push(json!({"role": "user", "content": [block]})),
        }
    }

    /// Calls the client never answered (it was interrupted): answered with a note, as Anthropic
    /// requires a result for every call in the next user turn.
    pub(crate) fn close_open_calls(&mut self) {
        for id in std::mem::take(&mut self.open_calls) {
            self.open_calls.push(id.clone());
            self.tool_result(&id, json!("[no result: tool call was interrupted]"));
        }
    }
}

impl History {
    /// The conversation as Anthropic takes it: begun by the user, and the calls of a final
    /// assistant turn (a prefill the client left open) closed.
    pub(crate) fn finish(mut self) -> Vec<Value> {
        if self.messages.first().is_some_and(|m| m["role"] != "user") {
            self.messages.insert(
                0,
                json!({"role": "user", "content": [{"type": "text", "text": "(continue)"}]}),
            );
        }
        if self
            .messages
            .last()
            .is_some_and(|m| m["role"] == "assistant")
            && !self.open_calls.is_empty()
        {
            self.close_open_calls();
        }
        self.messages
    }
}

/// Structured output of either OpenAI API: a JSON schema becomes Anthropic's
/// `output_config.format`, `json_object` an instruction in the system prompt. `at` names the
/// format's field and `schema_at` its schema's, for a refusal.
pub(crate) fn structured_output(
    kind: Option<&str>,
    schema: Option<&Value>,
    (at, schema_at): (&str, &str),
    out: &mut Map<String, Value>,
    system: &mut Vec<Value>,
) -> Result<(), Refusal> {
    match kind {
        Some("json_schema") => {
            let schema = schema
                .cloned()
                .ok_or_else(|| refuse(schema_at, "a json_schema format needs a schema"))?;
            out.insert(
                "output_config".into(),
                json!({"format": {"type": "json_schema", "schema": schema}}),
            );
        }
        Some("json_object") => system.push(
            json!({"type": "text", "text": "Reply with one JSON object only, and nothing else."}),
        ),
        Some("text") | None => {}
        Some(other) => {
            return Err(refuse(
                &format!("{at}.type"),
                format!("unknown format {other:?}"),
            ));
        }
    }
    Ok(())
}

/// The tools and tool choice, with `parallel_tool_calls: false` as Anthropic's
/// `disable_parallel_tool_use` (which `none` does not take).
pub(crate) fn insert_tools(
    obj: &Map<String, Value>,
    out: &mut Map<String, Value>,
    tools: Vec<Value>,
    mut choice: Option<Value>,
) {
    if tools.is_empty() {
        return;
    }
    if obj.get("parallel_tool_calls").and_then(Value::as_bool) == Some(false) {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = json!(true);
        }
    }
    out.insert("tools".into(), Value::Array(tools));
    if let Some(c) = choice {
        out.insert("tool_choice".into(), c);
    }
}

/// Thinking for a reasoning `effort` when `allowed` and no tool is forced (manual thinking does
/// not take a forced tool), else the client's sampling parameters (thinking takes none).
pub(crate) fn thinking_or_sampling(
    obj: &Map<String, Value>,
    out: &mut Map<String, Value>,
    effort: &str,
    max_tokens: u64,
    allowed: bool,
) {
    let forced = out
        .get("tool_choice")
        .is_some_and(|c| c["type"] == "any" || c["type"] == "tool");
    match (!forced && allowed)
        .then(|| thinking_budget(effort, max_tokens))
        .flatten()
    {
        Some(b) => {
            out.insert(
                "thinking".into(),
                json!({"type": "enabled", "budget_tokens": b}),
            );
        }
        None => {
            if let Some(t) = obj.get("temperature").and_then(Value::as_f64) {
                out.insert("temperature".into(), json!(t.clamp(0.0, 1.0)));
            }
            if let Some(p) = obj.get("top_p").and_then(Value::as_f64) {
                out.insert("top_p".into(), json!(p));
            }
        }
    }
}

/// Whether the conversation ends in an open tool loop (tool results the model has not answered).
pub(crate) fn loop_open(messages: &[Value]) -> bool {
    messages
        .last()
        .and_then(|m| m["content"].as_array())
        .and_then(|c| c.first())
        .is_some_and(|b| b["type"] == "tool_result")
}

/// A request body's members and its model name, or the refusal of a body without them.
pub(crate) fn object_and_model(req: &Value) -> Result<(&Map<String, Value>, &str), Refusal> {
    let Some(obj) = req.as_object() else {
        return Err(Refusal {
            message: "the request body must be a JSON object".into(),
            param: None,
        });
    };
    let model = obj
        .get("model")
        .and_then(Value::as_str)
        .filter(|m| !is_blank(m))
        .ok_or_else(|| refuse("model", "you must provide a model parameter"))?;
    Ok((obj, model))
}

/// Converts a Chat Completions request body into an Anthropic Messages request body.
pub fn to_anthropic(req: &Value, opts: &FrontOptions) -> Result<Converted, Refusal> {
    let (obj, model) = object_and_model(req)?;
    let Some(messages) = obj.get("messages").and_then(Value::as_array) else {
        return Err(refuse("messages", "messages must be a list of messages"));
    };
    if messages.is_empty() {
        return Err(refuse("messages", "messages must not be empty"));
    }

    // What cannot be expressed.
    if let Some(n) = obj.get("n").filter(|n| !n.is_null()) {
        if n.as_u64() != Some(1) {
            return Err(refuse(
                "n",
                "only n = 1 is supported: one choice per request",
            ));
        }
    }
    if obj.get("logprobs").and_then(Value::as_bool) == Some(true) {
        return Err(refuse(
            "logprobs",
            "logprobs are not available for this model",
        ));
    }
    if obj
        .get("top_logprobs")
        .and_then(Value::as_u64)
        .is_some_and(|n| n > 0)
    {
        return Err(refuse(
            "top_logprobs",
            "logprobs are not available for this model",
        ));
    }
    let audio_out = obj.get("audio").is_some_and(|a| !a.is_null())
        || obj
            .get("modalities")
            .and_then(Value::as_array)
            .is_some_and(|m| m.iter().any(|x| x == "audio"));
    if audio_out {
        return Err(refuse("audio", "audio output is not supported"));
    }

    let max_tokens = match obj
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| obj.get("max_tokens").filter(|v| !v.is_null()))
    {
        None => opts.default_max_tokens,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => n,
            _ => {
                let param = if obj
                    .get("max_completion_tokens")
                    .is_some_and(|v| !v.is_null())
                {
                    "max_completion_tokens"
                } else {
                    "max_tokens"
                };
                return Err(refuse(param, "must be a positive integer"));
            }
        },
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let include_usage = stream
        && req
            .pointer("/stream_options/include_usage")
            .and_then(Value::as_bool)
            .unwrap_or(false);

    let mut out = Map::new();
    out.insert("model".into(), json!(model));

    // Messages (§2.2).
    let mut system: Vec<Value> = Vec::new();
    let mut history = History::default();
    // System text that arrives mid-conversation, carried into the next user turn.
    let mut reminders: Vec<Value> = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        match role {
            "system" | "developer" => {
                let text = plain_text(content);
                if is_blank(&text) {
                    continue;
                }
                if history.messages.is_empty() {
                    system.push(json!({"type": "text", "text": text}));
                } else {
                    reminders.push(json!({"type": "text", "text": format!("<system-reminder>\n{text}\n</system-reminder>")}));
                }
            }
            "user" => {
                let mut blocks = std::mem::take(&mut reminders);
                blocks.extend(content_blocks(content, &at)?);
                history.push("user", blocks);
            }
            "assistant" => {
                if !reminders.is_empty() {
                    let r = std::mem::take(&mut reminders);
                    history.push("user", r);
                }
                let mut blocks = content_blocks(content, &at)?;
                let mut calls = Vec::new();
                if let Some(tool_calls) = m.get("tool_calls").and_then(Value::as_array) {
                    for (k, call) in tool_calls.iter().enumerate() {
                        let id = call.get("id").and_then(Value::as_str).ok_or_else(|| {
                            refuse(&format!("{at}.tool_calls[{k}].id"), "missing")
                        })?;
                        let name = call
                            .pointer("/function/name")
                            .or_else(|| call.pointer("/custom/name"))
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        let args = call
                            .pointer("/function/arguments")
                            .or_else(|| call.pointer("/custom/input"))
                            .cloned()
                            .unwrap_or(Value::Null);
                        calls.push((tool_id(id), name.to_owned(), arguments(&args)));
                    }
                } else if let Some(fc) = m.get("function_call") {
                    let name = fc.get("name").and_then(Value::as_str).unwrap_or("");
                    let args = fc.get("arguments").cloned().unwrap_or(Value::Null);
                    calls.push((legacy_id(name), name.to_owned(), arguments(&args)));
                }
                for (id, name, input) in &calls {
                    blocks
                        .push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
                }
                history.push("assistant", blocks);
                history.open_calls = calls.into_iter().map(|(id, _, _)| id).collect();
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse(&format!("{at}.tool_call_id"), "missing"))?;
                history.tool_result(&tool_id(id), json!(plain_text(content)));
            }
            "function" => {
                let name = m.get("name").and_then(Value::as_str).unwrap_or("");
                history.tool_result(&legacy_id(name), json!(plain_text(content)));
            }
            other => {
                return Err(refuse(
                    &format!("{at}.role"),
                    format!("unknown role {other:?}"),
                ));
            }
        }
    }
    if !reminders.is_empty() {
        history.push("user", reminders);
    }
    if history.messages.is_empty() {
        return Err(refuse(
            "messages",
            "the conversation has no user or assistant message with content",
        ));
    }
    // Structured output (§2.1 response_format).
    structured_output(
        req.pointer("/response_format/type").and_then(Value::as_str),
        req.pointer("/response_format/json_schema/schema"),
        ("response_format", "response_format.json_schema.schema"),
        &mut out,
        &mut system,
    )?;
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    let messages = history.finish();
    let loop_open = loop_open(&messages);
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(max_tokens));

    // Tools (§2.3).
    let mut tools = Vec::new();
    let listed = obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate();
    for (k, t) in listed {
        let f = match t.get("type").and_then(Value::as_str) {
            Some("function") | None => t.get("function").unwrap_or(t),
            Some("custom") => {
                let c = t.get("custom").unwrap_or(t);
                let name = c.get("name").and_then(Value::as_str).unwrap_or("");
                tools.push(json!({"name": name, "description": c.get("description").and_then(Value::as_str).unwrap_or(""),
                    "input_schema": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}));
                continue;
            }
            Some(other) => {
                return Err(refuse(
                    &format!("tools[{k}].type"),
                    format!("tool type {other:?} is not supported"),
                ));
            }
        };
        tools.push(function_tool(f, &format!("tools[{k}]"))?);
    }
    for (k, f) in obj
        .get("functions")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        tools.push(function_tool(f, &format!("functions[{k}]"))?);
    }
    let choice = tool_choice(obj, &mut tools)?;
    insert_tools(obj, &mut out, tools, choice);

    // Sampling, stops, thinking. With thinking on, an open tool loop needs the turn's signed
    // thinking, which a Chat Completions client never sends back: such a request goes without.
    let effort = obj
        .get("reasoning_effort")
        .and_then(Value::as_str)
        .unwrap_or("none");
    thinking_or_sampling(obj, &mut out, effort, max_tokens, !loop_open);
    let stops: Vec<Value> = match obj.get("stop") {
        Some(Value::String(s)) => vec![json!(s)],
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    let stops: Vec<Value> = stops
        .into_iter()
        .filter(|s| s.as_str().is_some_and(|s| !is_blank(s)))
        .collect();
    if !stops.is_empty() {
        out.insert("stop_sequences".into(), Value::Array(stops));
    }
    if let Some(user) = obj
        .get("user")
        .or_else(|| obj.get("safety_identifier"))
        .and_then(Value::as_str)
        .filter(|u| !u.is_empty())
    {
        // Anthropic's user_id must be opaque: a hash of the client's value.
        let digest = Sha256::digest(user.as_bytes());
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        out.insert("metadata".into(), json!({"user_id": hex}));
    }
    out.insert("stream".into(), json!(stream));
    let mut body = Value::Object(out);
    add_cache_breakpoints(&mut body);
    Ok(Converted {
        body,
        stream,
        include_usage,
    })
}

/// A tool call's `arguments` (a JSON string, or already an object) as the tool_use input.
pub(crate) fn arguments(args: &Value) -> Value {
    match args {
        Value::String(s) if is_blank(s) => json!({}),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(v @ Value::Object(_)) => v,
            // Not an object: kept whole, so nothing the model wrote is lost.
            _ => json!({"input": s}),
        },
        Value::Object(_) => args.clone(),
        Value::Null => json!({}),
        other => json!({"input": other}),
    }
}

/// The id a legacy `function_call` and its `function` result share.
fn legacy_id(name: &str) -> String {
    tool_id(&format!("call_{name}"))
}

pub(crate) fn function_tool(f: &Value, at: &str) -> Result<Value, Refusal> {
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| refuse(&format!("{at}.function.name"), "missing"))?;
    let mut tool = json!({"name": name});
    if let Some(d) = f.get("description").and_then(Value::as_str) {
        tool["description"] = json!(d);
    }
    tool["input_schema"] = match f.get("parameters") {
        Some(p @ Value::Object(_)) => p.clone(),
        _ => json!({"type": "object", "properties": {}}),
    };
    Ok(tool)
}

/// `tool_choice` (or the legacy `function_call`) in Anthropic's form; `allowed_tools` narrows
/// `tools` to its list.
fn tool_choice(obj: &Map<String, Value>, tools: &mut Vec<Value>) -> Result<Option<Value>, Refusal> {
    let choice = obj
        .get("tool_choice")
        .filter(|c| !c.is_null())
        .or_else(|| obj.get("function_call").filter(|c| !c.is_null()));
    let Some(choice) = choice else {
        return Ok(None);
    };
    Ok(Some(match choice {
        Value::String(s) => match s.as_str() {
            "none" => json!({"type": "none"}),
            "auto" => json!({"type": "auto"}),
            "required" | "any" => json!({"type": "any"}),
            other => {
                return Err(refuse(
                    "tool_choice",
                    format!("unknown tool_choice {other:?}"),
                ));
            }
        },
        Value::Object(c) => match c.get("type").and_then(Value::as_str) {
            Some("function") | None => {
                let name = c
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .or_else(|| c.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse("tool_choice.function.name", "missing"))?;
                json!({"type": "tool", "name": name})
            }
            Some("custom") => {
                let name = c
                    .get("custom")
                    .and_then(|x| x.get("name"))
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse("tool_choice.custom.name", "missing"))?;
                json!({"type": "tool", "name": name})
            }
            Some("allowed_tools") => {
                let spec = c.get("allowed_tools").unwrap_or(&Value::Null);
                let names: Vec<&str> = spec
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|t| {
                        t.pointer("/function/name")
                            .or_else(|| t.get("name"))
                            .and_then(Value::as_str)
                    })
                    .collect();
                tools.retain(|t| t["name"].as_str().is_some_and(|n| names.contains(&n)));
                match spec.get("mode").and_then(Value::as_str) {
                    Some("required") => json!({"type": "any"}),
                    _ => json!({"type": "auto"}),
                }
            }
            Some(other) => {
                return Err(refuse(
                    "tool_choice.type",
                    format!("unknown tool_choice type {other:?}"),
                ));
            }
        },
        _ => return Err(refuse("tool_choice", "must be a string or an object")),
    }))
}

/// The Anthropic request bytes of a converted request.
pub fn to_bytes(converted: &Converted) -> bytes::Bytes {
    bytes::Bytes::from(serde_json::to_vec(&converted.body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn convert(v: Value) -> Value {
        to_anthropic(&v, &FrontOptions::default()).unwrap().body
    }

    fn refusal(v: Value) -> Refusal {
        to_anthropic(&v, &FrontOptions::default()).unwrap_err()
    }

    #[test]
    fn system_and_developer_lead_later_ones_become_reminders() {
        let b = convert(json!({"model": "m", "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "developer", "content": [{"type": "text", "text": "use tools"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "system", "content": "now formal"},
            {"role": "user", "content": "again"},
        ]}));
        assert_eq!(
            b["system"],
            json!([{"type": "text", "text": "be brief"}, {"type": "text", "text": "use tools", "cache_control": {"type": "ephemeral"}}]),
            "the last system block is a cache breakpoint"
        );
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[2]["content"][1]["cache_control"],
            json!({"type": "ephemeral"}),
            "so is the last turn's last block"
        );
        assert!(m[2]["content"][0].get("cache_control").is_none());
        assert_eq!(
            m[2]["content"][0]["text"],
            "<system-reminder>\nnow formal\n</system-reminder>"
        );
        assert_eq!(m[2]["content"][1]["text"], "again");
        assert_eq!(b["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(b["stream"], false);
    }

    #[test]
    fn parallel_tool_calls_and_their_results_make_one_user_turn_results_first() {
        let b = convert(json!({"model": "m", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "content": null, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "a", "arguments": "{\"x\":1}"}},
                {"id": "call.2", "type": "function", "function": {"name": "b", "arguments": ""}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "one"},
            {"role": "tool", "tool_call_id": "call.2", "content": [{"type": "text", "text": "two"}]},
            {"role": "user", "content": "and?"},
        ], "tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}}, {"type": "function", "function": {"name": "b"}}],
           "tool_choice": "required", "parallel_tool_calls": false}));
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3);
        let calls = m[1]["content"].as_array().unwrap();
        assert_eq!(
            calls[0],
            json!({"type": "tool_use", "id": "call_1", "name": "a", "input": {"x": 1}})
        );
        let encoded = calls[1]["id"].as_str().unwrap();
        assert!(valid_anthropic_id(encoded), "{encoded}");
        assert_eq!(calls[1]["input"], json!({}));
        let user = m[2]["content"].as_array().unwrap();
        assert_eq!(
            user[0],
            json!({"type": "tool_result", "tool_use_id": "call_1", "content": "one"})
        );
        assert_eq!(user[1]["tool_use_id"], encoded);
        assert_eq!(user[1]["content"], "two");
        assert_eq!(user[2]["text"], "and?");
        assert_eq!(
            b["tools"][1]["input_schema"],
            json!({"type": "object", "properties": {}})
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn an_interrupted_call_gets_a_result_and_an_orphan_result_becomes_text() {
        let b = convert(json!({"model": "m", "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}}]},
            {"role": "user", "content": "stop that"},
            {"role": "tool", "tool_call_id": "zz", "content": "late"},
        ]}));
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        let user = m[2]["content"].as_array().unwrap();
        assert_eq!(user[0]["type"], "tool_result");
        assert_eq!(user[0]["tool_use_id"], "c1");
        assert_eq!(user[1]["text"], "stop that");
        assert_eq!(user[2]["text"], "[tool result for zz]: late");
    }

    #[test]
    fn images_documents_and_what_cannot_be_sent() {
        let b = convert(
            json!({"model": "m", "messages": [{"role": "user", "content": [
                {"type": "text", "text": "see"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}},
                {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "a.pdf"}},
            ]}]}),
        );
        let c = &b["messages"][0]["content"];
        assert_eq!(
            c[1],
            json!({"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}})
        );
        assert_eq!(
            c[2],
            json!({"type": "image", "source": {"type": "url", "url": "https://example.com/a.jpg"}})
        );
        assert_eq!(c[3]["type"], "document");
        let r = refusal(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/tiff;base64,AAAA"}}]}]}),
        );
        assert_eq!(r.param.as_deref(), Some("messages[0].content[0]"));
        let r = refusal(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}),
        );
        assert!(r.message.contains("audio"), "{r:?}");
        let r = refusal(
            json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}]}),
        );
        assert!(r.message.contains("file_id"), "{r:?}");
    }

    #[test]
    fn n_logprobs_and_audio_are_refused_naming_the_parameter() {
        let base = || json!({"model": "m", "messages": [{"role": "user", "content": "x"}]});
        for (field, value, param) in [
            ("n", json!(2), "n"),
            ("logprobs", json!(true), "logprobs"),
            ("top_logprobs", json!(3), "top_logprobs"),
            ("modalities", json!(["text", "audio"]), "audio"),
            ("audio", json!({"voice": "x"}), "audio"),
            ("max_tokens", json!(0), "max_tokens"),
            (
                "max_completion_tokens",
                json!("many"),
                "max_completion_tokens",
            ),
        ] {
            let mut req = base();
            req[field] = value;
            assert_eq!(refusal(req).param.as_deref(), Some(param), "{field}");
        }
        let mut ok = base();
        ok["n"] = json!(1);
        ok["logprobs"] = json!(false);
        assert!(to_anthropic(&ok, &FrontOptions::default()).is_ok());
        assert_eq!(
            refusal(json!({"messages": []})).param.as_deref(),
            Some("model")
        );
        assert_eq!(
            refusal(json!({"model": "m", "messages": []}))
                .param
                .as_deref(),
            Some("messages")
        );
    }

    #[test]
    fn limits_stops_sampling_user_and_response_format() {
        let b = convert(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 10, "max_completion_tokens": 300, "stop": ["END", " ", "\n\n##"], "temperature": 1.7, "top_p": 0.9,
            "user": "alice@example.com", "stream": true, "stream_options": {"include_usage": true},
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}, "strict": true}}}),
        );
        assert_eq!(b["max_tokens"], 300);
        assert_eq!(b["stop_sequences"], json!(["END", "\n\n##"]));
        assert_eq!(b["temperature"], 1.0);
        assert_eq!(b["top_p"], 0.9);
        let user_id = b["metadata"]["user_id"].as_str().unwrap();
        assert_eq!(user_id.len(), 32);
        assert!(!user_id.contains("alice"));
        assert_eq!(
            b["output_config"],
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}})
        );
        let c = to_anthropic(&json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": true, "stream_options": {"include_usage": true}}), &FrontOptions::default()).unwrap();
        assert!(c.stream && c.include_usage);
        let j = convert(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}}),
        );
        assert!(j["system"][0]["text"].as_str().unwrap().contains("JSON"));
    }

    #[test]
    fn reasoning_effort_becomes_a_thinking_budget_within_max_tokens() {
        let req = |effort: &str, max: u64| json!({"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": effort, "max_tokens": max, "temperature": 0.2});
        let b = convert(req("high", 64000));
        assert_eq!(
            b["thinking"],
            json!({"type": "enabled", "budget_tokens": 16384})
        );
        assert!(
            b.get("temperature").is_none(),
            "thinking takes no temperature"
        );
        assert_eq!(convert(req("low", 3000))["thinking"]["budget_tokens"], 1976);
        assert!(
            convert(req("high", 2000)).get("thinking").is_none(),
            "no room for the smallest budget"
        );
        assert!(convert(req("minimal", 64000)).get("thinking").is_none());
        // A forced tool and an open tool loop go without thinking.
        let mut forced = req("high", 64000);
        forced["tools"] = json!([{"type": "function", "function": {"name": "a"}}]);
        forced["tool_choice"] = json!({"type": "function", "function": {"name": "a"}});
        let f = convert(forced);
        assert!(f.get("thinking").is_none());
        assert_eq!(f["tool_choice"], json!({"type": "tool", "name": "a"}));
        let open = json!({"model": "m", "reasoning_effort": "high", "max_tokens": 64000, "messages": [
            {"role": "user", "content": "go"},
            {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "a", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "done"}]});
        assert!(convert(open).get("thinking").is_none());
    }

    #[test]
    fn allowed_tools_narrow_the_list() {
        let b = convert(
            json!({"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "b"}}],
            "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [{"type": "function", "function": {"name": "b"}}]}}}),
        );
        assert_eq!(b["tools"].as_array().unwrap().len(), 1);
        assert_eq!(b["tools"][0]["name"], "b");
        assert_eq!(b["tool_choice"], json!({"type": "any"}));
    }
}
