//! Anthropic events as Responses API events (`openai-front.md` §3.5), in the order the official
//! SDK's accumulator and Codex accept: `response.created` then `response.in_progress` first; a
//! `sequence_number` on every event, from 0; items added one after another, each finished (its
//! `*.done` events, then `response.output_item.done`) before the next one is added; a text part
//! added before its first delta; the terminal event carrying the complete output and usage. A
//! failure after the stream began is `response.failed`, then the end.

use serde_json::{Value, json};

use crate::adapter::Render;
use crate::adapter::events::merge_usage;

use super::{
    ResponsesContext, ToolKind, call_item, ending, envelope, failure_code, item_id, message_item,
    reasoning_item, usage,
};

/// The item open now.
#[derive(Debug)]
enum Open {
    Message {
        id: String,
        text: String,
    },
    Reasoning {
        id: String,
        text: String,
        /// The summary part was added (on the first readable thinking).
        part: bool,
        block: Value,
    },
    Call {
        id: String,
        call_id: String,
        name: String,
        kind: Option<ToolKind>,
        args: String,
    },
    /// A block the client does not see.
    Hidden,
}

/// The event writer of one streamed response.
#[derive(Debug)]
pub struct EventState {
    ctx: ResponsesContext,
    id: String,
    created: u64,
    seq: u64,
    /// The finished items, in output order.
    items: Vec<Value>,
    open: Option<Open>,
    usage: Value,
    stop_reason: Option<String>,
    started: bool,
    finished: bool,
    out: Vec<u8>,
}

impl EventState {
    pub fn new(ctx: ResponsesContext, id: String, created: u64) -> Self {
        Self {
            ctx,
            id,
            created,
            seq: 0,
            items: Vec::new(),
            open: None,
            usage: json!({}),
            stop_reason: None,
            started: false,
            finished: false,
            out: Vec::new(),
        }
    }

    fn event(&mut self, kind: &str, mut data: Value) {
        data["type"] = json!(kind);
        data["sequence_number"] = json!(self.seq);
        self.seq += 1;
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(kind.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        self.out.extend_from_slice(data.to_string().as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    fn index(&self) -> usize {
        self.items.len()
    }

    fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        let r = envelope(
            &self.ctx,
            &self.id,
            self.created,
            "in_progress",
            Vec::new(),
            Value::Null,
        );
        self.event("response.created", json!({"response": r}));
        self.event("response.in_progress", json!({"response": r}));
    }

    fn open_item(&mut self, block: &Value) {
        let index = self.index();
        let open = match block["type"].as_str() {
            Some("text") => {
                let id = item_id("msg");
                self.event("response.output_item.added", json!({"output_index": index,
                    "item": {"type": "message", "id": id, "role": "assistant", "status": "in_progress", "content": []}}));
                self.event("response.content_part.added", json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}));
                Open::Message {
                    id,
                    text: String::new(),
                }
            }
            Some(t @ ("thinking" | "redacted_thinking")) => {
                let id = item_id("rs");
                self.event(
                    "response.output_item.added",
                    json!({"output_index": index,
                    "item": {"type": "reasoning", "id": id, "summary": []}}),
                );
                let mut block = block.clone();
                if t == "thinking" {
                    block["thinking"] = json!("");
                    block["signature"] = json!("");
                }
                Open::Reasoning {
                    id,
                    text: String::new(),
                    part: false,
                    block,
                }
            }
            Some("tool_use") => {
                let name = block["name"].as_str().unwrap_or("").to_owned();
                let call_id = block["id"].as_str().unwrap_or("").to_owned();
                let kind = self.ctx.kind_of(&name);
                let id = item_id(match kind {
                    Some(ToolKind::Custom) => "ctc",
                    Some(ToolKind::LocalShell) => "lsh",
                    None => "fc",
                });
                let item = match kind {
                    None => {
                        json!({"type": "function_call", "id": id, "call_id": call_id, "name": name, "arguments": "", "status": "in_progress"})
                    }
                    Some(ToolKind::Custom) => {
                        json!({"type": "custom_tool_call", "id": id, "call_id": call_id, "name": name, "input": "", "status": "in_progress"})
                    }
                    Some(ToolKind::LocalShell) => {
                        json!({"type": "local_shell_call", "id": id, "call_id": call_id, "status": "in_progress",
                        "action": {"type": "exec", "command": [], "env": {}}})
                    }
                };
                self.event(
                    "response.output_item.added",
                    json!({"output_index": index, "item": item}),
                );
                // A relay that sends the whole input in the start event.
                let args = block
                    .get("input")
                    .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
                    .map(Value::to_string)
                    .unwrap_or_default();
                if !args.is_empty() && kind.is_none() {
                    self.event(
                        "response.function_call_arguments.delta",
                        json!({"item_id": id, "output_index": index, "delta": args}),
                    );
                }
                Open::Call {
                    id,
                    call_id,
                    name,
                    kind,
                    args,
                }
            }
            _ => Open::Hidden,
        };
        self.open = Some(open);
    }

