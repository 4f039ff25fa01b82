//! A Responses API request (`openai-front.md` §3.1-3.3) as an Anthropic Messages request, for
//! stateless use: the whole input every turn. Pure.

use serde_json::{Map, Value, json};

use super::{ResponsesContext, ToolKind, decrypt};
use crate::adapter::chat::Refusal;
use crate::adapter::chat::request::{
    History, add_cache_breakpoints, arguments, function_tool, insert_tools, is_blank, loop_open,
    object_and_model, plain_text, refuse, structured_output, thinking_or_sampling, tool_id,
    user_part,
};

/// `max_tokens` when the request names no `max_output_tokens` (Codex never does): room for a
/// large patch on every current Claude model.
pub const DEFAULT_MAX_OUTPUT_TOKENS: u64 = 32000;

/// The name of the tool a `local_shell` tool becomes.
pub const LOCAL_SHELL: &str = "local_shell";

/// A converted request: the Anthropic body, whether it streams, and what the rendering needs.
#[derive(Debug, Clone)]
pub struct Converted {
    pub body: Value,
    pub stream: bool,
    pub context: ResponsesContext,
}

/// The blocks of a message item's content (a string or parts).
fn parts(content: &Value, at: &str) -> Result<Vec<Value>, Refusal> {
    let mut out = Vec::new();
    match content {
        Value::String(s) if !is_blank(s) => out.push(json!({"type": "text", "text": s})),
        Value::Array(list) => {
            for (j, p) in list.iter().enumerate() {
                let at = format!("{at}.content[{j}]");
                match p.get("type").and_then(Value::as_str).unwrap_or("") {
                    "input_text" | "output_text" | "text" => {
                        let t = p.get("text").and_then(Value::as_str).unwrap_or("");
                        if !is_blank(t) {
                            out.push(json!({"type": "text", "text": t}));
                        }
                    }
                    "input_image" => {
                        if p.get("image_url").and_then(Value::as_str).is_none() {
                            return Err(refuse(
                                &at,
                                "file_id images cannot be resolved by this gateway: send image_url",
                            ));
                        }
                        let as_chat =
                            json!({"type": "image_url", "image_url": {"url": p["image_url"]}});
                        user_part(&as_chat, &at, &mut out)?;
                    }
                    "input_file" => {
                        let as_chat = json!({"type": "file", "file": {"file_data": p.get("file_data").cloned().unwrap_or(Value::Null)}});
                        if p.get("file_data").is_none() {
                            return Err(refuse(
                                &at,
                                "file_id and file_url cannot be resolved by this gateway: send file_data",
                            ));
                        }
                        user_part(&as_chat, &at, &mut out)?;
                    }
                    "refusal" => {
                        let t = p.get("refusal").and_then(Value::as_str).unwrap_or("");
                        if !is_blank(t) {
                            out.push(json!({"type": "text", "text": t}));
                        }
                    }
                    other => {
                        return Err(refuse(
                            &at,
                            format!("content part type {other:?} is not supported"),
                        ));
                    }
                }
            }
        }
        _ => {}
    }
    Ok(out)
}

/// The consecutive assistant-side items being gathered into one assistant turn.
#[derive(Default)]
struct Turn {
    blocks: Vec<Value>,
    calls: Vec<String>,
}

impl Turn {
    fn flush(&mut self, history: &mut History) {
        if self.blocks.is_empty() {
            return;
        }
        history.push("assistant", std::mem::take(&mut self.blocks));
        history.open_calls = std::mem::take(&mut self.calls);
    }

    fn call(&mut self, call_id: &str, name: &str, input: Value) {
        let id = tool_id(call_id);
        self.blocks
            .push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
        self.calls.push(id);
    }
}

