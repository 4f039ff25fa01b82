//! One pass over a request body that checks its JSON structure, reads its top-level members and,
//! when asked, computes its *signature*: a 128-bit hash of its canonical form (object members in
//! one order whatever their order in the text, whitespace ignored, `1.0` and `1` equal) without
//! `stream` and `max_tokens`, which deduplication and the response cache use as their key.
//!
//! It is a byte scanner, not a parser: strings are skipped with `memchr` and hashed as the text
//! between their quotes, no value is decoded except the few top-level members the balancer reads,
//! and no JSON tree is built. It checks the grammar (brackets, commas, colons, literals, numbers,
//! escapes) and UTF-8; it does not look for raw control characters inside strings, which the
//! provider judges. Two strings spelled with different escapes for the same text hash differently
//! (they only fail to coalesce). Nesting deeper than [`MAX_DEPTH`] is refused.

use std::borrow::Cow;

use serde_json::Value;
use xxhash_rust::xxh3::{xxh3_64, xxh3_128_with_seed};

use crate::adapter::ids::SIGNATURE_PREFIX;

/// Deepest nesting of arrays and objects accepted (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// The JSON kind of a value (enough to validate `messages`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Null,
    Bool,
    Number,
    String,
    Array,
    Object,
}

/// The top level of a request body: the envelope fields and the signature.
#[derive(Debug, Default)]
pub struct Head {
    /// The `model` value, when it is a string.
    pub model: Option<String>,
    /// Whether a `model` member is present at all.
    pub model_present: bool,
    pub messages_kind: Option<Kind>,
    pub stream: Option<bool>,
    pub provider: Option<String>,
    pub metadata: Option<Value>,
    /// Signature without `stream` and `max_tokens` (0 when not asked for).
    pub signature: u128,
    /// The hash of `max_tokens`, when present and signing.
    pub max_tokens: Option<u128>,
    /// Some string value starts with this gateway's thinking-signature prefix (`gw1.`): the body
    /// may hold thinking blocks an Anthropic provider must not see.
    pub gateway_signed: bool,
    /// A top-level member name that appears twice (after decoding escapes), if any: the balancer
    /// and the provider's parser could read different values.
    pub duplicate: Option<String>,
    /// What the request asks for, as far as routing goes (read during the same pass).
    pub shape: Shape,
}

/// What a request asks of a model, read by the scan: enough to check it against a model's
/// capabilities and a route entry's conditions without parsing the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Shape {
    /// `max_tokens` (or `max_completion_tokens`, `max_output_tokens`).
    pub max_tokens: Option<u64>,
    /// A non-empty `tools` (or `functions`) list.
    pub tools: bool,
    /// A `tools` list that is there but empty (Claude Code's side requests send one).
    pub tools_empty: bool,
    /// `thinking` of type `enabled` or `adaptive`, or a `reasoning_effort` other than `none`:
    /// the request asks for thinking.
    pub thinking: bool,
    /// `thinking` of type `enabled` (a budget), or a `reasoning_effort` other than `none`: the
    /// client insists. Adaptive thinking (the model decides) is served by any model.
    pub thinking_budget: bool,
    /// Image parts (`"type": "image"`, `"image_url"` or `"input_image"`).
    pub images: u32,
    /// Bytes of inline media (long `data` or `url` strings: base64 images and documents), which
    /// a size estimate must not count as text.
    pub media_bytes: u64,
    /// The byte range of the top-level `system` value.
    pub system: Option<std::ops::Range<usize>>,
}

/// Inline strings at least this long under `data` or `url` are media, not text.
const MEDIA_BYTES: usize = 1024;

/// A member name as a JSON parser reads it: its escapes decoded, so `"mod\u0065l"` is `model`.
/// `raw` is the text between the quotes. A name that does not decode is returned as written.
pub fn member_name(raw: &[u8]) -> Cow<'_, [u8]> {
    if memchr::memchr(b'\\', raw).is_none() {
        return Cow::Borrowed(raw);
    }
    let mut quoted = Vec::with_capacity(raw.len() + 2);
    quoted.push(b'"');
    quoted.extend_from_slice(raw);
    quoted.push(b'"');
    match serde_json::from_slice::<String>(&quoted) {
        Ok(name) => Cow::Owned(name.into_bytes()),
        Err(_) => Cow::Borrowed(raw),
    }
}