    fn delta(&mut self, delta: &Value) {
        let index = self.index();
        let text = |k: &str| {
            delta
                .get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let mut events: Vec<(&str, Value)> = Vec::new();
        match (&mut self.open, delta["type"].as_str()) {
            (Some(Open::Message { id, text: all }), Some("text_delta")) => {
                let t = text("text");
                if !t.is_empty() {
                    all.push_str(&t);
                    events.push(("response.output_text.delta", json!({"item_id": id, "output_index": index, "content_index": 0, "delta": t, "logprobs": []})));
                }
            }
            (
                Some(Open::Reasoning {
                    id,
                    text: all,
                    part,
                    block,
                }),
                Some("thinking_delta"),
            ) => {
                let t = text("thinking");
                if !t.is_empty() {
                    if !*part {
                        *part = true;
                        events.push((
                            "response.reasoning_summary_part.added",
                            json!({"item_id": id, "output_index": index, "summary_index": 0,
                            "part": {"type": "summary_text", "text": ""}}),
                        ));
                    }
                    all.push_str(&t);
                    block["thinking"] = json!(all.clone());
                    events.push(("response.reasoning_summary_text.delta", json!({"item_id": id, "output_index": index, "summary_index": 0, "delta": t})));
                }
            }
            (Some(Open::Reasoning { block, .. }), Some("signature_delta")) => {
                let s = format!(
                    "{}{}",
                    block["signature"].as_str().unwrap_or(""),
                    text("signature")
                );
                block["signature"] = json!(s);
            }
            (Some(Open::Call { id, kind, args, .. }), Some("input_json_delta")) => {
                let t = text("partial_json");
                if !t.is_empty() {
                    args.push_str(&t);
                    if kind.is_none() {
                        events.push((
                            "response.function_call_arguments.delta",
                            json!({"item_id": id, "output_index": index, "delta": t}),
                        ));
                    }
                }
            }
            _ => {}
        }
        for (k, v) in events {
            self.event(k, v);
        }
    }

    fn close_item(&mut self) {
        let index = self.index();
        let item = match self.open.take() {
            None | Some(Open::Hidden) => return,
            Some(Open::Message { id, text }) => {
                self.event("response.output_text.done", json!({"item_id": id, "output_index": index, "content_index": 0, "text": text, "logprobs": []}));
                self.event("response.content_part.done", json!({"item_id": id, "output_index": index, "content_index": 0,
                    "part": {"type": "output_text", "text": text, "annotations": [], "logprobs": []}}));
                message_item(&id, &text, "completed")
            }
            Some(Open::Reasoning {
                id,
                text,
                part,
                block,
            }) => {
                if part {
                    self.event("response.reasoning_summary_text.done", json!({"item_id": id, "output_index": index, "summary_index": 0, "text": text}));
                    self.event(
                        "response.reasoning_summary_part.done",
                        json!({"item_id": id, "output_index": index, "summary_index": 0,
                        "part": {"type": "summary_text", "text": text}}),
                    );
                }
                reasoning_item(&id, &text, std::slice::from_ref(&block))
            }
            Some(Open::Call {
                id,
                call_id,
                name,
                kind,
                args,
            }) => {
                let input: Value = if args.trim().is_empty() {
                    json!({})
                } else {
                    serde_json::from_str(&args).unwrap_or_else(|_| json!({"input": args}))
                };
                if kind.is_none() {
                    self.event("response.function_call_arguments.done", json!({"item_id": id, "output_index": index, "name": name, "arguments": input.to_string()}));
                }
                call_item(&self.ctx, &id, &call_id, &name, &input)
            }
        };
        self.event(
            "response.output_item.done",
            json!({"output_index": index, "item": item}),
        );
        self.items.push(item);
    }

    /// Ends the stream with `response.failed` (after `response.created`, if none went out yet).
    pub fn fail(&mut self, anthropic_type: &str, message: &str) {
        if self.finished {
            return;
        }
        self.start();
        let items = self.items.clone();
        let mut r = envelope(
            &self.ctx,
            &self.id,
            self.created,
            "failed",
            items,
            Value::Null,
        );
        r["error"] = json!({"code": failure_code(anthropic_type, message), "message": message});
        self.event("response.failed", json!({"response": r}));
        self.finished = true;
    }
}

impl Render for EventState {
    /// Takes one Anthropic event (its name and JSON data).
    fn push(&mut self, name: &str, data: &Value) {
        if self.finished {
            return;
        }
        match name {
            "message_start" => {
                merge_usage(&mut self.usage, data.pointer("/message/usage"));
                self.start();
            }
            "content_block_start" => {
                self.start();
                self.close_item();
                self.open_item(data.get("content_block").unwrap_or(&Value::Null));
            }
            "content_block_delta" => self.delta(data.get("delta").unwrap_or(&Value::Null)),
            "content_block_stop" => self.close_item(),
            "message_delta" => {
                if let Some(r) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(r.to_owned());
                }
                merge_usage(&mut self.usage, data.get("usage"));
            }
            "message_stop" => {
                self.start();
                self.close_item();
                let (status, reason) = ending(self.stop_reason.as_deref());
                let items = self.items.clone();
                let mut r = envelope(
                    &self.ctx,
                    &self.id,
                    self.created,
                    status,
                    items,
                    usage(&self.usage),
                );
                if let Some(reason) = reason {
                    r["incomplete_details"] = json!({"reason": reason});
                }
                let kind = if status == "completed" {
                    "response.completed"
                } else {
                    "response.incomplete"
                };
                self.event(kind, json!({"response": r}));
                self.finished = true;
            }
            "error" => {
                let kind = data
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error")
                    .to_owned();
                let message = data
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("the provider failed mid-stream")
                    .to_owned();
                self.fail(&kind, &message);
            }
            _ => {}
        }
    }

    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The Anthropic stream ended: if it never said `message_stop`, the response failed.
    fn end(&mut self) {
        if !self.finished {
            self.fail(
                "api_error",
                "stream closed before the response was complete",
            );
        }
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

/// Reads a Responses event stream as the official SDK's accumulator does, enforcing its rules;
/// returns the final `response` (from the terminal event) and the output rebuilt from the
/// events, which must agree with it.
pub fn accumulate(bytes: &[u8]) -> Result<(Value, Vec<Value>), String> {
    let text = String::from_utf8_lossy(bytes);
    let mut output: Vec<Value> = Vec::new();
    let mut created = false;
    let mut open: Option<usize> = None;
    for (seq, (name, data)) in crate::upstream::sse::parse_all(&text)
        .into_iter()
        .enumerate()
    {
        let e: Value = serde_json::from_str(&data).map_err(|e| format!("bad event: {e}"))?;
        let kind = e["type"].as_str().unwrap_or("").to_owned();
        if name.as_deref().is_some_and(|n| n != kind) {
            return Err(format!("event line {name:?} but type {kind}"));
        }
        if e["sequence_number"].as_u64() != Some(seq as u64) {
            return Err(format!(
                "sequence_number {} where {seq} was due",
                e["sequence_number"]
            ));
        }
        if !created && kind != "response.created" {
            return Err(format!("{kind} before response.created"));
        }
        let index = e["output_index"].as_u64().map(|i| i as usize);
        match kind.as_str() {
            "response.created" => created = true,
            "response.in_progress" => {}
            "response.output_item.added" => {
                if open.is_some() {
                    return Err("an item added while another is open".into());
                }
                if index != Some(output.len()) {
                    return Err(format!(
                        "item added at {index:?}, expected {}",
                        output.len()
                    ));
                }
                output.push(e["item"].clone());
                open = index;
            }
            "response.content_part.added" => {
                let i = index
                    .filter(|i| Some(*i) == open)
                    .ok_or("part for a closed item")?;
                output[i]["content"]
                    .as_array_mut()
                    .ok_or("not a message")?
                    .push(e["part"].clone());
            }
            "response.output_text.delta" => {
                let i = index
                    .filter(|i| Some(*i) == open)
                    .ok_or("text for a closed item")?;
                let c = e["content_index"].as_u64().ok_or("no content_index")? as usize;
                let part = output[i]["content"]
                    .get_mut(c)
                    .ok_or("text before its part")?;
                if part["type"] != "output_text" {
                    return Err("text delta into a part that is not output_text".into());
                }
                let joined = format!(
                    "{}{}",
                    part["text"].as_str().unwrap_or(""),
                    e["delta"].as_str().unwrap_or("")
                );
                part["text"] = json!(joined);
            }
            "response.function_call_arguments.delta" => {
                let i = index
                    .filter(|i| Some(*i) == open)
                    .ok_or("arguments for a closed item")?;
                if output[i]["type"] != "function_call" {
                    return Err("arguments delta for an item that is not a function_call".into());
                }
                let joined = format!(
                    "{}{}",
                    output[i]["arguments"].as_str().unwrap_or(""),
                    e["delta"].as_str().unwrap_or("")
                );
                output[i]["arguments"] = json!(joined);
            }
            "response.reasoning_summary_part.added" | "response.reasoning_summary_text.delta" => {
                index
                    .filter(|i| Some(*i) == open)
                    .ok_or("reasoning for a closed item")?;
                if e["summary_index"].as_u64().is_none() {
                    return Err("no summary_index".into());
                }
            }
            "response.output_text.done"
            | "response.content_part.done"
            | "response.function_call_arguments.done"
            | "response.reasoning_summary_text.done"
            | "response.reasoning_summary_part.done" => {
                index
                    .filter(|i| Some(*i) == open)
                    .ok_or("done for a closed item")?;
            }
            "response.output_item.done" => {
                let i = index
                    .filter(|i| Some(*i) == open)
                    .ok_or("item done while not open")?;
                output[i] = e["item"].clone();
                open = None;
            }
            "response.completed" | "response.incomplete" => {
                if open.is_some() {
                    return Err("ended with an item open".into());
                }
                let r = e["response"].clone();
                if r["output"].as_array() != Some(&output) {
                    return Err("the final output differs from the events".into());
                }
                if r["id"].as_str().is_none() || r["usage"]["total_tokens"].as_u64().is_none() {
                    return Err("a final response without id or usage".into());
                }
                return Ok((r, output));
            }
            "response.failed" => {
                return Err(format!("response.failed: {}", e["response"]["error"]));
            }
            other => return Err(format!("unknown event {other}")),
        }
    }
    Err("no response.completed".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::events::message_to_sse;
    use crate::adapter::responses::response;

    fn ctx() -> ResponsesContext {
        ResponsesContext {
            model: "asked".into(),
            echo: json!({}),
            tools: vec![("apply_patch".into(), ToolKind::Custom)],
        }
    }

    fn render(events: &str) -> Vec<u8> {
        let mut s = EventState::new(ctx(), "resp_1".into(), 5);
        s.push_sse(events.as_bytes());
        s.end();
        s.take()
    }

    fn sample() -> Value {
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "up",
            "content": [{"type": "thinking", "thinking": "plan it", "signature": "sig"},
                {"type": "text", "text": "Running."},
                {"type": "tool_use", "id": "toolu_a", "name": "shell", "input": {"command": ["ls"]}},
                {"type": "tool_use", "id": "toolu_b", "name": "apply_patch", "input": {"input": "*** Begin Patch"}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 100, "cache_creation_input_tokens": 0, "output_tokens": 40}})
    }

    /// Items without their random ids, to compare two renderings.
    fn without_ids(items: &[Value]) -> Vec<Value> {
        items
            .iter()
            .map(|i| {
                let mut i = i.clone();
                i.as_object_mut().map(|o| o.remove("id"));
                i
            })
            .collect()
    }

    #[test]
    fn a_stream_accumulates_to_the_non_streaming_response() {
        let m = sample();
        let bytes = render(&message_to_sse(&m));
        let (streamed, _) = accumulate(&bytes).unwrap();
        let whole = response(&m, &ctx(), "resp_1", 5);
        assert_eq!(
            without_ids(streamed["output"].as_array().unwrap()),
            without_ids(whole["output"].as_array().unwrap())
        );
        assert_eq!(streamed["usage"], whole["usage"]);
        assert_eq!(streamed["status"], "completed");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with("event: response.created\n"), "{text}");
        assert!(text.contains("response.reasoning_summary_text.delta"));
        assert!(!text.contains("[DONE]"));
    }

    #[test]
    fn a_cut_or_failed_stream_ends_with_response_failed() {
        let m = message_to_sse(&sample());
        let cut = &m[..m.find("event: message_delta").unwrap()];
        let over = "event: error\ndata: {\"type\":\"error\",\"error\":{\"type\":\"invalid_request_error\",\"message\":\"prompt is too long: 9 tokens > 8 maximum\"}}\n\n";
        for (events, code) in [
            (cut.to_owned(), "server_error"),
            (format!("{cut}{over}"), "context_length_exceeded"),
        ] {
            let text = String::from_utf8(render(&events)).unwrap();
            let last = crate::upstream::sse::parse_all(&text).pop().unwrap();
            assert_eq!(last.0.as_deref(), Some("response.failed"));
            let v: Value = serde_json::from_str(&last.1).unwrap();
            assert_eq!(v["response"]["error"]["code"], code);
            assert!(
                v.get("error").is_none(),
                "nothing truthy at the top level: the SDK would raise"
            );
        }
        // An error before anything: created first, then failed.
        let mut s = EventState::new(ctx(), "resp_2".into(), 5);
        s.fail("overloaded_error", "Overloaded");
        let text = String::from_utf8(s.take()).unwrap();
        let names: Vec<_> = crate::upstream::sse::parse_all(&text)
            .into_iter()
            .map(|(n, _)| n.unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "response.created",
                "response.in_progress",
                "response.failed"
            ]
        );
    }

    #[test]
    fn the_accumulator_rejects_interleaved_items_and_gaps_in_sequence() {
        let ok = String::from_utf8(render(&message_to_sse(&sample()))).unwrap();
        assert!(accumulate(ok.as_bytes()).is_ok());
        let gap = ok.replacen("\"sequence_number\":3", "\"sequence_number\":4", 1);
        assert!(accumulate(gap.as_bytes()).is_err());
        let max = render(&message_to_sse(
            &json!({"content": [{"type": "text", "text": "cut"}], "stop_reason": "max_tokens", "usage": {"input_tokens": 1, "output_tokens": 1}}),
        ));
        let (r, _) = accumulate(&max).unwrap();
        assert_eq!(r["status"], "incomplete");
    }
}
