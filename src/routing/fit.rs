//! Fit: what a request needs ([`Needs`]), what a candidate's model can take ([`Capabilities`],
//! from the route entry, the `models:` table and the shipped defaults of common families), whether
//! one holds the other ([`check`]), and a route entry's `when:` conditions ([`hold`]).
//!
//! Pure: no I/O. The request's size is estimated from its bytes (media left out); only when that
//! estimate is near a limit is the local tokenizer run, once per request.

use std::sync::OnceLock;

use bytes::Bytes;
use http::HeaderMap;
use regex::{Regex, RegexSet};

use crate::config::{Capabilities, Conditions, ModelConfig};
use crate::inbound::canonical::Shape;

/// Tokens counted for one image (Anthropic: about width × height / 750, at most about 1600).
const PER_IMAGE: u64 = 1600;

const fn caps(window: u64, output: u64, images: bool, tools: bool, thinking: bool) -> Capabilities {
    Capabilities {
        context_window: if window == 0 { None } else { Some(window) },
        max_output_tokens: if output == 0 { None } else { Some(output) },
        images: Some(images),
        tools: Some(tools),
        thinking: Some(thinking),
    }
}

/// The shipped capabilities of common model families, by upstream model glob (case-insensitive;
/// a leading `*` also takes a vendor prefix such as `openai/` or `deepseek-ai/`). The first match
/// wins; `0` is "not stated". A model no entry matches is assumed able and unbounded. From the
/// vendors' model pages (December 2026); `models:` in the configuration overrides any field.
#[rustfmt::skip]
pub const DEFAULTS: &[(&str, Capabilities)] = &[
    //                                  window     output   images tools thinking
    // Claude: 200k (1M with the `context-1m` beta, see `Needs::context_1m`). Models newer than
    // these may have larger windows: only their abilities are stated. `?` takes `4-5` and
    // OpenRouter's `4.5` alike.
    ("*claude-opus-4?5*",       caps(200_000,    64_000, true,  true,  true)),
    ("*claude-opus-4?1*",       caps(200_000,    32_000, true,  true,  true)),
    ("*claude-opus-4?0*",       caps(200_000,    32_000, true,  true,  true)),
    ("*claude-opus-4-2025*",    caps(200_000,    32_000, true,  true,  true)),
    ("*claude-opus-4",          caps(200_000,    32_000, true,  true,  true)),
    ("*claude-sonnet-4?5*",     caps(200_000,    64_000, true,  true,  true)),
    ("*claude-sonnet-4?0*",     caps(200_000,    64_000, true,  true,  true)),
    ("*claude-sonnet-4-2025*",  caps(200_000,    64_000, true,  true,  true)),
    ("*claude-sonnet-4",        caps(200_000,    64_000, true,  true,  true)),
    ("*claude-haiku-4?5*",      caps(200_000,    64_000, true,  true,  true)),
    ("*claude-3?7-sonnet*",     caps(200_000,    64_000, true,  true,  true)),
    ("*claude-3?5-sonnet*",     caps(200_000,     8_192, true,  true,  false)),
    ("*claude-3?5-haiku*",      caps(200_000,     8_192, true,  true,  false)),
    ("*claude-3-haiku*",        caps(200_000,     4_096, true,  true,  false)),
    ("*claude-*",               caps(0,               0, true,  true,  true)),
    // OpenAI.
    ("*gpt-4.1*",               caps(1_047_576,  32_768, true,  true,  false)),
    ("*gpt-5*-chat*",           caps(128_000,    16_384, true,  true,  false)),
    ("*gpt-5*",                 caps(400_000,   128_000, true,  true,  true)),
    ("*gpt-4o*",                caps(128_000,    16_384, true,  true,  false)),
    ("*gpt-oss*",               caps(131_072,    32_768, false, true,  true)),
    ("o1-mini*",                caps(128_000,    65_536, false, false, true)),
    ("*/o1-mini*",              caps(128_000,    65_536, false, false, true)),
    ("o3-mini*",                caps(200_000,   100_000, false, true,  true)),
    ("*/o3-mini*",              caps(200_000,   100_000, false, true,  true)),
    ("o1",                      caps(200_000,   100_000, true,  true,  true)),
    ("o1-*",                    caps(200_000,   100_000, true,  true,  true)),
    ("*/o1",                    caps(200_000,   100_000, true,  true,  true)),
    ("*/o1-*",                  caps(200_000,   100_000, true,  true,  true)),
    ("o3",                      caps(200_000,   100_000, true,  true,  true)),
    ("o3-*",                    caps(200_000,   100_000, true,  true,  true)),
    ("*/o3",                    caps(200_000,   100_000, true,  true,  true)),
    ("*/o3-*",                  caps(200_000,   100_000, true,  true,  true)),
    ("o4-mini*",                caps(200_000,   100_000, true,  true,  true)),
    ("*/o4-mini*",              caps(200_000,   100_000, true,  true,  true)),
    // DeepSeek.
    ("*deepseek-reasoner*",     caps(128_000,    65_536, false, true,  true)),
    ("*deepseek-r1*",           caps(128_000,    32_768, false, true,  true)),
    ("*deepseek-chat*",         caps(128_000,     8_192, false, true,  false)),
    ("*deepseek-v3*",           caps(128_000,     8_192, false, true,  false)),
    // Qwen.
    ("*qwen*-vl*",              caps(131_072,     8_192, true,  true,  false)),
    ("*qwen3-coder*",           caps(262_144,    65_536, false, true,  false)),
    ("*qwq*",                   caps(131_072,    32_768, false, true,  true)),
    // Qwen3 windows run from 32k to 256k by size and release: the largest, so none is refused.
    ("*qwen3*",                 caps(262_144,    32_768, false, true,  true)),
    ("*qwen2.5*",               caps(131_072,     8_192, false, true,  false)),
    // Llama.
    ("*llama-4*",               caps(1_048_576,       0, true,  true,  false)),
    ("*llama-3.2*vision*",      caps(131_072,         0, true,  false, false)),
    ("*llama-3*",               caps(131_072,         0, false, true,  false)),
    // Gemini through OpenAI-compatible endpoints.
    ("*gemini-1.5*",            caps(1_048_576,   8_192, true,  true,  false)),
    ("*gemini-2.0*",            caps(1_048_576,   8_192, true,  true,  false)),
    ("*gemini-*",               caps(1_048_576,  65_536, true,  true,  true)),
];