/// Converts a Responses request body into an Anthropic Messages request body.
pub fn to_anthropic(req: &Value) -> Result<Converted, Refusal> {
    let (obj, model) = object_and_model(req)?;
    if obj
        .get("previous_response_id")
        .is_some_and(|v| !v.is_null())
    {
        return Err(refuse(
            "previous_response_id",
            "this gateway stores no responses: send the whole conversation in `input` (store: false) instead of previous_response_id",
        ));
    }
    if obj.get("conversation").is_some_and(|v| !v.is_null()) {
        return Err(refuse(
            "conversation",
            "this gateway stores no conversations: send the whole conversation in `input`",
        ));
    }
    let max_tokens = match obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        None => DEFAULT_MAX_OUTPUT_TOKENS,
        Some(v) => match v.as_u64() {
            Some(n) if n > 0 => n,
            _ => return Err(refuse("max_output_tokens", "must be a positive integer")),
        },
    };
    let stream = obj.get("stream").and_then(Value::as_bool).unwrap_or(false);

    // Tools (§3.3): functions as they are, custom tools with one string input, local_shell as a
    // tool of its own; hosted tools cannot run here and are left out.
    let mut tools = Vec::new();
    let mut kinds: Vec<(String, ToolKind)> = Vec::new();
    for (k, t) in obj
        .get("tools")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let at = format!("tools[{k}]");
        match t.get("type").and_then(Value::as_str).unwrap_or("function") {
            "function" => tools.push(function_tool(t, &at)?),
            "custom" => {
                let name = t
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse(&format!("{at}.name"), "missing"))?;
                let mut description = t
                    .get("description")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                if let Some(def) = t.pointer("/format/definition").and_then(Value::as_str) {
                    let short: String = def.chars().take(4000).collect();
                    description.push_str("\n\nThe input must follow this grammar:\n");
                    description.push_str(&short);
                }
                tools.push(json!({"name": name, "description": description,
                    "input_schema": {"type": "object", "properties": {"input": {"type": "string", "description": "the tool's whole input, as free text"}}, "required": ["input"]}}));
                kinds.push((name.to_owned(), ToolKind::Custom));
            }
            "local_shell" => {
                tools.push(json!({"name": LOCAL_SHELL, "description": "Runs a command on the user's machine and returns its output.",
                    "input_schema": {"type": "object", "properties": {
                        "command": {"type": "array", "items": {"type": "string"}, "description": "the program and its arguments"},
                        "workdir": {"type": "string"}, "timeout_ms": {"type": "integer"}}, "required": ["command"]}}));
                kinds.push((LOCAL_SHELL.to_owned(), ToolKind::LocalShell));
            }
            other => {
                tracing::debug!(
                    tool = other,
                    "a hosted tool cannot run through this gateway; left out"
                );
            }
        }
    }

    // Input items (§3.2).
    let mut system: Vec<Value> = Vec::new();
    if let Some(i) = obj
        .get("instructions")
        .and_then(Value::as_str)
        .filter(|i| !is_blank(i))
    {
        system.push(json!({"type": "text", "text": i}));
    }
    let mut history = History::default();
    let mut turn = Turn::default();
    let mut reminders: Vec<Value> = Vec::new();
    let items: Vec<Value> = match obj.get("input") {
        Some(Value::String(s)) => vec![json!({"role": "user", "content": s})],
        Some(Value::Array(a)) => a.clone(),
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(refuse("input", "must be a string or a list of items")),
    };
    for (i, item) in items.iter().enumerate() {
        let at = format!("input[{i}]");
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("message");
        let call_id = || {
            item.get("call_id")
                .or_else(|| item.get("id"))
                .and_then(Value::as_str)
                .ok_or_else(|| refuse(&format!("{at}.call_id"), "missing"))
        };
        match kind {
            "message" => {
                let role = item.get("role").and_then(Value::as_str).unwrap_or("user");
                let content = item.get("content").unwrap_or(&Value::Null);
                match role {
                    "assistant" => turn.blocks.extend(parts(content, &at)?),
                    "system" | "developer" => {
                        let text = plain_text(content);
                        if is_blank(&text) {
                            continue;
                        }
                        if history.messages.is_empty() && turn.blocks.is_empty() {
                            system.push(json!({"type": "text", "text": text}));
                        } else {
                            reminders.push(json!({"type": "text", "text": format!("<system-reminder>\n{text}\n</system-reminder>")}));
                        }
                    }
                    "user" => {
                        turn.flush(&mut history);
                        let mut blocks = std::mem::take(&mut reminders);
                        blocks.extend(parts(content, &at)?);
                        history.push("user", blocks);
                    }
                    other => {
                        return Err(refuse(
                            &format!("{at}.role"),
                            format!("unknown role {other:?}"),
                        ));
                    }
                }
            }
            "function_call" => {
                let name = item.get("name").and_then(Value::as_str).unwrap_or("");
                let args = item.get("arguments").cloned().unwrap_or(Value::Null);
                turn.call(call_id()?, name, arguments(&args));
            }
            "custom_tool_call" => {
                let name = item.get("name").and_then(Value::as_str).unwrap_or("");
                let input = item.get("input").and_then(Value::as_str).unwrap_or("");
                turn.call(call_id()?, name, json!({"input": input}));
            }
            "local_shell_call" => {
                let action = item.get("action").unwrap_or(&Value::Null);
                let mut input =
                    json!({"command": action.get("command").cloned().unwrap_or(json!([]))});
                if let Some(w) = action.get("working_directory").filter(|w| !w.is_null()) {
                    input["workdir"] = w.clone();
                }
                if let Some(t) = action.get("timeout_ms").filter(|t| !t.is_null()) {
                    input["timeout_ms"] = t.clone();
                }
                turn.call(call_id()?, LOCAL_SHELL, input);
            }
            "reasoning" => {
                // Only this gateway's own blob carries signed thinking; summaries alone cannot be
                // signed, so they are left out.
                if let Some(blocks) = item
                    .get("encrypted_content")
                    .and_then(Value::as_str)
                    .and_then(decrypt)
                {
                    turn.blocks.extend(blocks);
                }
            }
            "function_call_output" | "custom_tool_call_output" | "local_shell_call_output" => {
                turn.flush(&mut history);
                let output = match item.get("output") {
                    Some(Value::Array(list)) => {
                        Value::Array(parts(&Value::Array(list.clone()), &format!("{at}.output"))?)
                    }
                    Some(Value::String(s)) => json!(s),
                    Some(other) => json!(other.to_string()),
                    None => Value::Null,
                };
                history.tool_result(&tool_id(call_id()?), output);
            }
            "item_reference" => {
                return Err(refuse(
                    &at,
                    "this gateway stores no items: send the item itself, not a reference",
                ));
            }
            other => {
                tracing::debug!(
                    item = other,
                    "an input item with no Anthropic form; left out"
                );
            }
        }
    }
    turn.flush(&mut history);
    if !reminders.is_empty() {
        history.push("user", reminders);
    }
    if history.messages.is_empty() {
        return Err(refuse("input", "the input has no message with content"));
    }
    let messages = history.finish();

    let mut out = Map::new();
    out.insert("model".into(), json!(model));
    structured_output(
        req.pointer("/text/format/type").and_then(Value::as_str),
        req.pointer("/text/format/schema"),
        ("text.format", "text.format.schema"),
        &mut out,
        &mut system,
    )?;
    if !system.is_empty() {
        out.insert("system".into(), Value::Array(system));
    }
    // With thinking on, an open tool loop needs the last assistant turn to start with its signed
    // thinking (carried in the reasoning item's encrypted_content); without it, no thinking.
    let last_assistant_thinks = messages
        .iter()
        .rev()
        .find(|m| m["role"] == "assistant")
        .and_then(|m| m["content"].as_array())
        .and_then(|c| c.first())
        .is_some_and(|b| b["type"] == "thinking" || b["type"] == "redacted_thinking");
    let thinking_allowed = !loop_open(&messages) || last_assistant_thinks;
    out.insert("messages".into(), Value::Array(messages));
    out.insert("max_tokens".into(), json!(max_tokens));
    let choice = tool_choice(obj, &mut tools)?;
    insert_tools(obj, &mut out, tools, choice);
    let effort = req
        .pointer("/reasoning/effort")
        .and_then(Value::as_str)
        .unwrap_or("none");
    thinking_or_sampling(obj, &mut out, effort, max_tokens, thinking_allowed);
    out.insert("stream".into(), json!(stream));

    let echo_keys = [
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "temperature",
        "top_p",
        "max_output_tokens",
        "reasoning",
        "text",
        "store",
        "metadata",
        "user",
        "prompt_cache_key",
        "service_tier",
    ];
    let mut echo = Map::new();
    for k in echo_keys {
        if let Some(v) = obj.get(k) {
            echo.insert(k.to_owned(), v.clone());
        }
    }
    let mut body = Value::Object(out);
    add_cache_breakpoints(&mut body);
    Ok(Converted {
        body,
        stream,
        context: ResponsesContext {
            model: model.to_owned(),
            echo: Value::Object(echo),
            tools: kinds,
        },
    })
}

