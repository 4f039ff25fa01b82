//! Anthropic events as `chat.completion.chunk`s (`openai-front.md` §2.8).
//!
//! The rules real clients enforce: `role` once, in the first chunk; each tool call's first delta
//! carries its `id`, `type` and `function.name`, later ones only argument text; tool-call indexes
//! 0, 1, 2… in order of first appearance; the usage chunk (when asked for) last, just before
//! `data: [DONE]`; an error after the stream began is one chunk carrying `error`, then the end.

use serde_json::{Value, json};

use crate::adapter::Render;
use crate::adapter::events::merge_usage;

use super::ChatContext;
use super::errors;
use super::response::{call_id, finish_reason, usage};

/// How far past the blocks seen so far a block's index may jump (a valid stream's never does).
const MAX_INDEX_GAP: usize = 64;

/// What one Anthropic content block becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Block {
    Text,
    Thinking,
    /// A tool call, with its index among this answer's calls.
    Tool(usize),
    /// Nothing the client sees (redacted thinking, server tools).
    Hidden,
}

/// The chunk writer of one streamed answer.
#[derive(Debug)]
pub struct ChunkState {
    ctx: ChatContext,
    id: String,
    created: u64,
    /// The open blocks by their Anthropic index.
    blocks: Vec<Block>,
    calls: usize,
    usage: Value,
    stop_reason: Option<String>,
    started: bool,
    finished: bool,
    out: Vec<u8>,
}

impl ChunkState {
    pub fn new(ctx: ChatContext, id: String, created: u64) -> Self {
        Self {
            ctx,
            id,
            created,
            blocks: Vec::new(),
            calls: 0,
            usage: json!({}),
            stop_reason: None,
            started: false,
            finished: false,
            out: Vec::new(),
        }
    }

    fn data(&mut self, v: &Value) {
        self.out.extend_from_slice(b"data: ");
        self.out.extend_from_slice(v.to_string().as_bytes());
        self.out.extend_from_slice(b"\n\n");
    }

    fn chunk(&mut self, delta: Value, finish: Option<&str>) {
        let mut c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.ctx.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null}],
        });
        if self.ctx.include_usage {
            c["usage"] = Value::Null;
        }
        self.data(&c);
    }

    fn start(&mut self) {
        if !self.started {
            self.started = true;
            self.chunk(json!({"role": "assistant", "content": ""}), None);
        }
    }

    /// Ends the stream with one chunk carrying the error (the client raises on it).
    pub fn fail(&mut self, anthropic_type: &str, message: &str) {
        if self.finished {
            return;
        }
        let (_, mut body) = errors::openai_error(500, anthropic_type, message);
        // After the head went out, a server error whatever it was: the client must not read it as
        // its own request's fault.
        if body["error"]["type"] == "invalid_request_error" {
            body["error"]["type"] = json!("server_error");
        }
        self.data(&body);
        self.finished = true;
    }
}

