//! The OpenAI Chat Completions front end (`openai-front.md` §2): a Chat Completions request as
//! an Anthropic request, and an Anthropic answer (message, event stream or error) as Chat
//! Completions. Pure: values or bytes in, values or bytes out.
//!
//! - [`request`]: a Chat Completions request body to an Anthropic Messages body (§2.1-2.4).
//! - [`response`]: an Anthropic `Message` to a `chat.completion` (§2.5-2.7).
//! - [`stream`]: the state machine that turns Anthropic events into `chat.completion.chunk`s
//!   ending with `data: [DONE]` (§2.8).
//! - [`errors`]: Anthropic errors in OpenAI's error shape and statuses (§2.9).

pub mod errors;
pub mod request;
pub mod response;
pub mod stream;

use crate::adapter::ids::base62;

/// A request the front end cannot take: a 400 in OpenAI's shape naming the parameter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    pub param: Option<String>,
}

/// What the rendering of an answer needs to know about its request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatContext {
    /// The model name the client asked for: echoed in every answer.
    pub model: String,
    /// `stream_options.include_usage`: a stream ends with a usage chunk.
    pub include_usage: bool,
}

/// `chatcmpl-` plus 24 random base62 characters: unique per response.
pub fn completion_id() -> String {
    format!("chatcmpl-{}", base62(24))
}

/// Unix seconds now.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