/// `tool_choice` in Anthropic's form (the Responses shapes are flat: `{type, name}`).
fn tool_choice(obj: &Map<String, Value>, tools: &mut Vec<Value>) -> Result<Option<Value>, Refusal> {
    let Some(choice) = obj.get("tool_choice").filter(|c| !c.is_null()) else {
        return Ok(None);
    };
    Ok(Some(match choice {
        Value::String(s) => match s.as_str() {
            "none" => json!({"type": "none"}),
            "auto" => json!({"type": "auto"}),
            "required" => json!({"type": "any"}),
            other => {
                return Err(refuse(
                    "tool_choice",
                    format!("unknown tool_choice {other:?}"),
                ));
            }
        },
        Value::Object(c) => match c.get("type").and_then(Value::as_str) {
            Some("function" | "custom") => {
                let name = c
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or_else(|| refuse("tool_choice.name", "missing"))?;
                json!({"type": "tool", "name": name})
            }
            Some("allowed_tools") => {
                let names: Vec<&str> = c
                    .get("tools")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t.get("name").and_then(Value::as_str))
                    .collect();
                tools.retain(|t| t["name"].as_str().is_some_and(|n| names.contains(&n)));
                match c.get("mode").and_then(Value::as_str) {
                    Some("required") => json!({"type": "any"}),
                    _ => json!({"type": "auto"}),
                }
            }
            // A hosted tool's choice: the tool is not here, the model chooses.
            _ => json!({"type": "auto"}),
        },
        _ => return Err(refuse("tool_choice", "must be a string or an object")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::responses::encrypt;

    fn convert(v: Value) -> Converted {
        to_anthropic(&v).unwrap()
    }

    #[test]
    fn a_codex_turn_groups_items_into_anthropic_turns() {
        let thinking =
            vec![json!({"type": "thinking", "thinking": "look first", "signature": "sig-1"})];
        let c = convert(
            json!({"model": "claude-x", "instructions": "You are Codex.", "stream": true, "store": false,
            "reasoning": {"effort": "medium", "summary": "auto"}, "include": ["reasoning.encrypted_content"],
            "tools": [{"type": "function", "name": "shell", "parameters": {"type": "object", "properties": {"command": {"type": "array"}}}, "strict": false},
                      {"type": "web_search"}],
            "tool_choice": "auto", "parallel_tool_calls": false, "prompt_cache_key": "conv-1",
            "input": [
                {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "sandbox: none"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "<environment_context/>"}]},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "list files"}]},
                {"type": "reasoning", "summary": [{"type": "summary_text", "text": "look first"}], "encrypted_content": encrypt(&thinking)},
                {"type": "function_call", "name": "shell", "arguments": "{\"command\":[\"ls\"]}", "call_id": "toolu_1"},
                {"type": "function_call_output", "call_id": "toolu_1", "output": "a.txt"},
            ]}),
        );
        let b = &c.body;
        assert_eq!(b["system"][0]["text"], "You are Codex.");
        assert_eq!(b["system"][1]["text"], "sandbox: none");
        let m = b["messages"].as_array().unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(
            m[0]["content"].as_array().unwrap().len(),
            2,
            "two user items, one turn"
        );
        assert_eq!(
            m[1]["content"][0], thinking[0],
            "the signed thinking comes back first"
        );
        assert_eq!(
            m[1]["content"][1],
            json!({"type": "tool_use", "id": "toolu_1", "name": "shell", "input": {"command": ["ls"]}})
        );
        assert_eq!(
            m[2]["content"][0],
            json!({"type": "tool_result", "tool_use_id": "toolu_1", "content": "a.txt", "cache_control": {"type": "ephemeral"}})
        );
        assert_eq!(b["tools"][0]["cache_control"], json!({"type": "ephemeral"}));
        assert_eq!(
            b["tools"].as_array().unwrap().len(),
            1,
            "web_search is left out"
        );
        assert_eq!(
            b["tool_choice"],
            json!({"type": "auto", "disable_parallel_tool_use": true})
        );
        assert_eq!(b["max_tokens"], DEFAULT_MAX_OUTPUT_TOKENS);
        assert_eq!(
            b["thinking"]["type"], "enabled",
            "the loop's thinking came back"
        );
        assert!(c.stream);
        assert_eq!(c.context.echo["prompt_cache_key"], "conv-1");
    }

    #[test]
    fn an_open_loop_without_its_thinking_goes_without_thinking() {
        let c = convert(
            json!({"model": "m", "reasoning": {"effort": "high"}, "input": [
            {"role": "user", "content": "go"},
            {"type": "function_call", "name": "shell", "arguments": "{}", "call_id": "c1"},
            {"type": "function_call_output", "call_id": "c1", "output": [{"type": "input_text", "text": "done"}]}]}),
        );
        assert!(c.body.get("thinking").is_none());
        assert_eq!(
            c.body["messages"][2]["content"][0]["content"],
            json!([{"type": "text", "text": "done"}])
        );
        let fresh = convert(json!({"model": "m", "reasoning": {"effort": "high"}, "input": "hi"}));
        assert_eq!(fresh.body["thinking"]["budget_tokens"], 16384);
        assert_eq!(fresh.body["messages"][0]["content"][0]["text"], "hi");
    }

    #[test]
    fn custom_and_local_shell_tools_and_their_calls() {
        let c = convert(json!({"model": "m", "tools": [
                {"type": "custom", "name": "apply_patch", "description": "Patch files.", "format": {"type": "grammar", "syntax": "lark", "definition": "start: PATCH"}},
                {"type": "local_shell"}],
            "input": [{"role": "user", "content": "go"},
                {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch"},
                {"type": "local_shell_call", "call_id": "c2", "status": "completed", "action": {"type": "exec", "command": ["ls", "-l"], "working_directory": "/w"}},
                {"type": "custom_tool_call_output", "call_id": "c1", "output": "ok"},
                {"type": "function_call_output", "call_id": "c2", "output": "total 0"}]}));
        let b = &c.body;
        assert!(
            b["tools"][0]["description"]
                .as_str()
                .unwrap()
                .contains("start: PATCH")
        );
        assert_eq!(b["tools"][1]["name"], LOCAL_SHELL);
        let calls = b["messages"][1]["content"].as_array().unwrap();
        assert_eq!(calls[0]["input"], json!({"input": "*** Begin Patch"}));
        assert_eq!(
            calls[1]["input"],
            json!({"command": ["ls", "-l"], "workdir": "/w"})
        );
        assert_eq!(b["messages"][2]["content"].as_array().unwrap().len(), 2);
        assert_eq!(
            c.context.tools,
            vec![
                ("apply_patch".to_owned(), ToolKind::Custom),
                (LOCAL_SHELL.to_owned(), ToolKind::LocalShell)
            ]
        );
    }

    #[test]
    fn what_a_stateless_gateway_cannot_do_is_refused_by_name() {
        for (field, value, param) in [
            (
                "previous_response_id",
                json!("resp_1"),
                "previous_response_id",
            ),
            ("max_output_tokens", json!(-1), "max_output_tokens"),
            (
                "input",
                json!([{"type": "item_reference", "id": "msg_1"}]),
                "input[0]",
            ),
        ] {
            let mut req = json!({"model": "m", "input": "hi"});
            req[field] = value;
            assert_eq!(
                to_anthropic(&req).unwrap_err().param.as_deref(),
                Some(param),
                "{field}"
            );
        }
    }

    #[test]
    fn text_format_becomes_structured_output() {
        let c = convert(
            json!({"model": "m", "input": "x", "text": {"format": {"type": "json_schema", "name": "o", "schema": {"type": "object"}, "strict": true}}}),
        );
        assert_eq!(
            c.body["output_config"],
            json!({"format": {"type": "json_schema", "schema": {"type": "object"}}})
        );
    }
}
