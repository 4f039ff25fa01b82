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

pub mod anthropic;
pub mod chat;
pub mod events;
pub mod ids;
pub mod openai;
pub mod responses;
