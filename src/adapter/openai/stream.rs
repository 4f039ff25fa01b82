//! The state machine that turns Chat Completions stream chunks into an Anthropic event stream
//! (the protocol reference's sections on building an Anthropic stream from
//! chunks and on upstream failures mid-stream).
//!
//! Feed it each upstream `data:` payload in order ([`StreamState::push_data`]), then
//! [`StreamState::finish`] at end of input, and take the Anthropic SSE bytes it wrote
//! ([`StreamState::take`]). It guarantees: `message_start` first and once; dense block indices, one
//! block open at a time, blocks opened lazily; thinking blocks closed with a signature; tool
//! arguments passed through as received; and an ending that is either `message_delta` (with full
//! usage) plus `message_stop`, or a single `error` event. Nothing is written after either.

use serde_json::{Value, json};

use super::response::{parse_arguments, reasoning_text, stop_reason};
use super::{ReplyContext, usage_to_anthropic};
use crate::adapter::ids::{message_id, thinking_signature, tool_id_from_upstream};

/// What the caller should do after a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Keep feeding.
    Continue,
    /// The stream is complete (`message_stop` written).
    Done,
    /// The upstream reported an error; an `error` event was written.
    Failed {
        error_type: &'static str,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Open {
    None,
    Thinking(u32),
    Text(u32),
    /// Index into `tools`.
    Tool(usize),
}

#[derive(Debug, Default)]
struct ToolSlot {
    upstream_index: Option<u64>,
    upstream_id: Option<String>,
    id: String,
    name: Option<String>,
    /// Arguments received so far (all of them, including those already sent).
    args: String,
    /// Bytes of `args` not yet sent (before the block could open).
    unsent: String,
    /// The Anthropic block index, once opened.
    index: Option<u32>,
    opened: bool,
    closed: bool,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ThinkMode {
    #[default]
    Outside,
    Inside,
}

/// Splits `<think>…</think>` out of streamed content; only a tag at the very start opens it.
#[derive(Debug, Default)]
struct ThinkTags {
    mode: ThinkMode,
    held: String,
    decided: bool,
}

const OPEN_TAG: &str = "<think>";
const CLOSE_TAG: &str = "</think>";

impl ThinkTags {
    /// Returns pieces in order: `(is_reasoning, text)`.
    fn feed(&mut self, s: &str) -> Vec<(bool, String)> {
        let mut out = Vec::new();
        let mut input = std::mem::take(&mut self.held);
        input.push_str(s);
        loop {
            match self.mode {
                ThinkMode::Outside => {
                    if self.decided {
                        if !input.is_empty() {
                            out.push((false, input));
                        }
                        break;
                    }
                    let t = input.trim_start();
                    if let Some(rest) = t.strip_prefix(OPEN_TAG) {
                        input = rest.to_owned();
                        self.mode = ThinkMode::Inside;
                        continue;
                    }
                    if OPEN_TAG.starts_with(t) {
                        self.held = input; // maybe the start of a tag
                        break;
                    }
                    self.decided = true;
                }
                ThinkMode::Inside => {
                    if let Some(p) = input.find(CLOSE_TAG) {
                        if p > 0 {
                            out.push((true, input[..p].to_owned()));
                        }
                        input = input[p + CLOSE_TAG.len()..].to_owned();
                        self.mode = ThinkMode::Outside;
                        self.decided = true;
                        continue;
                    }
                    // Hold back a suffix that could be the start of the closing tag.
                    let keep = (1..CLOSE_TAG.len())
                        .rev()
                        .find(|&n| {
                            input.len() >= n
                                && input.is_char_boundary(input.len() - n)
                                && CLOSE_TAG.starts_with(&input[input.len() - n..])
                        })
                        .unwrap_or(0);
                    let split = input.len() - keep;
                    if split > 0 {
                        out.push((true, input[..split].to_owned()));
                    }
                    self.held = input[split..].to_owned();
                    break;
                }
            }
        }
        out
    }