/// Upstream model name → capabilities: the `models:` table, then [`DEFAULTS`], field by field
/// (a field one entry leaves out is taken from the next matching one).
#[derive(Debug)]
pub struct ModelTable {
    set: RegexSet,
    caps: Vec<Capabilities>,
}

impl ModelTable {
    pub fn new(configured: &[ModelConfig]) -> Self {
        let entries: Vec<(&str, Capabilities)> = configured
            .iter()
            .map(|m| (m.pattern.as_str(), m.capabilities))
            .chain(DEFAULTS.iter().map(|(p, c)| (*p, *c)))
            .collect();
        let patterns: Vec<String> = entries
            .iter()
            .map(|(p, _)| super::glob_pattern(p))
            .collect();
        // Every glob compiles (glob_pattern escapes all but `*` and `?`); an empty set matches nothing.
        let set = RegexSet::new(&patterns).unwrap_or_else(|_| RegexSet::empty());
        Self {
            set,
            caps: entries.into_iter().map(|(_, c)| c).collect(),
        }
    }

    /// The capabilities of `model`, each field from the first matching entry that states it.
    pub fn lookup(&self, model: &str) -> Capabilities {
        let mut out = Capabilities::default();
        for i in self.set.matches(model).iter() {
            out = out.or(self.caps[i]);
        }
        out
    }
}

/// What kind of request Claude Code made (see [`classify`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestKind {
    /// The main conversation (or any client that is not Claude Code).
    Main,
    /// A small side request: a title, a topic check, a summary.
    Background,
    /// A request of a subagent the Task tool started.
    Subagent,
}

impl RequestKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RequestKind::Main => "main",
            RequestKind::Background => "background",
            RequestKind::Subagent => "subagent",
        }
    }
}

/// Claude Code's first system block: `x-anthropic-billing-header: cc_version=…; cc_entrypoint=…;`.
const BILLING_HEADER: &[u8] = b"x-anthropic-billing-header:";
/// Added to the billing header in a subagent's requests.
const SUBAGENT_MARK: &[u8] = b"cc_is_subagent=true";
/// Only the start of the system prompt is searched: the billing header is its first block.
const HEAD_BYTES: usize = 512;