/// Why a body was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanError {
    /// Not JSON: what was expected, and where.
    Syntax(String),
    /// JSON, but a member the balancer reads has the wrong type.
    Data(String),
}

fn leaf(tag: u8, bytes: &[u8]) -> u128 {
    xxh3_128_with_seed(bytes, u64::from(tag))
}

fn hash_u64(n: u64) -> u128 {
    leaf(b'n', &n.to_le_bytes())
}

fn hash_i64(n: i64) -> u128 {
    if n >= 0 {
        hash_u64(n as u64)
    } else {
        leaf(b'i', &n.to_le_bytes())
    }
}

fn hash_f64(f: f64) -> u128 {
    if f.fract() == 0.0 && f.abs() < 1e15 {
        // 1.0 and 1 are the same number to every provider.
        return hash_i64(f as i64);
    }
    leaf(b'f', &f.to_bits().to_le_bytes())
}

/// The hash of a number from its (valid) JSON text.
fn hash_number(text: &[u8]) -> u128 {
    let s = std::str::from_utf8(text).unwrap_or("0");
    if let Ok(u) = s.parse::<u64>() {
        hash_u64(u)
    } else if let Ok(i) = s.parse::<i64>() {
        hash_i64(i)
    } else {
        hash_f64(s.parse::<f64>().unwrap_or(f64::NAN))
    }
}

/// Whether `body` is UTF-8 (fast path first; the position only on failure).
fn check_utf8(body: &[u8]) -> Result<(), ScanError> {
    if simdutf8::basic::from_utf8(body).is_ok() {
        return Ok(());
    }
    let at = std::str::from_utf8(body)
        .err()
        .map_or(0, |e| e.valid_up_to());
    Err(ScanError::Syntax(format!("invalid UTF-8 at byte {at}")))
}

/// Checks and reads a body. `sign`: also compute the signature.
pub fn scan(body: &[u8], sign: bool) -> Result<Head, ScanError> {
    check_utf8(body)?;
    if sign {
        Scanner::<true>::new(body).head_only()
    } else {
        Scanner::<false>::new(body).head_only()
    }
}

/// Whether `body` is one JSON value (any kind), checked as [`scan`] checks a request.
pub fn is_json(body: &[u8]) -> bool {
    let mut s = Scanner::<false>::new(body);
    check_utf8(body).is_ok() && s.value().is_ok() && {
        s.ws();
        s.i == body.len()
    }
}

/// Scanning stopped at `Scanner::i`; the reason is in `Scanner::fail`.
struct Stop;

type Step<T> = Result<T, Stop>;

/// The scanner; `SIGN` decides at compile time whether values are hashed.
struct Scanner<'a, const SIGN: bool> {
    b: &'a [u8],
    i: usize,
    depth: usize,
    fail: &'static str,
    gateway_signed: bool,
    /// The hash of the value just scanned (signing only).
    last: u128,
    /// The text of the last string value scanned (between its quotes).
    last_str: (usize, usize),
    images: u32,
    media_bytes: u64,
    /// Members of the objects being hashed: (key hash, value hash), innermost last.
    members: Vec<(u64, u128)>,
    /// Hash input being assembled for the arrays and objects being hashed, innermost last.
    bytes: Vec<u8>,
}

impl<'a, const SIGN: bool> Scanner<'a, SIGN> {
    fn new(b: &'a [u8]) -> Self {
        Self {
            b,
            i: 0,
            depth: 0,
            fail: "",
            gateway_signed: false,
            last: 0,
            last_str: (0, 0),
            images: 0,
            media_bytes: 0,
            members: Vec::new(),
            bytes: Vec::new(),
        }
    }

    /// The top-level object, then nothing but whitespace.
    fn head_only(mut self) -> Result<Head, ScanError> {
        let head = self.head().and_then(|h| {
            self.ws();
            if self.i < self.b.len() {
                self.stop("trailing characters")
            } else {
                Ok(h)
            }
        });
        head.map_err(|_| self.error())
    }