    fn flush(&mut self) -> Option<(bool, String)> {
        let held = std::mem::take(&mut self.held);
        (!held.is_empty()).then_some((self.mode == ThinkMode::Inside, held))
    }
}

/// An upstream error carried inside a chunk, as `(anthropic error type, message)`.
pub fn chunk_error(chunk: &Value) -> Option<(&'static str, String)> {
    let finish_error = chunk
        .pointer("/choices/0/finish_reason")
        .and_then(Value::as_str)
        == Some("error");
    let err = chunk.get("error").filter(|e| !e.is_null());
    if err.is_none() && !finish_error {
        return None;
    }
    let message = match err {
        Some(Value::String(s)) => s.clone(),
        Some(e) => e
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .unwrap_or_else(|| e.to_string()),
        None => "upstream stream reported finish_reason \"error\"".to_owned(),
    };
    let kind = err
        .and_then(|e| e.get("type").or_else(|| e.get("code")))
        .map(|v| v.to_string().to_ascii_lowercase())
        .unwrap_or_default();
    let lower = message.to_ascii_lowercase();
    let overloaded = [
        "overload",
        "rate",
        "capacity",
        "busy",
        "no available",
        "unavailable",
        "429",
        "503",
        "529",
    ]
    .iter()
    .any(|w| kind.contains(w) || lower.contains(w));
    Some((
        if overloaded {
            "overloaded_error"
        } else {
            "api_error"
        },
        message,
    ))
}

#[derive(Debug)]
pub struct StreamState {
    ctx: ReplyContext,
    msg_id: String,
    next_index: u32,
    open: Open,
    thinking_text: String,
    thinking_signature: Option<String>,
    tools: Vec<ToolSlot>,
    pending_ws: String,
    finish_reason: Option<String>,
    native_stop: Option<Value>,
    usage: Option<Value>,
    started: bool,
    finished: bool,
    /// The end of the emitted text, for stop-sequence detection.
    text_tail: String,
    output_chars: usize,
    tags: ThinkTags,
    out: Vec<u8>,
}

impl StreamState {
    pub fn new(ctx: ReplyContext) -> Self {
        Self {
            ctx,
            msg_id: message_id(),
            next_index: 0,
            open: Open::None,
            thinking_text: String::new(),
            thinking_signature: None,
            tools: Vec::new(),
            pending_ws: String::new(),
            finish_reason: None,
            native_stop: None,
            usage: None,
            started: false,
            finished: false,
            text_tail: String::new(),
            output_chars: 0,
            tags: ThinkTags::default(),
            out: Vec::with_capacity(1024),
        }
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The bytes written since the last call.
    pub fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    fn event(&mut self, name: &str, data: &Value) {
        self.out.extend_from_slice(b"event: ");
        self.out.extend_from_slice(name.as_bytes());
        self.out.extend_from_slice(b"\ndata: ");
        // Serialising a Value into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut self.out, data);
        self.out.extend_from_slice(b"\n\n");
    }

    /// A `content_block_delta` event, written directly: the commonest event, and building a JSON
    /// tree for each one cost more than the rest of the conversion. Same bytes as [`Self::event`].
    fn delta(&mut self, i: u32, kind: &str, field: &str, value: &str) {
        use std::io::Write as _;
        let _ = write!(
            self.out,
            "event: content_block_delta\ndata: {{\"type\":\"content_block_delta\",\"index\":{i},\"delta\":{{\"type\":\"{kind}\",\"{field}\":"
        );
        let _ = serde_json::to_writer(&mut self.out, value);
        self.out.extend_from_slice(b"}}\n\n");
    }

    /// Writes `message_start` (once). Called before anything else is written.
    pub fn start(&mut self) {
        if self.started {
            return;
        }
        self.started = true;
        let data = json!({"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant", "model": self.ctx.model,
            "content": [], "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": self.ctx.input_estimate.max(1), "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1}}});
        self.event("message_start", &data);
    }

    fn close_open(&mut self) {
        match self.open {
            Open::None => {}
            Open::Thinking(i) => {
                let sig = self
                    .thinking_signature
                    .take()
                    .unwrap_or_else(|| thinking_signature(&self.thinking_text));
                self.delta(i, "signature_delta", "signature", &sig);
                self.event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": i}),
                );
                self.thinking_text.clear();
            }
            Open::Text(i) => self.event(
                "content_block_stop",
                &json!({"type": "content_block_stop", "index": i}),
            ),
            Open::Tool(slot) => {
                let i = self.tool_index(slot);
                self.tools[slot].closed = true;
                self.event(
                    "content_block_stop",
                    &json!({"type": "content_block_stop", "index": i}),
                );
            }
        }
        self.open = Open::None;
    }

    fn tool_index(&self, slot: usize) -> u32 {
        self.tools[slot].index.unwrap_or(0)
    }

    fn reasoning(&mut self, text: &str) {
        if text.is_empty() || !self.ctx.thinking {
            return;
        }
        if !matches!(self.open, Open::Thinking(_)) {
            self.close_open();
            let i = self.next_index;
            self.next_index += 1;
            self.open = Open::Thinking(i);
            self.event("content_block_start", &json!({"type": "content_block_start", "index": i, "content_block": {"type": "thinking", "thinking": "", "signature": ""}}));
        }
        if let Open::Thinking(i) = self.open {
            self.thinking_text.push_str(text);
            self.output_chars += text.len();
            self.delta(i, "thinking_delta", "thinking", text);
        }
    }

    fn text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        let i = match self.open {
            Open::Text(i) => i,
            _ if text.trim().is_empty() => {
                self.pending_ws.push_str(text);
                return;
            }
            _ => {
                self.close_open();
                let i = self.next_index;
                self.next_index += 1;
                self.open = Open::Text(i);
                self.event("content_block_start", &json!({"type": "content_block_start", "index": i, "content_block": {"type": "text", "text": ""}}));
                i
            }
        };
        let mut piece = std::mem::take(&mut self.pending_ws);
        piece.push_str(text);
        self.output_chars += piece.len();
        self.text_tail.push_str(&piece);
        if self.text_tail.len() > 512 {
            let mut cut = self.text_tail.len() - 256;
            while !self.text_tail.is_char_boundary(cut) {
                cut += 1;
            }
            self.text_tail.drain(..cut);
        }
        self.delta(i, "text_delta", "text", &piece);
    }

    fn content(&mut self, content: &str) {
        for (is_reasoning, piece) in self.tags.feed(content) {
            if is_reasoning {
                self.reasoning(&piece)
            } else {
                self.text(&piece)
            }
        }
    }

    /// Finds the slot a tool-call delta belongs to, creating one when it starts a new call.
    fn slot_for(&mut self, tc: &Value, position: usize) -> usize {
        let index = tc.get("index").and_then(Value::as_u64);
        let id = tc
            .get("id")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let existing = match (index, &id) {
            (Some(ix), _) => self
                .tools
                .iter()
                .rposition(|s| s.upstream_index == Some(ix))
                .filter(|&s| id.is_none() || self.tools[s].upstream_id == id),
            (None, Some(id)) => self
                .tools
                .iter()
                .position(|s| s.upstream_id.as_deref() == Some(id)),
            (None, None) => self.tools.iter().rposition(|s| !s.closed).or_else(|| {
                self.tools
                    .iter()
                    .position(|s| s.upstream_index == Some(position as u64))
            }),
        };
        if let Some(s) = existing {
            return s;
        }
        self.tools.push(ToolSlot {
            upstream_index: index.or(Some(position as u64)).filter(|_| index.is_some()),
            id: tool_id_from_upstream(id.as_deref()),
            upstream_id: id,
            ..ToolSlot::default()
        });
        self.tools.len() - 1
    }

    fn open_tool(&mut self, slot: usize) {
        self.close_open();
        let i = self.next_index;
        self.next_index += 1;
        self.tools[slot].index = Some(i);
        self.open = Open::Tool(slot);
        let (id, name) = (
            self.tools[slot].id.clone(),
            self.tools[slot].name.clone().unwrap_or_default(),
        );
        self.tools[slot].opened = true;
        self.event("content_block_start", &json!({"type": "content_block_start", "index": i, "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}));
        let unsent = std::mem::take(&mut self.tools[slot].unsent);
        if !unsent.is_empty() {
            self.delta(i, "input_json_delta", "partial_json", &unsent);
        }
    }

    /// Returns an error message when the upstream interleaves fragments of closed calls.
    fn tool_call(&mut self, tc: &Value, position: usize) -> Result<(), String> {
        let slot = self.slot_for(tc, position);
        let f = tc.get("function");
        if let Some(name) = f
            .and_then(|f| f.get("name"))
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
        {
            if self.tools[slot].name.is_none() {
                self.tools[slot].name = Some(name.to_owned());
            }
        }
        let fragment = match f.and_then(|f| f.get("arguments")) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Object(o)) => Value::Object(o.clone()).to_string(),
            _ => String::new(),
        };
        let s = &self.tools[slot];
        if s.closed {
            if fragment.is_empty() || repeats_arguments(&s.args, &fragment) {
                return Ok(());
            }
            return Err(format!(
                "upstream sent arguments for tool call {} after it was closed",
                s.id
            ));
        }
        if !fragment.is_empty() && repeats_arguments(&s.args, &fragment) {
            return Ok(()); // the complete arguments sent again (some servers do at finish)
        }
        if !s.opened && s.name.is_some() {
            self.open_tool(slot);
        } else if s.opened && self.open != Open::Tool(slot) {
            return Err(format!(
                "upstream interleaved tool call {} with another block",
                s.id
            ));
        }
        if fragment.is_empty() {
            return Ok(());
        }
        self.output_chars += fragment.len();
        let s = &mut self.tools[slot];
        s.args.push_str(&fragment);
        if s.opened {
            let i = s.index.unwrap_or(0);
            self.delta(i, "input_json_delta", "partial_json", &fragment);
        } else {
            s.unsent.push_str(&fragment);
        }
        Ok(())
    }

    /// Writes an `error` event and ends the stream. Half-built blocks are left unclosed (C.13).
    pub fn fail(&mut self, error_type: &'static str, message: &str) -> Step {
        if !self.finished {
            self.start();
            self.finished = true;
            self.event(
                "error",
                &json!({"type": "error", "error": {"type": error_type, "message": message}}),
            );
        }
        Step::Failed {
            error_type,
            message: message.to_owned(),
        }
    }

    /// Processes one upstream `data:` payload.
    pub fn push_data(&mut self, data: &str) -> Step {
        if self.finished {
            return Step::Done;
        }
        self.start();
        let data = data.trim();
        if data == "[DONE]" {
            return self.finalize();
        }
        if let Some(step) = self.text_chunk(data) {
            return step;
        }
        let chunk: Value = match serde_json::from_str(data) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "skipping an upstream chunk that is not JSON");
                return Step::Continue;
            }
        };
        if let Some((kind, message)) = chunk_error(&chunk) {
            return self.fail(kind, &format!("upstream error mid-stream: {message}"));
        }
        if let Some(u) = chunk
            .get("usage")
            .filter(|u| u.is_object())
            .or_else(|| chunk.pointer("/x_groq/usage"))
        {
            self.usage = Some(u.clone());
        }
        let Some(choice) = chunk
            .get("choices")
            .and_then(Value::as_array)
            .and_then(|c| c.first())
        else {
            return Step::Continue;
        };
        let delta = choice.get("delta").unwrap_or(&Value::Null);
        if let Some(details) = delta.get("reasoning_details").and_then(Value::as_array) {
            if let Some(sig) = details
                .iter()
                .filter_map(|d| d.get("signature").and_then(Value::as_str))
                .find(|s| !s.is_empty())
            {
                self.thinking_signature = Some(sig.to_owned());
            }
        }
        if let Some(r) = reasoning_text(delta) {
            self.reasoning(&r);
        }
        if let Some(c) = delta.get("content").and_then(Value::as_str) {
            self.content(c);
        }
        if let Some(calls) = delta.get("tool_calls").and_then(Value::as_array) {
            for (pos, tc) in calls.iter().enumerate() {
                if let Err(msg) = self.tool_call(tc, pos) {
                    return self.fail("api_error", &msg);
                }
            }
        }
        if let Some(stop) = choice.get("stop_reason").filter(|v| !v.is_null()) {
            self.native_stop = Some(stop.clone());
        }
        if let Some(finish) = choice.get("finish_reason").and_then(Value::as_str) {
            self.choice_finished(finish);
        }
        Step::Continue
    }

