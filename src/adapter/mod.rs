//! Conversion between the Anthropic Messages API and provider dialects. Pure code: values or
//! bytes in, values or bytes out, no I/O.
//!
//! - [`events`]: the Anthropic event-stream accumulator and rule checker.
//! - [`ids`]: message ids, tool-call id encoding, gateway thinking signatures.
//! - [`openai`]: Anthropic request to Chat Completions, and the answer (JSON or SSE) back.
//! - [`chat`]: the OpenAI Chat Completions front end: its requests as Anthropic requests, and
//!   Anthropic answers (JSON, SSE, errors) as Chat Completions.
//! - [`responses`]: the OpenAI Responses front end (stateless): its requests as Anthropic
//!   requests, and Anthropic answers as `response` objects and typed events.
//! - [`anthropic`]: the one change passthrough ever makes beyond the model name: removing
//!   thinking blocks this gateway signed, which Anthropic would reject.

/// A writer of another API's stream from Anthropic events: the OpenAI front ends' renderers.
pub trait Render: Send + 'static {
    /// Takes one Anthropic event (its name and JSON data).
    fn push(&mut self, name: &str, data: &serde_json::Value);
    /// Takes whole Anthropic events as SSE bytes.
    fn push_sse(&mut self, bytes: &[u8]) {
        events::for_each_event(bytes, |name, data| self.push(name, data));
    }
    /// The bytes written so far, taken.
    fn take(&mut self) -> Vec<u8>;
    /// The Anthropic stream ended: one that was not complete ends in the API's error form.
    fn end(&mut self);
    /// The stream's ending has been written.
    fn is_finished(&self) -> bool;
}

pub mod anthropic;
pub mod chat;
pub mod events;
pub mod ids;
pub mod openai;
pub mod responses;
