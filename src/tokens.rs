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

/// Text beyond this many bytes is not run through the tokenizer: its count is extrapolated from
/// the tokens per byte of the part that was.
pub const MAX_EXACT_BYTES: usize = 1024 * 1024;
/// The tokenizer sees text in slices of at most this many bytes: byte-pair merging is quadratic
/// in the length of one unbroken piece (a long base64 string), and a slice boundary costs at most
/// a token.
const SLICE_BYTES: usize = 8 * 1024;
/// Bytes a token where nothing could be counted exactly (a body too deep or odd for the parser).
const BYTES_PER_TOKEN: usize = 3;

/// Counts the input tokens of a Messages request body (system, messages, tools). Never 0.
pub fn count_request(body: &Value) -> u64 {
    let (text, fixed) = countable(body);
    let counted = count_text(&text) + fixed as u64;
    ((counted as f64 * MARGIN).ceil() as u64).max(1)
}

/// Counts a request body as it arrived. A body the parser refuses although the request check
/// accepted it (nesting past serde_json's limit, a lone surrogate escape, a number out of range)
/// is estimated from its length instead: counting never refuses what `/v1/messages` forwards.
pub fn count_body(raw: &[u8]) -> u64 {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) => count_request(&v),
        Err(_) => (((raw.len() / BYTES_PER_TOKEN) as f64 * MARGIN).ceil() as u64).max(1),
    }
}

/// Counts a request body to decide whether a model can hold it: as [`count_body`], except that a
/// PDF costs what an image does (its real size is unknown without reading it; erring low means
/// at worst one call the provider refuses, erring high a conversation refused for nothing).
pub fn count_to_fit(raw: &[u8]) -> u64 {
    match serde_json::from_slice::<Value>(raw) {
        Ok(v) => {
            let mut text = FitText(String::new());
            let fixed = walk(&v, &mut text);
            let counted = count_text(&text.0) + fixed as u64;
            ((counted as f64 * MARGIN).ceil() as u64).max(1)
        }
        Err(_) => count_body(raw),
    }
}

/// Tokens of `text`: the first [`MAX_EXACT_BYTES`] counted, the rest extrapolated.
fn count_text(text: &str) -> u64 {
    let bpe = tiktoken_rs::o200k_base_singleton();
    let exact = floor_boundary(text, MAX_EXACT_BYTES);
    let mut tokens = 0usize;
    let mut rest = &text[..exact];
    while !rest.is_empty() {
        let cut = slice_end(rest);
        tokens += bpe.encode_ordinary(&rest[..cut]).len();
        rest = &rest[cut..];
    }
    if exact == text.len() || exact == 0 {
        return tokens as u64;
    }
    let per_byte = tokens as f64 / exact as f64;
    tokens as u64 + ((text.len() - exact) as f64 * per_byte).ceil() as u64
}

/// The largest char boundary at or below `at`.
fn floor_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    let mut i = at;
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

/// Where the next slice ends: after the last whitespace within [`SLICE_BYTES`], else at the
/// bound (on a char boundary).
fn slice_end(text: &str) -> usize {
    if text.len() <= SLICE_BYTES {
        return text.len();
    }
    let bound = floor_boundary(text, SLICE_BYTES);
    match text[..bound].rfind(char::is_whitespace) {
        Some(i) if i > 0 => i,
        _ if bound > 0 => bound,
        // One char longer than a slice cannot happen (chars are at most 4 bytes).
        _ => text.len(),
    }
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

    /// The tokens of a PDF of `len` base64 bytes: about 1,500 tokens a page, a page about 3 KB of
    /// base64, which errs high for PDFs with images (right for advice on when to compact).
    fn pdf(&self, len: usize) -> usize {
        (len / 2).max(PER_IMAGE)
    }
}

/// The text for a count that decides whether a model can hold a request (`count_to_fit`): a PDF
/// is charged like an image, erring low, since a wrong refusal costs more than a refused call.
struct FitText(String);

impl Sink for FitText {
    fn add(&mut self, s: &str) {
        self.0.add(s);
    }

    fn pdf(&self, _len: usize) -> usize {
        PER_IMAGE
    }
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
                // A PDF.
                _ => {
                    let len = source
                        .and_then(|s| s.get("data"))
                        .and_then(Value::as_str)
                        .map_or(0, str::len);
                    *fixed += text.pdf(len);
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
    #[test]
    fn a_count_to_fit_charges_a_pdf_like_an_image() {
        let pdf = "JVBERi0xLjcK".repeat(25_000); // 300 KB of base64
        let body = serde_json::json!({"model": "m", "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "base64", "media_type": "application/pdf", "data": pdf}},
            {"type": "text", "text": "summarise"}]}]});
        let raw = serde_json::to_vec(&body).unwrap_or_default();
        assert!(count_body(&raw) > 150_000, "count_tokens errs high");
        assert!(count_to_fit(&raw) < 2_000, "the fit check errs low");
    }

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
    fn long_text_is_counted_in_slices_and_extrapolated_past_the_cap() {
        let words = "the quick brown fox jumps over the lazy dog ".repeat(2_000);
        let whole = bpe_len(&words);
        assert_eq!(count_text(&words), whole as u64, "short text: exact");
        let long = words.repeat((MAX_EXACT_BYTES * 3) / words.len());
        let counted = count_text(&long) as f64;
        let expected = whole as f64 * (long.len() as f64 / words.len() as f64);
        assert!(
            (counted - expected).abs() / expected < 0.02,
            "{counted} vs {expected}"
        );
        // One unbroken piece far longer than a slice (base64 in a tool result): counted in
        // slices, close to the whole-piece count, in bounded work.
        let blob: String = (0..200_000)
            .map(|i| char::from(b'a' + (i * 7 % 26) as u8))
            .collect();
        let sliced = count_text(&blob) as f64;
        let unsliced = bpe_len(&blob[..SLICE_BYTES * 4]) as f64
            * (blob.len() as f64 / (SLICE_BYTES * 4) as f64);
        assert!(
            (sliced - unsliced).abs() / unsliced < 0.05,
            "{sliced} vs {unsliced}"
        );
        // Multi-byte text is cut on char boundaries.
        let cjk = "漢字かな交じり文".repeat(MAX_EXACT_BYTES / 8);
        assert!(count_text(&cjk) > 0);
    }

    fn bpe_len(text: &str) -> usize {
        tiktoken_rs::o200k_base_singleton()
            .encode_ordinary(text)
            .len()
    }

    #[test]
    fn bodies_the_parser_refuses_are_estimated_not_refused() {
        let deep = format!(
            "{{\"model\":\"m\",\"messages\":[{{\"role\":\"user\",\"content\":{}1{}}}]}}",
            "[".repeat(127),
            "]".repeat(127)
        );
        assert!(serde_json::from_str::<Value>(&deep).is_err());
        assert!(count_body(deep.as_bytes()) > 0);
        let surrogate = br#"{"model":"m","messages":[{"role":"user","content":"\ud800 x"}]}"#;
        assert!(count_body(surrogate) > 0);
        let huge =
            br#"{"model":"m","max_tokens":1e400,"messages":[{"role":"user","content":"hi"}]}"#;
        assert!(count_body(huge) > 0);
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