    #[cold]
    fn stop<T>(&mut self, what: &'static str) -> Step<T> {
        if self.fail.is_empty() {
            self.fail = what;
        }
        Err(Stop)
    }

    #[cold]
    fn error(&self) -> ScanError {
        if let Some(m) = self.fail.strip_prefix("data:") {
            return ScanError::Data(m.to_owned());
        }
        let upto = &self.b[..self.i.min(self.b.len())];
        let line = memchr::memchr_iter(b'\n', upto).count() + 1;
        let column = self.i - memchr::memrchr(b'\n', upto).map_or(0, |n| n + 1) + 1;
        let what = if self.i >= self.b.len() {
            "EOF while parsing a value"
        } else {
            self.fail
        };
        ScanError::Syntax(format!("{what} at line {line} column {column}"))
    }

    #[inline]
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.b.get(self.i) {
            self.i += 1;
        }
    }

    #[inline]
    fn expect(&mut self, c: u8, what: &'static str) -> Step<()> {
        self.ws();
        if self.b.get(self.i) == Some(&c) {
            self.i += 1;
            Ok(())
        } else {
            self.stop(what)
        }
    }

    /// The next `"` or `\` at or after `from`: eight bytes at a time for the short strings that
    /// most keys and values are, `memchr2` beyond.
    #[inline(always)]
    fn quote_or_escape(&self, from: usize) -> Option<usize> {
        const ONES: u64 = 0x0101_0101_0101_0101;
        const HIGH: u64 = 0x8080_8080_8080_8080;
        // High bit set in each byte of `x` equal to `c` (the lowest one exactly; enough here).
        let matches = |x: u64, c: u8| {
            let y = x ^ (ONES * u64::from(c));
            y.wrapping_sub(ONES) & !y & HIGH
        };
        let b = self.b;
        let mut at = from;
        for _ in 0..4 {
            let Some(word) = b.get(at..at + 8) else { break };
            let mut w = [0u8; 8];
            w.copy_from_slice(word);
            let x = u64::from_le_bytes(w);
            let m = matches(x, b'"') | matches(x, b'\\');
            if m != 0 {
                return Some(at + (m.trailing_zeros() / 8) as usize);
            }
            at += 8;
        }
        memchr::memchr2(b'"', b'\\', b.get(at..)?).map(|k| at + k)
    }

    /// A string at `self.i` (its opening quote); returns the range of its text between the quotes.
    #[inline(always)]
    fn string(&mut self) -> Step<(usize, usize)> {
        if self.b.get(self.i) != Some(&b'"') {
            return self.stop("expected a string");
        }
        let start = self.i + 1;
        let mut from = start;
        loop {
            let Some(j) = self.quote_or_escape(from) else {
                self.i = self.b.len();
                return self.stop("EOF while parsing a string");
            };
            if self.b[j] == b'"' {
                self.i = j + 1;
                return Ok((start, j));
            }
            match self.b.get(j + 1) {
                Some(b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => from = j + 2,
                Some(b'u')
                    if self
                        .b
                        .get(j + 2..j + 6)
                        .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) =>
                {
                    from = j + 6
                }
                _ => {
                    self.i = j;
                    return self.stop("invalid escape");
                }
            }
        }
    }

    fn number(&mut self) -> Step<u128> {
        let b = self.b;
        let start = self.i;
        let mut i = start;
        let digits = |i: &mut usize| {
            let from = *i;
            while b.get(*i).is_some_and(u8::is_ascii_digit) {
                *i += 1;
            }
            *i > from
        };
        if b.get(i) == Some(&b'-') {
            i += 1;
        }
        let ok = match b.get(i) {
            Some(b'0') => {
                i += 1;
                true
            }
            Some(b'1'..=b'9') => digits(&mut i),
            _ => false,
        } && (b.get(i) != Some(&b'.') || {
            i += 1;
            digits(&mut i)
        }) && (!matches!(b.get(i), Some(b'e' | b'E')) || {
            i += 1;
            if matches!(b.get(i), Some(b'+' | b'-')) {
                i += 1;
            }
            digits(&mut i)
        });
        self.i = i;
        if !ok {
            return self.stop("invalid number");
        }
        Ok(if SIGN { hash_number(&b[start..i]) } else { 0 })
    }

    #[inline]
    fn literal(&mut self, word: &[u8], hash: impl FnOnce() -> u128) -> Step<u128> {
        if self.b.get(self.i..self.i + word.len()) == Some(word) {
            self.i += word.len();
            Ok(if SIGN { hash() } else { 0 })
        } else {
            self.stop("expected value")
        }
    }

    /// A value at `self.i` (after whitespace); returns its kind and, signing, leaves its hash in
    /// `self.last`.
    fn value(&mut self) -> Step<Kind> {
        self.ws();
        let (h, kind) = match self.b.get(self.i) {
            Some(b'"') => {
                let (s, e) = self.string()?;
                self.gateway_signed |= self.b[s..e].starts_with(SIGNATURE_PREFIX.as_bytes());
                self.last_str = (s, e);
                let h = if SIGN { leaf(b's', &self.b[s..e]) } else { 0 };
                (h, Kind::String)
            }
            Some(b'{') => (self.object()?, Kind::Object),
            Some(b'[') => (self.array()?, Kind::Array),
            Some(b't') => (self.literal(b"true", || leaf(b'b', &[1]))?, Kind::Bool),
            Some(b'f') => (self.literal(b"false", || leaf(b'b', &[0]))?, Kind::Bool),
            Some(b'n') => (self.literal(b"null", || leaf(b'z', b""))?, Kind::Null),
            Some(b'-' | b'0'..=b'9') => (self.number()?, Kind::Number),
            _ => return self.stop("expected value"),
        };
        if SIGN {
            self.last = h;
        }
        Ok(kind)
    }

    fn enter(&mut self) -> Step<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return self.stop("recursion limit exceeded");
        }
        self.i += 1;
        self.ws();
        Ok(())
    }

    fn array(&mut self) -> Step<u128> {
        self.enter()?;
        let mark = self.bytes.len();
        if self.b.get(self.i) == Some(&b']') {
            self.i += 1;
        } else {
            loop {
                self.value()?;
                if SIGN {
                    self.bytes.extend_from_slice(&self.last.to_le_bytes());
                }
                self.ws();
                match self.b.get(self.i) {
                    Some(b',') => self.i += 1,
                    Some(b']') => {
                        self.i += 1;
                        break;
                    }
                    _ => return self.stop("expected `,` or `]`"),
                }
            }
        }
        self.depth -= 1;
        if !SIGN {
            return Ok(0);
        }
        let h = xxh3_128_with_seed(&self.bytes[mark..], u64::from(b'['));
        self.bytes.truncate(mark);
        Ok(h)
    }

    /// After a member: `true` when another follows, `false` at the closing brace.
    #[inline]
    fn next_member(&mut self) -> Step<bool> {
        self.ws();
        match self.b.get(self.i) {
            Some(b',') => {
                self.i += 1;
                self.ws();
                Ok(true)
            }
            Some(b'}') => {
                self.i += 1;
                Ok(false)
            }
            _ => self.stop("expected `,` or `}`"),
        }
    }

    /// Notes a member whose value is the string just scanned: an image part, inline media.
    #[inline]
    fn note(&mut self, ks: usize, ke: usize) {
        let (s, e) = self.last_str;
        match &self.b[ks..ke] {
            b"type" => {
                if matches!(&self.b[s..e], b"image" | b"image_url" | b"input_image") {
                    self.images += 1;
                }
            }
            b"data" | b"url" | b"image_url" | b"file_data" if e - s >= MEDIA_BYTES => {
                self.media_bytes += (e - s) as u64;
            }
            _ => {}
        }
    }

    fn object(&mut self) -> Step<u128> {
        self.enter()?;
        let mark = self.members.len();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
        } else {
            loop {
                let (ks, ke) = self.string()?;
                self.expect(b':', "expected `:`")?;
                if self.value()? == Kind::String {
                    self.note(ks, ke);
                }
                if SIGN {
                    self.members.push((xxh3_64(&self.b[ks..ke]), self.last));
                }
                if !self.next_member()? {
                    break;
                }
            }
        }
        self.depth -= 1;
        Ok(if SIGN { self.hash_members(mark) } else { 0 })
    }

    /// The hash of the object whose members are `self.members[mark..]`, in any order; pops them.
    /// The canonical order is that of the (key hash, value hash) pairs: comparing two integers is
    /// far cheaper than comparing the keys' text, and equal members still sort next to each other.
    fn hash_members(&mut self, mark: usize) -> u128 {
        let members = &mut self.members[mark..];
        members.sort_unstable();
        let at = self.bytes.len();
        for &(k, h) in members.iter() {
            self.bytes.extend_from_slice(&k.to_le_bytes());
            self.bytes.extend_from_slice(&h.to_le_bytes());
        }
        let h = xxh3_128_with_seed(&self.bytes[at..], u64::from(b'{'));
        self.bytes.truncate(at);
        self.members.truncate(mark);
        h
    }

    /// The top-level object.
    fn head(&mut self) -> Step<Head> {
        self.ws();
        match self.b.get(self.i) {
            Some(b'{') => {}
            Some(_) => {
                // Valid JSON of another kind is a data error, anything else a syntax error.
                self.value()?;
                return self.stop("data:the request body must be a JSON object");
            }
            None => return self.stop("EOF while parsing a value"),
        }
        self.enter()?;
        let mut head = Head::default();
        let mut names: Vec<Cow<'a, [u8]>> = Vec::new();
        if self.b.get(self.i) == Some(&b'}') {
            self.i += 1;
            return Ok(head);
        }
        loop {
            let (ks, ke) = self.string()?;
            self.expect(b':', "expected `:`")?;
            self.ws();
            let start = self.i;
            let kind = self.value()?;
            let h = self.last;
            let b = self.b;
            let text = &b[start..self.i];
            let mut keep = true;
            let name = member_name(&b[ks..ke]);
            if head.duplicate.is_none() && names.contains(&name) {
                head.duplicate = Some(String::from_utf8_lossy(&name).into_owned());
            }
            match &*name {
                b"stream" => {
                    head.stream = match serde_json::from_slice::<Option<bool>>(text) {
                        Ok(v) => v,
                        Err(_) => return self.stop("data:stream: expected a boolean"),
                    };
                    keep = false;
                }
                b"max_tokens" => {
                    head.max_tokens = SIGN.then_some(h);
                    head.shape.max_tokens = serde_json::from_slice(text).ok();
                    keep = false;
                }
                b"max_completion_tokens" | b"max_output_tokens" => {
                    head.shape.max_tokens = serde_json::from_slice(text).ok();
                }
                b"tools" | b"functions" if kind == Kind::Array => {
                    let empty = text[1..]
                        .iter()
                        .find(|c| !c.is_ascii_whitespace())
                        .is_none_or(|&c| c == b']');
                    head.shape.tools |= !empty;
                    head.shape.tools_empty |= empty && &*name == b"tools";
                }
                b"thinking" => {
                    #[derive(serde::Deserialize)]
                    struct Thinking<'t> {
                        #[serde(borrow, rename = "type")]
                        kind: Option<&'t str>,
                    }
                    let kind = serde_json::from_slice::<Thinking>(text)
                        .ok()
                        .and_then(|t| t.kind);
                    head.shape.thinking |= matches!(kind, Some("enabled" | "adaptive"));
                    head.shape.thinking_budget |= kind == Some("enabled");
                }
                b"reasoning_effort" => {
                    let on = kind == Kind::String && &text[1..text.len() - 1] != b"none";
                    head.shape.thinking |= on;
                    head.shape.thinking_budget |= on;
                }
                b"system" => head.shape.system = Some(start..self.i),
                b"model" => {
                    head.model_present = true;
                    head.model = decode_string(text, kind);
                }
                b"provider" => head.provider = decode_string(text, kind),
                b"metadata" => head.metadata = serde_json::from_slice(text).ok(),
                b"messages" => head.messages_kind = Some(kind),
                _ => {}
            }
            if SIGN && keep {
                self.members.push((xxh3_64(&b[ks..ke]), h));
            }
            names.push(name);
            if !self.next_member()? {
                break;
            }
        }
        self.depth -= 1;
        if SIGN {
            head.signature = self.hash_members(0);
        }
        head.gateway_signed = self.gateway_signed;
        head.shape.images = self.images;
        head.shape.media_bytes = self.media_bytes;
        Ok(head)
    }
}