/// The kind of a Claude Code request, from what the real CLI sends (recorded from 2.1.197 and
/// 2.1.332, `tests/fixtures/claude-code/`), never from the model name, which users map freely:
/// - a subagent's requests carry `x-claude-code-agent-id` and `cc_is_subagent=true` in the
///   billing header (the first system block);
/// - side requests (session titles, WebFetch summaries) are Claude Code's (the billing header)
///   with an empty `tools` list, where the main loop and subagents always send their tools;
/// - anything else is `Main`, as is every request of another client.
///
/// `agent_header`: the request has `x-claude-code-agent-id`.
pub fn classify(body: &[u8], shape: &Shape, agent_header: bool) -> RequestKind {
    if agent_header {
        return RequestKind::Subagent;
    }
    let Some(range) = shape.system.clone() else {
        return RequestKind::Main;
    };
    let Some(system) = body.get(range.start..range.end.min(range.start + HEAD_BYTES)) else {
        return RequestKind::Main;
    };
    let Some(at) = memchr::memmem::find(system, BILLING_HEADER) else {
        return RequestKind::Main;
    };
    let line = &system[at..];
    let line = &line[..memchr::memchr(b'"', line).unwrap_or(line.len())];
    if memchr::memmem::find(line, SUBAGENT_MARK).is_some() {
        RequestKind::Subagent
    } else if shape.tools_empty {
        RequestKind::Background
    } else {
        RequestKind::Main
    }
}

/// What one request needs of a model, read once per request.
#[derive(Debug)]
pub struct Needs {
    pub shape: Shape,
    /// The body as the balancer read it (the system prompt for [`Needs::kind`]).
    body: Bytes,
    kind: OnceLock<RequestKind>,
    /// The client sent the `context-1m` beta: a Claude model's window is a million tokens.
    pub context_1m: bool,
    /// The request has `x-claude-code-agent-id` (a subagent's).
    agent_header: bool,
    /// Bytes of the body that are not inline media.
    text_bytes: u64,
    /// What the tokenizer counts, when asked (see [`Needs::counted`]).
    counter: Counter,
    counted: OnceLock<u64>,
    /// The text bytes and token count of an earlier request of the same session, when one was
    /// counted: a conversation grows by a few kilobytes a turn, so the bound follows it closely.
    prior: OnceLock<(u64, u64)>,
}

/// How to count a request's tokens with the tokenizer: its body, or a function that makes the
/// Anthropic form of a request that came in another API.
pub enum Counter {
    Body(Bytes),
    With(Box<dyn Fn() -> u64 + Send + Sync>),
}

impl std::fmt::Debug for Counter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Counter::Body(b) => write!(f, "Body({} bytes)", b.len()),
            Counter::With(_) => f.write_str("With(..)"),
        }
    }
}

/// Where the byte estimate is treated as surely above the real count: 0.4 tokens a byte. The
/// tokenizer, with its 15 % margin, counts 0.16 to 0.26 a byte in the recorded Claude Code
/// requests (`tests/routing_fit.rs` checks the bound on them); text that beats it (dense base64)
/// at worst costs one call the provider refuses in the wording Claude Code compacts on.
const UPPER_PER_BYTE: (u64, u64) = (2, 5);
/// The byte estimate's usual ratio: about 3.5 bytes a token.
const TYPICAL_PER_BYTE: (u64, u64) = (2, 7);

impl Needs {
    pub fn new(body: Bytes, shape: Shape, headers: &HeaderMap, counter: Counter) -> Self {
        let context_1m = headers
            .get_all("anthropic-beta")
            .iter()
            .any(|v| memchr::memmem::find(v.as_bytes(), b"context-1m").is_some());
        let text_bytes = (body.len() as u64).saturating_sub(shape.media_bytes);
        Self {
            shape,
            body,
            kind: OnceLock::new(),
            context_1m,
            agent_header: headers.contains_key("x-claude-code-agent-id"),
            text_bytes,
            counter,
            counted: OnceLock::new(),
            prior: OnceLock::new(),
        }
    }

    /// An earlier count of the same session (its text bytes and tokens), to bound this one by.
    pub fn set_prior(&self, text_bytes: u64, tokens: u64) {
        if text_bytes > 0 {
            let _ = self.prior.set((text_bytes, tokens));
        }
    }

    /// The bytes that are not inline media (what a prior count is kept against).
    pub fn text_bytes(&self) -> u64 {
        self.text_bytes
    }

    /// The request's kind (read from the system prompt on first use).
    pub fn kind(&self) -> RequestKind {
        *self
            .kind
            .get_or_init(|| classify(&self.body, &self.shape, self.agent_header))
    }