impl Render for ChunkState {
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
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let block = data.get("content_block").unwrap_or(&Value::Null);
                let kind = match block.get("type").and_then(Value::as_str) {
                    Some("text") => Block::Text,
                    Some("thinking") => Block::Thinking,
                    Some("tool_use") => {
                        let k = self.calls;
                        self.calls += 1;
                        let id = call_id(block.get("id").and_then(Value::as_str).unwrap_or(""));
                        let name = block.get("name").and_then(Value::as_str).unwrap_or("");
                        self.chunk(json!({"tool_calls": [{"index": k, "id": id, "type": "function", "function": {"name": name, "arguments": ""}}]}), None);
                        // A relay that sends the whole input in the start event.
                        if let Some(input) = block
                            .get("input")
                            .filter(|i| i.as_object().is_some_and(|o| !o.is_empty()))
                        {
                            self.chunk(json!({"tool_calls": [{"index": k, "function": {"arguments": input.to_string()}}]}), None);
                        }
                        Block::Tool(k)
                    }
                    _ => Block::Hidden,
                };
                // Indices are dense in a valid stream; one far beyond the blocks seen so far is
                // not given memory.
                if index > self.blocks.len() + MAX_INDEX_GAP {
                    return;
                }
                if self.blocks.len() <= index {
                    self.blocks.resize(index + 1, Block::Hidden);
                }
                self.blocks[index] = kind;
            }
            "content_block_delta" => {
                let index = data.get("index").and_then(Value::as_u64).unwrap_or(0) as usize;
                let block = self.blocks.get(index).copied().unwrap_or(Block::Hidden);
                let delta = data.get("delta").unwrap_or(&Value::Null);
                let text = |k: &str| {
                    delta
                        .get(k)
                        .and_then(Value::as_str)
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                };
                match (block, delta.get("type").and_then(Value::as_str)) {
                    (Block::Text, Some("text_delta")) => {
                        if let Some(t) = text("text") {
                            self.chunk(json!({"content": t}), None);
                        }
                    }
                    (Block::Thinking, Some("thinking_delta")) => {
                        if let Some(t) = text("thinking") {
                            self.chunk(json!({"reasoning_content": t}), None);
                        }
                    }
                    (Block::Tool(k), Some("input_json_delta")) => {
                        if let Some(t) = text("partial_json") {
                            self.chunk(
                                json!({"tool_calls": [{"index": k, "function": {"arguments": t}}]}),
                                None,
                            );
                        }
                    }
                    _ => {}
                }
            }
            "message_delta" => {
                if let Some(r) = data.pointer("/delta/stop_reason").and_then(Value::as_str) {
                    self.stop_reason = Some(r.to_owned());
                }
                merge_usage(&mut self.usage, data.get("usage"));
            }
            "message_stop" => {
                self.start();
                let finish = finish_reason(self.stop_reason.as_deref(), self.calls > 0);
                self.chunk(json!({}), Some(finish));
                if self.ctx.include_usage {
                    let c = json!({"id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.ctx.model, "choices": [], "usage": usage(&self.usage)});
                    self.data(&c);
                }
                self.out.extend_from_slice(b"data: [DONE]\n\n");
                self.finished = true;
            }
            "error" => {
                let kind = data
                    .pointer("/error/type")
                    .and_then(Value::as_str)
                    .unwrap_or("api_error");
                let message = data
                    .pointer("/error/message")
                    .and_then(Value::as_str)
                    .unwrap_or("the provider failed mid-stream");
                self.fail(kind, message);
            }
            _ => {}
        }
    }

    /// The bytes written so far, taken.
    fn take(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The Anthropic stream ended: if it never said `message_stop`, the client gets an error.
    fn end(&mut self) {
        if !self.finished {
            self.fail("api_error", "the answer ended before it was complete");
        }
    }

    fn is_finished(&self) -> bool {
        self.finished
    }
}