/// The text of a JSON string value (escapes decoded); `None` for any other kind.
fn decode_string(text: &[u8], kind: Kind) -> Option<String> {
    if kind != Kind::String {
        return None;
    }
    serde_json::from_slice::<String>(text).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn syntax(body: &str) -> String {
        match scan(body.as_bytes(), true) {
            Err(ScanError::Syntax(m)) => m,
            other => panic!("{body}: {other:?}"),
        }
    }

    #[test]
    fn the_scan_reads_what_a_request_asks_of_a_model() {
        let big = "A".repeat(2000);
        let body = format!(
            r#"{{"model":"m","max_tokens":32000,"system":[{{"type":"text","text":"sys"}}],
            "thinking":{{"type":"adaptive"}},"tools":[ {{"name":"t"}} ],
            "messages":[{{"role":"user","content":[{{"type":"image","source":{{"type":"base64","media_type":"image/png","data":"{big}"}}}},
            {{"type":"text","text":"image"}}]}}]}}"#
        );
        for sign in [true, false] {
            let s = scan(body.as_bytes(), sign).unwrap().shape;
            assert_eq!(s.max_tokens, Some(32000));
            assert!(s.tools && s.thinking);
            assert_eq!(s.images, 1, "a text \"image\" is no image part");
            assert_eq!(s.media_bytes, 2000);
            let sys = &body.as_bytes()[s.system.clone().unwrap()];
            assert_eq!(sys, br#"[{"type":"text","text":"sys"}]"#);
        }
        let chat = br#"{"model":"m","max_completion_tokens":5,"reasoning_effort":"low","tools":[],
            "messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://x/y.png"}}]}]}"#;
        let s = scan(chat, false).unwrap().shape;
        assert_eq!(
            (s.max_tokens, s.thinking, s.tools, s.images, s.media_bytes),
            (Some(5), true, false, 1, 0)
        );
        let off = br#"{"model":"m","thinking":{"type":"disabled"},"reasoning_effort":"none","messages":[]}"#;
        let s = scan(off, false).unwrap().shape;
        assert!(!s.thinking);
        assert_eq!(s.system, None);
    }

    #[test]
    fn member_names_are_read_with_their_escapes_decoded() {
        assert_eq!(&*member_name(b"model"), b"model");
        assert_eq!(&*member_name(br"mod\u0065l"), b"model");
        assert_eq!(&*member_name(br"a\\b"), br"a\b");
        assert_eq!(
            &*member_name(br"\ud800"),
            br"\ud800",
            "undecodable: as written"
        );
        let head = scan(br#"{"model":"a","m\u006fdel":"b","messages":[]}"#, true).unwrap();
        assert_eq!(head.duplicate.as_deref(), Some("model"));
        assert_eq!(
            head.model.as_deref(),
            Some("b"),
            "the last one, as serde_json reads it"
        );
        let head = scan(br#"{"str\u0065am":true,"messages":[]}"#, false).unwrap();
        assert_eq!((head.stream, head.duplicate), (Some(true), None));
    }

    #[test]
    fn accepts_what_serde_json_accepts() {
        for body in [
            r#"{}"#,
            r#" { "a" : [ 1 , -2.5e+3 , 0 , 0.0 , 1E9 , true , false , null , "x\"y\\z\u00e9\n" , { } , [ ] ] } "#,
            r#"{"model":"m","messages":[{"role":"user","content":"héllo ✓"}]}"#,
        ] {
            assert!(serde_json::from_str::<Value>(body).is_ok());
            assert!(scan(body.as_bytes(), true).is_ok(), "{body}");
            assert!(scan(body.as_bytes(), false).is_ok(), "{body}");
        }
    }

    #[test]
    fn refuses_what_serde_json_refuses() {
        for body in [
            "",
            "{",
            r#"{"a"}"#,
            r#"{"a":}"#,
            r#"{"a":1,}"#,
            r#"{"a":[1,]}"#,
            r#"{"a":[1 2]}"#,
            r#"{"a":tru}"#,
            r#"{"a":01}"#,
            r#"{"a":1.}"#,
            r#"{"a":-}"#,
            r#"{"a":.5}"#,
            r#"{"a":+1}"#,
            r#"{"a":"\x"}"#,
            r#"{"a":"\u12g4"}"#,
            r#"{"a":"open}"#,
            r#"{"a":[}"#,
            r#"{"a":1} x"#,
            r#"{a:1}"#,
        ] {
            assert!(serde_json::from_str::<Value>(body).is_err(), "{body}");
            assert!(scan(body.as_bytes(), true).is_err(), "{body}");
            assert!(scan(body.as_bytes(), false).is_err(), "{body}");
        }
        assert!(scan(b"{\"a\":\"\xff\"}", false).is_err());
        assert!(
            is_json(b" [1, {}] ") && is_json(b"\"s\"") && !is_json(b"[1] [2]") && !is_json(b"")
        );
        let deep = format!("{{\"a\":{}{}}}", "[".repeat(200), "]".repeat(200));
        assert!(syntax(&deep).contains("recursion limit"));
    }

    #[test]
    fn errors_say_where() {
        assert_eq!(
            syntax("{\"a\":1,\n  \"b\" 2}"),
            "expected `:` at line 2 column 7"
        );
        assert_eq!(
            syntax(r#"{"a":"#),
            "EOF while parsing a value at line 1 column 6"
        );
        assert!(matches!(scan(b"[1]", false), Err(ScanError::Data(_))));
        assert!(matches!(
            scan(br#"{"stream":"yes"}"#, false),
            Err(ScanError::Data(_))
        ));
    }

    #[test]
    fn reads_the_top_level() {
        let h = scan(
            br#"{"model":"cl\u0061ude","provider":"P","stream":true,"messages":[],"metadata":{"user_id":"u"},"x":{"model":"inner"}}"#,
            false,
        )
        .unwrap();
        assert_eq!(h.model.as_deref(), Some("claude"));
        assert_eq!(h.provider.as_deref(), Some("P"));
        assert_eq!(h.stream, Some(true));
        assert_eq!(h.messages_kind, Some(Kind::Array));
        assert_eq!(h.metadata, Some(serde_json::json!({"user_id": "u"})));
        assert_eq!((h.signature, h.max_tokens), (0, None));
        assert!(!h.gateway_signed);
        let signed = br#"{"messages":[{"content":[{"type":"thinking","signature":"gw1.abc"}]}]}"#;
        assert!(scan(signed, false).unwrap().gateway_signed);
        let h = scan(br#"{"model":5,"messages":{}}"#, true).unwrap();
        assert!(h.model_present && h.model.is_none());
        assert_eq!(h.messages_kind, Some(Kind::Object));
    }

    #[test]
    fn nested_hashes_are_order_free_and_distinct() {
        let sig = |b: &str| scan(b.as_bytes(), true).unwrap().signature;
        assert_eq!(
            sig(r#"{"a":{"x":[1,{"p":1,"q":2}],"y":null}}"#),
            sig(r#"{"a":{"y":null,"x":[1.0,{"q":2,"p":1}]}}"#)
        );
        for other in [
            r#"{"a":{"x":[{"p":1,"q":2},1],"y":null}}"#,
            r#"{"a":{"x":[1,{"p":2,"q":1}],"y":null}}"#,
            r#"{"a":{"x":[1,{"p":1,"q":2}]}}"#,
            r#"{"a":{"x":[1,{"p":1,"q":2}],"y":false}}"#,
            r#"{"a":{"x":["1",{"p":1,"q":2}],"y":null}}"#,
            r#"{"a":{"x":[[1],{"p":1,"q":2}],"y":null}}"#,
            r#"{"a":{"x":[1,{"p":1,"p":1,"q":2}],"y":null}}"#,
            r#"{"a":{"x":[1,{"p":1,"q":2}],"y":null,"z":{}}}"#,
        ] {
            assert_ne!(
                sig(other),
                sig(r#"{"a":{"x":[1,{"p":1,"q":2}],"y":null}}"#),
                "{other}"
            );
        }
    }
}