    /// The input tokens estimated from the bytes alone (about 3.5 bytes a token).
    pub fn estimated(&self) -> u64 {
        self.text_bytes * TYPICAL_PER_BYTE.0 / TYPICAL_PER_BYTE.1
            + u64::from(self.shape.images) * PER_IMAGE
    }

    /// A bound the real count is very unlikely to exceed: from the session's earlier count plus
    /// the bound of what was added (or its ratio, with a tenth more, for a conversation that
    /// shrank), else from the bytes alone.
    fn upper(&self) -> u64 {
        let per_byte = |b: u64| b.saturating_mul(UPPER_PER_BYTE.0) / UPPER_PER_BYTE.1;
        let text = match self.prior.get() {
            Some(&(bytes, tokens)) if self.text_bytes >= bytes => {
                tokens.saturating_add(per_byte(self.text_bytes - bytes))
            }
            Some(&(bytes, tokens)) => {
                (u128::from(self.text_bytes) * u128::from(tokens) * 11 / (u128::from(bytes) * 10))
                    as u64
            }
            None => per_byte(self.text_bytes),
        };
        text.saturating_add(u64::from(self.shape.images) * PER_IMAGE)
    }

    /// The input tokens as the local tokenizer counts them (once per request).
    pub fn counted(&self) -> u64 {
        *self.counted.get_or_init(|| match &self.counter {
            Counter::Body(b) => crate::tokens::count_to_fit(b),
            Counter::With(f) => f(),
        })
    }

    /// Whether the tokenizer has run for this request.
    pub fn was_counted(&self) -> bool {
        self.counted.get().is_some()
    }

    /// The input tokens, counted only when the byte estimate cannot settle `input + reserve <=
    /// limit` by itself.
    fn input_within(&self, limit: u64, reserve: u64) -> (bool, u64) {
        if self.upper().saturating_add(reserve) <= limit {
            return (true, self.estimated());
        }
        let n = self.counted();
        (n.saturating_add(reserve) <= limit, n)
    }

    /// Whether the input is at least `min` tokens (counted only when the estimate is close).
    fn at_least(&self, min: u64) -> bool {
        let upper = self.upper();
        if upper < min {
            return false;
        }
        if self.estimated() / 2 >= min {
            return true;
        }
        self.counted() >= min
    }

    /// Whether deciding `input >= min` would run the tokenizer (not counted yet, and the
    /// estimate is close): the caller may count first, off the async runtime.
    pub fn would_count_for_min(&self, min: u64) -> bool {
        !self.was_counted() && self.upper() >= min && self.estimated() / 2 < min
    }

    /// Whether checking a model with `caps` would run the tokenizer (a window is known, nothing
    /// counted yet, and the byte estimate cannot settle it).
    pub fn would_count_for(&self, caps: &Capabilities) -> bool {
        caps.context_window.is_some_and(|w| {
            !self.was_counted() && self.upper().saturating_add(output_reserve(caps, self)) > w
        })
    }

    /// The input size to report: the count when it was made, else the estimate.
    pub fn input_tokens(&self) -> u64 {
        self.counted
            .get()
            .copied()
            .unwrap_or_else(|| self.estimated())
    }
}

/// Why a candidate cannot take a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Misfit {
    /// Input plus output exceed the window.
    TooLong {
        input: u64,
        output: u64,
        window: u64,
    },
    /// The request needs a capability the model lacks: `images`, `tools` or `thinking`.
    Lacks(&'static str),
}

impl std::fmt::Display for Misfit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Misfit::TooLong {
                input,
                output,
                window,
            } => write!(
                f,
                "skipped: needs {} tokens, window {}",
                thousands(input.saturating_add(*output)),
                thousands(*window)
            ),
            Misfit::Lacks(what) => write!(f, "skipped: needs {what}, the model takes none"),
        }
    }
}

/// Of the size misfits of one request, keeps the one with the largest window: the one the client
/// is told about (the input, the output asked, the window).
pub fn keep_largest(seen: &mut Option<(u64, u64, u64)>, misfit: &Misfit) {
    if let Misfit::TooLong {
        input,
        output,
        window,
    } = *misfit
    {
        if seen.is_none_or(|(_, _, w)| window > w) {
            *seen = Some((input, output, window));
        }
    }
}