/// Reassembles a chunk stream the way the official SDK's accumulator does: every string field of
/// a delta concatenated, tool calls placed by `index`, the usage of the last chunk. Rejects what
/// the SDK or the AI SDK would mis-read (a repeated role or id, a new call without id and name, an
/// index out of order, a chunk after the usage chunk, an error chunk).
pub fn reassemble(bytes: &[u8]) -> Result<Value, String> {
    let text = String::from_utf8_lossy(bytes);
    let mut message = json!({"role": null, "content": null, "tool_calls": []});
    let mut reasoning = String::new();
    let mut finish: Option<String> = None;
    let mut usage = Value::Null;
    let mut ids: Option<(String, String, u64)> = None;
    let mut done = false;
    let mut usage_seen = false;
    for (_, data) in crate::upstream::sse::parse_all(&text) {
        if done {
            return Err("data after [DONE]".into());
        }
        if data.trim() == "[DONE]" {
            done = true;
            continue;
        }
        let c: Value = serde_json::from_str(&data).map_err(|e| format!("bad chunk: {e}"))?;
        if c.get("error").is_some_and(|e| !e.is_null()) {
            return Err(format!("error chunk: {}", c["error"]));
        }
        if c["object"] != "chat.completion.chunk" {
            return Err(format!("object {:?}", c["object"]));
        }
        if usage_seen {
            return Err("a chunk after the usage chunk".into());
        }
        let this = (
            c["id"].as_str().unwrap_or("").to_owned(),
            c["model"].as_str().unwrap_or("").to_owned(),
            c["created"].as_u64().unwrap_or(0),
        );
        match &ids {
            None => ids = Some(this),
            Some(first) if (&first.0, &first.1) != (&this.0, &this.1) => {
                return Err("id or model changed".into());
            }
            _ => {}
        }
        if c.get("usage").is_some_and(|u| !u.is_null()) {
            usage = c["usage"].clone();
            usage_seen = true;
        }
        let Some(choice) = c["choices"].as_array().and_then(|a| a.first()) else {
            continue;
        };
        if choice["index"] != 0 {
            return Err("a choice index other than 0".into());
        }
        let delta = &choice["delta"];
        if let Some(r) = delta.get("role").and_then(Value::as_str) {
            if !message["role"].is_null() {
                return Err("role repeated".into());
            }
            message["role"] = json!(r);
        }
        if let Some(t) = delta.get("content").and_then(Value::as_str) {
            let joined = format!("{}{t}", message["content"].as_str().unwrap_or(""));
            message["content"] = json!(joined);
        }
        if let Some(t) = delta.get("reasoning_content").and_then(Value::as_str) {
            reasoning.push_str(t);
        }
        for call in delta
            .get("tool_calls")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let k = call["index"].as_u64().ok_or("a tool call without index")? as usize;
            let calls = message["tool_calls"].as_array_mut().ok_or("calls")?;
            if k == calls.len() {
                if call["id"].as_str().is_none()
                    || call
                        .pointer("/function/name")
                        .and_then(Value::as_str)
                        .is_none()
                    || call["type"] != "function"
                {
                    return Err(format!("tool call {k} began without id, type or name"));
                }
                calls.push(json!({"id": call["id"], "type": "function", "function": {"name": call["function"]["name"], "arguments": ""}}));
            } else if k > calls.len() {
                return Err(format!("tool call index {k} out of order"));
            } else if call.get("id").is_some() || call.pointer("/function/name").is_some() {
                return Err(format!("tool call {k} repeats its id or name"));
            }
            if let Some(a) = call.pointer("/function/arguments").and_then(Value::as_str) {
                let joined = format!(
                    "{}{a}",
                    calls[k]["function"]["arguments"].as_str().unwrap_or("")
                );
                calls[k]["function"]["arguments"] = json!(joined);
            }
        }
        if let Some(f) = choice.get("finish_reason").and_then(Value::as_str) {
            finish = Some(f.to_owned());
        }
    }
    if !done {
        return Err("no [DONE]".into());
    }
    if !reasoning.is_empty() {
        message["reasoning_content"] = json!(reasoning);
    }
    if message["tool_calls"].as_array().is_some_and(Vec::is_empty) {
        message.as_object_mut().map(|m| m.remove("tool_calls"));
    }
    let (id, model, created) = ids.unwrap_or_default();
    Ok(
        json!({"id": id, "model": model, "created": created, "message": message, "finish_reason": finish, "usage": usage}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::chat::response::completion;
    use crate::adapter::events::message_to_sse;

    fn ctx(include_usage: bool) -> ChatContext {
        ChatContext {
            model: "asked".into(),
            include_usage,
        }
    }

    fn render(events: &str, include_usage: bool) -> Vec<u8> {
        let mut s = ChunkState::new(ctx(include_usage), "chatcmpl-1".into(), 7);
        s.push_sse(events.as_bytes());
        s.end();
        s.take()
    }

    fn sample() -> Value {
        json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "up",
            "content": [{"type": "thinking", "thinking": "let me see", "signature": "sig"},
                {"type": "text", "text": "Reading both."},
                {"type": "tool_use", "id": "toolu_a", "name": "read", "input": {"path": "a.py"}},
                {"type": "tool_use", "id": "toolu_b", "name": "read", "input": {"path": "b.py"}}],
            "stop_reason": "tool_use", "stop_sequence": null,
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 4800, "cache_creation_input_tokens": 0, "output_tokens": 40}})
    }

    #[test]
    fn a_stream_reassembles_to_the_non_streaming_completion() {
        let m = sample();
        let bytes = render(&message_to_sse(&m), true);
        let r = reassemble(&bytes).unwrap();
        let c = completion(&m, &ctx(true), "chatcmpl-1", 7);
        let want = &c["choices"][0]["message"];
        assert_eq!(r["message"]["content"], want["content"]);
        assert_eq!(r["message"]["reasoning_content"], want["reasoning_content"]);
        assert_eq!(r["message"]["tool_calls"], want["tool_calls"]);
        assert_eq!(r["finish_reason"], "tool_calls");
        assert_eq!(r["usage"], c["usage"]);
        assert_eq!(r["usage"]["prompt_tokens_details"]["cached_tokens"], 4800);
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    }

    #[test]
    fn without_include_usage_no_usage_chunk_and_no_usage_fields() {
        let bytes = render(&message_to_sse(&sample()), false);
        let text = String::from_utf8(bytes.clone()).unwrap();
        assert!(!text.contains("\"usage\""), "{text}");
        assert!(reassemble(&bytes).unwrap()["usage"].is_null());
    }

    #[test]
    fn an_error_event_or_a_cut_stream_ends_with_one_error_chunk_and_no_done() {
        let m = message_to_sse(&sample());
        let cut = &m[..m.find("event: message_delta").unwrap()];
        for events in [
            format!(
                "{cut}event: error\ndata: {{\"type\":\"error\",\"error\":{{\"type\":\"overloaded_error\",\"message\":\"Overloaded\"}}}}\n\n"
            ),
            cut.to_owned(),
        ] {
            let text = String::from_utf8(render(&events, true)).unwrap();
            let last = text.trim_end().rsplit("\n\n").next().unwrap();
            let v: Value = serde_json::from_str(last.strip_prefix("data: ").unwrap()).unwrap();
            assert_eq!(v["error"]["type"], "server_error", "{text}");
            assert!(!text.contains("[DONE]"));
            assert!(
                !text.contains("finish_reason\":\"stop"),
                "never a fake stop: {text}"
            );
            assert!(reassemble(text.as_bytes()).is_err());
        }
    }

    #[test]
    fn a_block_index_far_out_of_range_is_not_given_memory() {
        let mut s = ChunkState::new(ctx(false), "c".into(), 1);
        s.push("message_start", &json!({"message": {"usage": {}}}));
        s.push(
            "content_block_start",
            &json!({"index": 4_000_000_000u64, "content_block": {"type": "text"}}),
        );
        assert!(s.blocks.len() < 100);
    }

    #[test]
    fn the_reassembler_rejects_what_clients_mis_read() {
        let ok = String::from_utf8(render(&message_to_sse(&sample()), true)).unwrap();
        assert!(reassemble(ok.as_bytes()).is_ok());
        // A repeated id on a later delta.
        let mut chunks: Vec<Value> = crate::upstream::sse::parse_all(&ok)
            .into_iter()
            .filter_map(|(_, d)| serde_json::from_str(&d).ok())
            .collect();
        let later = chunks
            .iter_mut()
            .rev()
            .find_map(|c| c.pointer_mut("/choices/0/delta/tool_calls/0"))
            .unwrap();
        assert!(later.get("id").is_none());
        later["id"] = json!("toolu_b");
        let bad: String = chunks
            .iter()
            .map(|c| format!("data: {c}\n\n"))
            .collect::<String>()
            + "data: [DONE]\n\n";
        assert!(reassemble(bad.as_bytes()).is_err());
        // A chunk after the usage chunk.
        let lines: Vec<&str> = ok.split("\n\n").filter(|l| !l.is_empty()).collect();
        let n = lines.len();
        let swapped = [&lines[..n - 3], &[lines[n - 2], lines[n - 3], lines[n - 1]]]
            .concat()
            .join("\n\n")
            + "\n\n";
        assert!(reassemble(swapped.as_bytes()).is_err());
    }
}
