//! Local token counting, for `count_tokens` when no provider answers it.
//!
//! Claude's tokenizer is not public. We count with OpenAI's `o200k_base` BPE (shipped inside
//! tiktoken-rs, no download) and add a 15 % margin, because Claude's tokenizer produces more
//! tokens for the same text and Claude Code compacts late when a count is low (the protocol
//! reference's count_tokens-in-practice notes: err high).

use serde_json::Value;

/// Margin over the o200k count.
const MARGIN: f64 = 1.15;
/// Per message: role and framing.
const PER_MESSAGE: usize = 4;
/// Per tool definition: framing around name, description and schema.
const PER_TOOL: usize = 12;
/// An image of unknown size (Anthropic: about width*height/750, up to ~1600 for large images).
const PER_IMAGE: usize = 1600;

/// Counts the input tokens of a Messages request body (system, messages, tools). Never 0.
pub fn count_request(body: &Value) -> u64 {
    let (text, fixed) = countable(body);
    let bpe = tiktoken_rs::o200k_base_singleton();
    let counted = bpe.encode_ordinary(&text).len() + fixed;
    ((counted as f64 * MARGIN).ceil() as u64).max(1)
}

/// A cheap estimate (about four bytes a token) for `message_start` and missing usage, where
/// running the tokenizer over every request would cost more than the rest of the conversion.
pub fn estimate_request(body: &Value) -> u64 {
    let mut len = Length(0);
    let fixed = walk(body, &mut len);
    ((len.0 / 4 + fixed) as u64).max(1)
}

/// Where countable text goes: the text itself (for the tokenizer) or only its length.
trait Sink {
    fn add(&mut self, s: &str);
}

impl Sink for String {
    fn add(&mut self, s: &str) {
        self.push_str(s);
        self.push('\n');
    }
}

/// Counts the bytes [`countable`] would collect, without collecting them.
struct Length(usize);

impl Sink for Length {
    fn add(&mut self, s: &str) {
        self.0 += s.len() + 1;
    }
}

/// The countable text of a request, and the tokens counted without text (framing, images).
fn countable(body: &Value) -> (String, usize) {
    let mut text = String::new();
    let fixed = walk(body, &mut text);
    (text, fixed)
}

/// Feeds the countable text of a request to `text`; returns the tokens counted without text.
fn walk(body: &Value, text: &mut impl Sink) -> usize {
    let mut fixed = 0usize;
    if let Some(system) = body.get("system") {
        collect_content(system, text, &mut fixed);
    }
    if let Some(messages) = body.get("messages").and_then(Value::as_array) {
        for m in messages {
            fixed += PER_MESSAGE;
            if let Some(content) = m.get("content") {
                collect_content(content, text, &mut fixed);
            }
        }
    }
    if let Some(tools) = body.get("tools").and_then(Value::as_array) {
        for t in tools {
            fixed += PER_TOOL;
            for key in ["name", "description"] {
                if let Some(s) = t.get(key).and_then(Value::as_str) {
                    text.add(s);
                }
            }
            if let Some(schema) = t.get("input_schema") {
                text.add(&schema.to_string());
            }
        }
    }
    fixed
}

/// Adds the countable text of a content value (a string or a list of blocks).
fn collect_content(content: &Value, text: &mut impl Sink, fixed: &mut usize) {
    match content {
        Value::String(s) => text.add(s),
        Value::Array(blocks) => {
            for b in blocks {
                collect_block(b, text, fixed);
            }
        }
        _ => {}
    }
}

fn collect_block(block: &Value, text: &mut impl Sink, fixed: &mut usize) {
    let kind = block.get("type").and_then(Value::as_str).unwrap_or("");
    match kind {
        "text" => {
            if let Some(s) = block.get("text").and_then(Value::as_str) {
                text.add(s);
            }
        }
        "thinking" => {
            if let Some(s) = block.get("thinking").and_then(Value::as_str) {
                text.add(s);
            }
        }
        "image" => *fixed += PER_IMAGE,
        "tool_use" | "server_tool_use" => {
            if let Some(s) = block.get("name").and_then(Value::as_str) {
                text.add(s);
            }
            if let Some(input) = block.get("input") {
                text.add(&input.to_string());
            }
        }
        "tool_result" => {
            if let Some(c) = block.get("content") {
                collect_content(c, text, fixed);
            }
        }
        "document" => {
            let source = block.get("source");
            match source.and_then(|s| s.get("type")).and_then(Value::as_str) {
                Some("text") => {
                    if let Some(s) = source.and_then(|s| s.get("data")).and_then(Value::as_str) {
                        text.add(s);
                    }
                }
                Some("content") => {
                    if let Some(c) = source.and_then(|s| s.get("content")) {
                        collect_content(c, text, fixed);
                    }
                }
                // A PDF: about 1,500 tokens a page, a page about 3 KB of base64.
                _ => {
                    let len = source
                        .and_then(|s| s.get("data"))
                        .and_then(Value::as_str)
                        .map_or(0, str::len);
                    *fixed += (len / 2).max(PER_IMAGE);
                }
            }
        }
        _ => {
            // Unknown blocks: count their JSON, which errs high.
            text.add(&block.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_estimate_counts_the_same_text_as_the_tokenizer_sees() {
        let body = json!({"system":"be brief","tools":[{"name":"Bash","description":"run","input_schema":{"type":"object"}}],
            "messages":[{"role":"user","content":[{"type":"text","text":"héllo ".repeat(40)},{"type":"image","source":{}}]},
                        {"role":"assistant","content":[{"type":"tool_use","id":"t","name":"Bash","input":{"cmd":"ls"}}]}]});
        let (text, fixed) = countable(&body);
        assert!(fixed > PER_IMAGE && text.len() > 240);
        assert_eq!(
            estimate_request(&body),
            ((text.len() / 4 + fixed) as u64).max(1)
        );
    }

    #[test]
    fn counts_grow_with_content_and_are_never_zero() {
        let empty = count_request(&json!({"model":"m","messages":[]}));
        assert!(empty >= 1);
        let small = count_request(&json!({"messages":[{"role":"user","content":"hello"}]}));
        let big =
            count_request(&json!({"messages":[{"role":"user","content":"hello ".repeat(1000)}]}));
        assert!(small > empty);
        // 1000 repetitions of "hello " are about 1000 tokens (plus the margin).
        assert!((1000..1400).contains(&big), "{big}");
    }

    #[test]
    fn system_tools_images_and_tool_results_count() {
        let base = json!({"messages":[{"role":"user","content":"hi"}]});
        let with_system = json!({"system":[{"type":"text","text":"You are a careful assistant. ".repeat(50)}],"messages":[{"role":"user","content":"hi"}]});
        let with_tools = json!({"messages":[{"role":"user","content":"hi"}],"tools":[{"name":"Bash","description":"Run a command","input_schema":{"type":"object","properties":{"command":{"type":"string"}}}}]});
        let with_image = json!({"messages":[{"role":"user","content":[{"type":"image","source":{"type":"base64","media_type":"image/png","data":"AAAA"}}]}]});
        let with_result = json!({"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t","content":"line\n".repeat(100)}]}]});
        let b = count_request(&base);
        for v in [with_system, with_tools, with_image, with_result] {
            assert!(count_request(&v) > b + 10, "{v}");
        }
    }
}