/// What a client is told when no candidate can hold its request, in the words Claude Code acts
/// on: `prompt is too long` (it compacts the conversation) when the input alone exceeds the
/// window, else Anthropic's wording for an output that does not fit (it asks for less output).
pub fn too_long_words(input: u64, output: u64, window: u64) -> String {
    if input > window {
        format!("prompt is too long: {input} tokens > {window} maximum")
    } else {
        format!(
            "input length and `max_tokens` exceed context limit: {input} + {output} > {window}, \
             decrease input length or `max_tokens` and try again"
        )
    }
}

/// `212k` for 212 345, `1M` for a million, the number itself below 10 000.
pub fn thousands(n: u64) -> String {
    if n >= 1_000_000 && n % 1_000_000 == 0 {
        format!("{}M", n / 1_000_000)
    } else if n >= 10_000 {
        format!("{}k", n / 1000)
    } else {
        n.to_string()
    }
}

/// The capabilities a candidate has for this request: a Claude model's window is a million
/// tokens when the client sent the `context-1m` beta.
pub fn effective(caps: Capabilities, model: &str, needs: &Needs) -> Capabilities {
    if needs.context_1m && memchr::memmem::find(model.as_bytes(), b"claude").is_some() {
        return Capabilities {
            context_window: caps.context_window.map(|w| w.max(1_000_000)),
            ..caps
        };
    }
    caps
}

/// A candidate's capabilities with its provider's `max_tokens_cap` (what an openai-type provider
/// is sent at most) as a bound on the output.
pub fn with_output_cap(caps: Capabilities, cap: Option<u64>) -> Capabilities {
    Capabilities {
        max_output_tokens: match (caps.max_output_tokens, cap) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        ..caps
    }
}

/// The output a candidate is asked for: the request's `max_tokens`, clamped to the model's
/// `max_output_tokens`.
pub fn output_reserve(caps: &Capabilities, needs: &Needs) -> u64 {
    let asked = needs.shape.max_tokens.unwrap_or(0);
    caps.max_output_tokens.map_or(asked, |m| asked.min(m))
}

/// Whether a model with `caps` can take the request. A request that insists on thinking (a
/// budget) needs a model that thinks only when `thinker_exists`: some candidate of its plan can;
/// otherwise it is served without thinking rather than refused. Adaptive thinking (the model
/// decides, as Claude Code asks of most models) needs nothing.
pub fn check(caps: &Capabilities, needs: &Needs, thinker_exists: bool) -> Result<(), Misfit> {
    let s = &needs.shape;
    if s.images > 0 && caps.images == Some(false) {
        return Err(Misfit::Lacks("images"));
    }
    if s.tools && caps.tools == Some(false) {
        return Err(Misfit::Lacks("tools"));
    }
    if s.thinking_budget && thinker_exists && caps.thinking == Some(false) {
        return Err(Misfit::Lacks("thinking"));
    }
    if let Some(window) = caps.context_window {
        let reserve = output_reserve(caps, needs);
        let (fits, input) = needs.input_within(window, reserve);
        if !fits {
            return Err(Misfit::TooLong {
                input,
                output: reserve,
                window,
            });
        }
    }
    Ok(())
}

/// A route entry's `when:` conditions, compiled.
#[derive(Debug, Default)]
pub struct When {
    pub conditions: Conditions,
    /// Header name, the glob as written, the glob compiled.
    headers: Vec<(http::HeaderName, String, Regex)>,
}