    /// A choice's `finish_reason` arrived: what is held back is written and open blocks close.
    fn choice_finished(&mut self, finish: &str) {
        self.finish_reason = Some(finish.to_owned());
        if let Some((r, t)) = self.tags.flush() {
            if r { self.reasoning(&t) } else { self.text(&t) }
        }
        self.close_open();
    }

    /// The commonest chunk, a text delta, read without a JSON tree (which cost more than the rest
    /// of the conversion). `None` leaves the chunk to the general path: whenever it mentions
    /// anything else this state machine reads (errors, usage, reasoning, tool calls, a native stop
    /// reason, an `error` finish), has an escape that could spell a key, or does not parse.
    fn text_chunk(&mut self, data: &str) -> Option<Step> {
        const OTHERS: [&str; 7] = [
            "\"error\"",
            "\"usage\"",
            "\"x_groq\"",
            "\"tool_calls\"",
            "\"reasoning",
            "\"stop_reason\"",
            "\\u",
        ];
        if OTHERS.iter().any(|k| data.contains(k)) {
            return None;
        }
        #[derive(serde::Deserialize)]
        struct Chunk<'a> {
            #[serde(borrow, default)]
            choices: Vec<Choice<'a>>,
        }
        #[derive(serde::Deserialize)]
        struct Choice<'a> {
            #[serde(borrow, default)]
            delta: Option<Delta<'a>>,
            #[serde(borrow, default)]
            finish_reason: Option<std::borrow::Cow<'a, str>>,
        }
        #[derive(serde::Deserialize)]
        struct Delta<'a> {
            #[serde(borrow, default)]
            content: Option<std::borrow::Cow<'a, str>>,
        }
        let chunk: Chunk<'_> = serde_json::from_str(data).ok()?;
        let Some(choice) = chunk.choices.first() else {
            return Some(Step::Continue);
        };
        if choice.finish_reason.as_deref() == Some("error") {
            return None;
        }
        if let Some(c) = choice.delta.as_ref().and_then(|d| d.content.as_deref()) {
            self.content(c);
        }
        if let Some(finish) = choice.finish_reason.as_deref() {
            self.choice_finished(finish);
        }
        Some(Step::Continue)
    }

    /// End of upstream input (EOF). A stream that saw `finish_reason` ends normally; one that did
    /// not was truncated and ends with an error event.
    pub fn finish(&mut self) -> Step {
        if self.finished {
            return Step::Done;
        }
        self.start();
        if self.finish_reason.is_some() {
            self.finalize()
        } else {
            self.fail(
                "api_error",
                "upstream stream ended unexpectedly (no finish_reason)",
            )
        }
    }

    fn finalize(&mut self) -> Step {
        if let Some((r, t)) = self.tags.flush() {
            if r { self.reasoning(&t) } else { self.text(&t) }
        }
        self.close_open();
        self.pending_ws.clear();
        for t in self.tools.iter().filter(|t| !t.opened) {
            tracing::warn!(tool_id = %t.id, "dropping an upstream tool call that never got a name");
        }
        let tools_emitted = self.tools.iter().any(|t| t.opened);
        let (stop, seq) = stop_reason(
            self.finish_reason.as_deref(),
            tools_emitted,
            &self.text_tail,
            self.native_stop.as_ref(),
            &self.ctx,
        );
        let usage = usage_to_anthropic(
            self.usage.as_ref(),
            self.ctx.input_estimate.max(1),
            (self.output_chars as u64 / 4).max(1),
        );
        let mut delta = json!({"stop_reason": stop, "stop_sequence": seq});
        if stop == "refusal" {
            delta["stop_details"] = json!({"type": "refusal", "category": null, "explanation": "upstream content filter"});
        }
        self.event(
            "message_delta",
            &json!({"type": "message_delta", "delta": delta, "usage": usage}),
        );
        self.event("message_stop", &json!({"type": "message_stop"}));
        self.finished = true;
        Step::Done
    }

    /// The final tool inputs, for tests and for rebuilding a message.
    pub fn tool_inputs(&self) -> Vec<Value> {
        self.tools
            .iter()
            .filter(|t| t.opened)
            .map(|t| parse_arguments(&t.args))
            .collect()
    }
}

/// Whether `fragment` is the complete arguments again: `args` is already a whole JSON object and
/// the fragment, on its own, is the same JSON.
fn repeats_arguments(args: &str, fragment: &str) -> bool {
    if args.is_empty() {
        return false;
    }
    match (
        serde_json::from_str::<Value>(args),
        serde_json::from_str::<Value>(fragment),
    ) {
        (Ok(a @ Value::Object(_)), Ok(b)) => a == b,
        _ => false,
    }
}