impl When {
    pub fn new(conditions: &Conditions) -> Self {
        let headers = conditions
            .header
            .iter()
            .filter_map(|(name, glob)| {
                Some((
                    http::HeaderName::from_bytes(name.as_bytes()).ok()?,
                    glob.clone(),
                    Regex::new(&super::glob_pattern(glob)).ok()?,
                ))
            })
            .collect();
        Self {
            conditions: conditions.clone(),
            headers,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.conditions.is_empty()
    }
}

/// Whether every condition holds for the request; the first that fails, written for `explain`.
pub fn hold(when: &When, needs: &Needs, headers: &HeaderMap) -> Result<(), String> {
    let c = &when.conditions;
    let s = &needs.shape;
    let flag = |name: &str, wanted: Option<bool>, is: bool| match wanted {
        Some(w) if w != is => Err(format!("when.{name} is {w}, the request's is {is}")),
        _ => Ok(()),
    };
    flag("thinking", c.thinking, s.thinking)?;
    flag("images", c.images, s.images > 0)?;
    flag("tools", c.tools, s.tools)?;
    flag(
        "background",
        c.background,
        needs.kind() == RequestKind::Background,
    )?;
    flag(
        "subagent",
        c.subagent,
        needs.kind() == RequestKind::Subagent,
    )?;
    if let Some(min) = c.min_input_tokens {
        if !needs.at_least(min) {
            return Err(format!(
                "when.min_input_tokens is {min}, the request has about {}",
                needs.input_tokens()
            ));
        }
    }
    for (name, glob, re) in &when.headers {
        let ok = headers
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(|v| re.is_match(v)));
        if !ok {
            return Err(format!("when.header {name} does not match {glob:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;

    fn shape(max_tokens: u64) -> Shape {
        Shape {
            max_tokens: Some(max_tokens),
            ..Shape::default()
        }
    }

    /// A request of `bytes` bytes whose tokenizer count is `count`.
    fn needs(bytes: usize, shape: Shape, count: u64) -> Needs {
        Needs::new(
            Bytes::from(vec![b' '; bytes]),
            shape,
            &HeaderMap::new(),
            Counter::With(Box::new(move || count)),
        )
    }

    fn window(w: u64, out: Option<u64>) -> Capabilities {
        Capabilities {
            context_window: Some(w),
            max_output_tokens: out,
            ..Capabilities::default()
        }
    }

    #[test]
    fn fit_compares_input_plus_clamped_output_with_the_window() {
        // (body bytes, tokenizer count, max_tokens, window, max_output) → fits?
        type Row = (usize, u64, u64, u64, Option<u64>, Result<(), Misfit>);
        let table: &[Row] = &[
            // Clearly small by bytes: no count needed.
            (4_000, 1_000, 1_000, 100_000, None, Ok(())),
            // Near the limit: the count decides, and it fits.
            (320_000, 50_000, 8_000, 128_000, None, Ok(())),
            // The count says too long: input + output.
            (
                320_000,
                125_000,
                8_000,
                128_000,
                None,
                Err(Misfit::TooLong {
                    input: 125_000,
                    output: 8_000,
                    window: 128_000,
                }),
            ),
            // The output asked (32000) is clamped to the model's 4096: fits.
            (250_000, 120_000, 32_000, 128_000, Some(4_096), Ok(())),
            // Without the clamp it would not.
            (
                250_000,
                120_000,
                32_000,
                128_000,
                None,
                Err(Misfit::TooLong {
                    input: 120_000,
                    output: 32_000,
                    window: 128_000,
                }),
            ),
        ];
        for (bytes, count, max, w, out, want) in table {
            let n = needs(*bytes, shape(*max), *count);
            assert_eq!(
                &check(&window(*w, *out), &n, true),
                want,
                "{bytes} bytes, {count} tokens, max {max}, window {w}, out {out:?}"
            );
        }
        // The tokenizer runs only near a limit.
        let n = needs(4_000, shape(1_000), 1_000);
        check(&window(100_000, None), &n, true).unwrap();
        assert!(!n.was_counted());
        let n = needs(320_000, shape(8_000), 50_000);
        check(&window(128_000, None), &n, true).unwrap();
        assert!(n.was_counted());
        // No window known: nothing to check, nothing counted.
        let n = needs(10_000_000, shape(8_000), 5_000_000);
        check(&Capabilities::default(), &n, true).unwrap();
        assert!(!n.was_counted());
    }

    #[test]
    fn a_sessions_earlier_count_bounds_the_next_request_closely() {
        // 110 KB against a 40k window with 8000 out: by the bytes alone (0.4 a byte) it must be
        // counted; after a count of 25k tokens at 100 KB, 10 KB more cannot add more than 4k.
        let fresh = needs(110_000, shape(8_000), 27_500);
        check(&window(40_000, None), &fresh, true).unwrap();
        assert!(fresh.was_counted());
        let next = needs(110_000, shape(8_000), 27_500);
        next.set_prior(100_000, 25_000);
        check(&window(40_000, None), &next, true).unwrap();
        assert!(
            !next.was_counted(),
            "settled by the session's earlier count"
        );
        // A conversation that shrank (compacted) is bounded by the earlier ratio, a tenth over.
        let compacted = needs(50_000, shape(8_000), 12_500);
        compacted.set_prior(100_000, 25_000);
        check(&window(22_000, None), &compacted, true).unwrap();
        assert!(!compacted.was_counted());
    }

    #[test]
    fn media_bytes_are_not_counted_as_text_and_images_cost_a_fixed_amount() {
        let s = Shape {
            images: 2,
            media_bytes: 3_000_000,
            max_tokens: Some(1000),
            ..Shape::default()
        };
        let n = needs(3_010_000, s, 999_999);
        assert_eq!(n.estimated(), 10_000 * 2 / 7 + 2 * PER_IMAGE);
        // 3 MB of base64 is not 900k tokens: a 200k window holds it without counting.
        check(&window(200_000, None), &n, true).unwrap();
        assert!(!n.was_counted());
    }

    #[test]
    fn a_missing_capability_is_a_misfit_and_an_unknown_one_is_assumed() {
        let full = Shape {
            images: 1,
            tools: true,
            thinking: true,
            thinking_budget: true,
            ..Shape::default()
        };
        let n = needs(100, full, 10);
        for (what, caps) in [
            (
                "images",
                Capabilities {
                    images: Some(false),
                    ..Capabilities::default()
                },
            ),
            (
                "tools",
                Capabilities {
                    tools: Some(false),
                    ..Capabilities::default()
                },
            ),
            (
                "thinking",
                Capabilities {
                    thinking: Some(false),
                    ..Capabilities::default()
                },
            ),
        ] {
            assert_eq!(check(&caps, &n, true), Err(Misfit::Lacks(what)));
        }
        check(&Capabilities::default(), &n, true).unwrap();
        // Thinking is needed only when some other candidate can think; adaptive thinking never.
        let no_thinking = Capabilities {
            thinking: Some(false),
            ..Capabilities::default()
        };
        check(&no_thinking, &n, false).unwrap();
        let adaptive = needs(
            100,
            Shape {
                thinking: true,
                ..Shape::default()
            },
            10,
        );
        check(&no_thinking, &adaptive, true).unwrap();
        // A request that needs none of them fits a model that has none.
        let plain = needs(100, Shape::default(), 10);
        let none = Capabilities {
            images: Some(false),
            tools: Some(false),
            thinking: Some(false),
            ..Capabilities::default()
        };
        check(&none, &plain, true).unwrap();
    }

    #[test]
    fn misfits_read_as_the_attempts_list_shows_them() {
        let m = Misfit::TooLong {
            input: 180_345,
            output: 32_000,
            window: 128_000,
        };
        assert_eq!(m.to_string(), "skipped: needs 212k tokens, window 128k");
        assert_eq!(
            Misfit::Lacks("images").to_string(),
            "skipped: needs images, the model takes none"
        );
        assert_eq!(thousands(1_000_000), "1M");
        assert_eq!(thousands(8_192), "8192");
    }

    #[test]
    fn the_models_table_overrides_the_shipped_defaults_field_by_field() {
        let t = ModelTable::new(&[ModelConfig {
            pattern: "deepseek-chat".into(),
            capabilities: Capabilities {
                context_window: Some(64_000),
                ..Capabilities::default()
            },
        }]);
        let c = t.lookup("deepseek-chat");
        assert_eq!(c.context_window, Some(64_000));
        assert_eq!(c.max_output_tokens, Some(8_192), "from the defaults");
        assert_eq!(c.images, Some(false));
        // Vendor prefixes and letter case.
        assert_eq!(t.lookup("DeepSeek-AI/DeepSeek-Chat").images, Some(false));
        assert_eq!(
            t.lookup("openai/gpt-4.1-mini").context_window,
            Some(1_047_576)
        );
        assert_eq!(t.lookup("gpt-4o").thinking, Some(false));
        assert_eq!(t.lookup("claude-opus-4-1").max_output_tokens, Some(32_000));
        assert_eq!(
            t.lookup("claude-opus-4-5-20251101").max_output_tokens,
            Some(64_000)
        );
        // A Claude model newer than the table: its abilities, no window (it may be larger).
        assert_eq!(t.lookup("claude-opus-5-5").context_window, None);
        assert_eq!(t.lookup("claude-opus-5-5").images, Some(true));
        assert_eq!(t.lookup("claude-sonnet-4-5").context_window, Some(200_000));
        assert_eq!(
            t.lookup("anthropic/claude-sonnet-4.5").max_output_tokens,
            Some(64_000)
        );
        assert_eq!(t.lookup("qwen2.5-vl-72b-instruct").images, Some(true));
        assert_eq!(t.lookup("qwen3-235b").images, Some(false));
        // Unknown: nothing stated, so assumed able and unbounded.
        assert_eq!(t.lookup("my-local-model"), Capabilities::default());
    }

    #[test]
    fn the_context_1m_beta_opens_a_claude_window_to_a_million() {
        let mut headers = HeaderMap::new();
        headers.insert(
            "anthropic-beta",
            "claude-code-20250219,context-1m-2025-08-07"
                .parse()
                .unwrap(),
        );
        let n = Needs::new(
            Bytes::new(),
            Shape::default(),
            &headers,
            Counter::Body(Bytes::new()),
        );
        let caps = window(200_000, None);
        assert_eq!(
            effective(caps, "claude-sonnet-4-5", &n).context_window,
            Some(1_000_000)
        );
        assert_eq!(
            effective(caps, "deepseek-chat", &n).context_window,
            Some(200_000)
        );
        let plain = needs(0, Shape::default(), 0);
        assert_eq!(
            effective(caps, "claude-sonnet-4-5", &plain).context_window,
            Some(200_000)
        );
    }

    fn when(c: Conditions) -> When {
        When::new(&c)
    }

    #[test]
    fn every_condition_holds_or_fails_by_itself() {
        let thinking = Shape {
            thinking: true,
            tools: true,
            images: 1,
            ..Shape::default()
        };
        let rich = needs(100, thinking, 10);
        let plain = needs(100, Shape::default(), 10);
        let mut cheap = HeaderMap::new();
        cheap.insert("x-balancer-route", "Cheap".parse().unwrap());
        let none = HeaderMap::new();
        let cases: Vec<(Conditions, bool, bool)> = vec![
            // (conditions, holds for `rich`, holds for `plain`)
            (
                Conditions {
                    thinking: Some(true),
                    ..Conditions::default()
                },
                true,
                false,
            ),
            (
                Conditions {
                    thinking: Some(false),
                    ..Conditions::default()
                },
                false,
                true,
            ),
            (
                Conditions {
                    images: Some(true),
                    ..Conditions::default()
                },
                true,
                false,
            ),
            (
                Conditions {
                    tools: Some(true),
                    ..Conditions::default()
                },
                true,
                false,
            ),
            (
                Conditions {
                    background: Some(true),
                    ..Conditions::default()
                },
                false,
                false,
            ),
            (
                Conditions {
                    subagent: Some(false),
                    ..Conditions::default()
                },
                true,
                true,
            ),
            (Conditions::default(), true, true),
        ];
        for (c, for_rich, for_plain) in cases {
            let w = when(c.clone());
            assert_eq!(hold(&w, &rich, &none).is_ok(), for_rich, "{c:?}");
            assert_eq!(hold(&w, &plain, &none).is_ok(), for_plain, "{c:?}");
        }
        // Headers: name in any case, the value a case-insensitive glob.
        let w = when(Conditions {
            header: vec![("x-balancer-route".into(), "cheap".into())],
            ..Conditions::default()
        });
        assert!(hold(&w, &plain, &cheap).is_ok());
        let err = hold(&w, &plain, &none).unwrap_err();
        assert_eq!(err, "when.header x-balancer-route does not match \"cheap\"");
        let w = when(Conditions {
            header: vec![("x-balancer-route".into(), "ch*".into())],
            ..Conditions::default()
        });
        assert!(hold(&w, &plain, &cheap).is_ok());
        // Two conditions: both must hold.
        let w = when(Conditions {
            thinking: Some(true),
            header: vec![("x-balancer-route".into(), "cheap".into())],
            ..Conditions::default()
        });
        assert!(hold(&w, &rich, &cheap).is_ok());
        assert!(hold(&w, &rich, &none).is_err());
        assert!(hold(&w, &plain, &cheap).is_err());
    }

    #[test]
    fn min_input_tokens_counts_only_when_the_estimate_is_close() {
        let w = when(Conditions {
            min_input_tokens: Some(60_000),
            ..Conditions::default()
        });
        let none = HeaderMap::new();
        // 20 KB: far below by bytes alone.
        let small = needs(20_000, Shape::default(), 70_000);
        assert!(hold(&w, &small, &none).is_err());
        assert!(!small.was_counted());
        // 1 MB: far above by bytes alone.
        let big = needs(1_000_000, Shape::default(), 10);
        assert!(hold(&w, &big, &none).is_ok());
        assert!(!big.was_counted());
        // 200 KB: close; the count decides either way.
        let close = needs(200_000, Shape::default(), 61_000);
        assert!(hold(&w, &close, &none).is_ok());
        assert!(close.was_counted());
        let close = needs(200_000, Shape::default(), 59_000);
        let err = hold(&w, &close, &none).unwrap_err();
        assert_eq!(
            err,
            "when.min_input_tokens is 60000, the request has about 59000"
        );
    }
}
