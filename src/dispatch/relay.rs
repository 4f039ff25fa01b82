//! After commit: relaying an Anthropic SSE stream to the client, event by event.
//!
//! Complete events are forwarded the moment they arrive. While the provider is silent, a `ping`
//! goes out every [`PING_INTERVAL`]; after `read_timeout` of silence, or if the provider fails or
//! ends the stream before `message_stop`, the client gets one `event: error` and the stream ends.
//! Nothing is ever sent after `message_stop` or `error`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use tokio::time::{Instant, Sleep, sleep_until};

use crate::adapter::openai::stream::{Step, StreamState};
use crate::dispatch::Wire;
use crate::routing::health::{HealthPolicy, Verdict};
use crate::secret::Redactor;
use crate::state::AppState;
use crate::upstream::TransportError;
use crate::upstream::sse::{EventKind, PING_EVENT, Splitter, data_payloads, error_event};

/// Silence after which a `ping` event is sent to the client.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

/// The largest single event relayed after commit: an event that grows past it without ending is
/// a provider failure (one `event: error`), not a buffer that grows without bound.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// The upstream body as a stream of chunks.
pub type Upstream = BoxStream<'static, Result<Bytes, TransportError>>;

pub struct Relay {
    /// Events already read before commit, sent first.
    pub first: Option<Bytes>,
    /// Those events ended the stream (`message_stop` or `error`): nothing more is read.
    pub ended: bool,
    pub upstream: Upstream,
    pub splitter: Splitter,
    pub read_timeout: Duration,
    /// Where to report a failure after commit, and by which policy.
    pub state: Arc<AppState>,
    pub health: HealthPolicy,
    /// Masks configured secrets in an error the provider sends after commit.
    pub redactor: Arc<Redactor>,
    pub provider: String,
    pub transform: Transform,
}

/// What happens to complete upstream events on their way to the client.
pub enum Transform {
    /// Anthropic events, forwarded byte for byte.
    Passthrough,
    /// Chat Completions chunks, converted by the stream state machine.
    Openai(Box<StreamState>),
    /// An OpenAI client's own API (Chat Completions chunks, Responses events), forwarded byte
    /// for byte.
    Native(NativeRelay),
}

/// What the relay of a stream in an OpenAI API watches for: its end (`data: [DONE]` or an error
/// chunk; a terminal Responses event or `error`) and, for Chat Completions, whether a chunk
/// finished the choice. It also counts the events, to number a `response.failed` it must add.
#[derive(Debug)]
pub struct NativeRelay {
    responses: bool,
    finished_choice: bool,
    failed: bool,
    events: u64,
}

impl NativeRelay {
    pub fn chat() -> Self {
        Self {
            responses: false,
            finished_choice: false,
            failed: false,
            events: 0,
        }
    }

    pub fn responses() -> Self {
        Self {
            responses: true,
            ..Self::chat()
        }
    }

    /// The stream carried an error (an error chunk, `response.failed`, an `error` event).
    pub fn failed(&self) -> bool {
        self.failed
    }

    pub fn wire(&self) -> Wire {
        if self.responses {
            Wire::Responses
        } else {
            Wire::Chat
        }
    }

    /// Looks at whole events going to the client: whether they end the stream. Only bytes are
    /// searched; an event is parsed only when it may end the stream.
    pub fn observe(&mut self, events: &[u8]) -> bool {
        use memchr::memmem::{find, find_iter};
        self.events += find_iter(events, b"data:").count() as u64;
        if !self.responses {
            // `"finish_reason":"stop"` (any value but null), with or without a space.
            self.finished_choice |= find_iter(events, b"\"finish_reason\":").any(|at| {
                let rest = &events[at + 16..];
                let value = rest.iter().position(|b| *b != b' ').map(|i| rest[i]);
                value == Some(b'"')
            });
            // A `data: [DONE]` line (the same letters inside a chunk's text do not count).
            let done = find_iter(events, b"[DONE]").any(|at| {
                let line = events[..at]
                    .rsplit(|b| *b == b'\n')
                    .next()
                    .unwrap_or_default();
                line.strip_prefix(b"data:")
                    .is_some_and(|rest| rest.iter().all(|b| *b == b' '))
            });
            if find(events, b"\"error\"").is_some()
                && data_payloads(events).iter().any(|d| {
                    serde_json::from_str::<serde_json::Value>(d)
                        .is_ok_and(|v| v.get("error").is_some_and(|e| !e.is_null()))
                })
            {
                self.failed = true;
                return true;
            }
            return done;
        }
        // Only the events that can end a stream are read.
        if find(events, b"\"response.completed\"").is_some()
            || find(events, b"\"response.incomplete\"").is_some()
        {
            return true;
        }
        if find(events, b"\"response.failed\"").is_some() || find(events, b"\"error\"").is_some() {
            #[derive(serde::Deserialize)]
            struct Typed<'a> {
                #[serde(rename = "type", borrow)]
                kind: Option<std::borrow::Cow<'a, str>>,
            }
            let failed = data_payloads(events).iter().any(|d| {
                matches!(
                    serde_json::from_str::<Typed<'_>>(d)
                        .ok()
                        .and_then(|t| t.kind)
                        .as_deref(),
                    Some("response.failed" | "error")
                )
            });
            if failed {
                self.failed = true;
                return true;
            }
        }
        false
    }

    /// The event that ends the stream with an error.
    fn error(&self, message: &str) -> Bytes {
        if !self.responses {
            return chat_error_chunk(message);
        }
        let v = serde_json::json!({"type": "response.failed", "sequence_number": self.events,
            "response": {"id": crate::adapter::responses::response_id(), "object": "response", "status": "failed",
                "output": [], "usage": null, "error": {"code": "server_error", "message": message}}});
        Bytes::from(format!("event: response.failed\ndata: {v}\n\n"))
    }
}

/// The chunk that ends a Chat Completions stream with an error (the client raises on it).
pub fn chat_error_chunk(message: &str) -> Bytes {
    let v = serde_json::json!({"error": {"message": message, "type": "server_error", "param": null, "code": null}});
    Bytes::from(format!("data: {v}\n\n"))
}

impl Transform {
    /// Client bytes for complete upstream events, and whether the stream has ended. An error
    /// the provider sends after commit is masked of every configured secret on its way through
    /// (the events of a healthy stream are not searched).
    fn events(&mut self, bytes: Bytes, kinds: &[EventKind], redactor: &Redactor) -> (Bytes, bool) {
        match self {
            Transform::Passthrough => {
                let failed = kinds.contains(&EventKind::Error);
                let done = failed || kinds.contains(&EventKind::MessageStop);
                (if failed { redactor.bytes(bytes) } else { bytes }, done)
            }
            Transform::Openai(state) => {
                let mut failed = false;
                for data in data_payloads(&bytes) {
                    match state.push_data(&data) {
                        Step::Continue => {}
                        Step::Failed { .. } => {
                            failed = true;
                            break;
                        }
                        _ => break,
                    }
                }
                let out = Bytes::from(state.take());
                (
                    if failed { redactor.bytes(out) } else { out },
                    state.is_finished(),
                )
            }
            Transform::Native(watch) => {
                let done = watch.observe(&bytes);
                (
                    if watch.failed {
                        redactor.bytes(bytes)
                    } else {
                        bytes
                    },
                    done,
                )
            }
        }
    }

    /// Upstream EOF: the closing bytes, and a failure reason if the ending was not clean.
    fn end(&mut self, splitter: &Splitter, redactor: &Redactor) -> (Bytes, Option<String>) {
        match self {
            Transform::Passthrough => {
                if splitter.unterminated_kind() == Some(EventKind::MessageStop) {
                    // The last event only lacks its blank line: complete it.
                    let mut last = BytesMut::from(splitter.pending());
                    last.extend_from_slice(b"\n\n");
                    return (last.freeze(), None);
                }
                let reason = "stream ended before message_stop".to_owned();
                (
                    error_event("api_error", &format!("upstream provider: {reason}")),
                    Some(reason),
                )
            }
            Transform::Openai(state) => {
                // A final chunk that lacks its blank line still counts.
                let mut step = Step::Continue;
                for data in data_payloads(splitter.pending()) {
                    step = state.push_data(&data);
                    if step != Step::Continue {
                        break;
                    }
                }
                if step == Step::Continue {
                    step = state.finish();
                }
                let reason = match step {
                    Step::Failed { message, .. } => Some(message),
                    _ => None,
                };
                (Bytes::from(state.take()), reason)
            }
            Transform::Native(watch) => {
                // A last event that only lacks its blank line still counts; a cut one is dropped.
                let mut out = BytesMut::new();
                let pending = splitter.pending();
                let whole = data_payloads(pending).iter().all(|d| {
                    d.trim() == "[DONE]" || serde_json::from_str::<serde::de::IgnoredAny>(d).is_ok()
                });
                if !pending.is_empty() && whole {
                    out.extend_from_slice(pending);
                    out.extend_from_slice(b"\n\n");
                    if watch.observe(&out) {
                        // It may be the provider's error, which is masked as every error is.
                        let out = out.freeze();
                        return (
                            if watch.failed {
                                redactor.bytes(out)
                            } else {
                                out
                            },
                            None,
                        );
                    }
                }
                if watch.finished_choice {
                    // Some servers end without `[DONE]` after the last chunk: the client gets it.
                    out.extend_from_slice(b"data: [DONE]\n\n");
                    return (out.freeze(), None);
                }
                let reason = "stream ended before its last event".to_owned();
                out.extend_from_slice(&watch.error(&format!("upstream provider: {reason}")));
                (out.freeze(), Some(reason))
            }
        }
    }

    /// What goes out during a provider's silence: Anthropic's `ping` event, or an SSE comment in
    /// an OpenAI stream (whose clients would read a ping as a malformed chunk).
    fn keepalive(&self) -> Bytes {
        match self {
            Transform::Passthrough | Transform::Openai(_) => Bytes::from_static(PING_EVENT),
            Transform::Native(_) => Bytes::from_static(b": ping\n\n"),
        }
    }

    /// The bytes that end the stream after a failure.
    fn fail(&mut self, provider: &str, reason: &str) -> Bytes {
        let message = format!("upstream provider {provider}: {reason}");
        match self {
            Transform::Passthrough => error_event("api_error", &message),
            Transform::Openai(state) => {
                state.fail("api_error", &message);
                Bytes::from(state.take())
            }
            Transform::Native(watch) => watch.error(&message),
        }
    }
}

struct Running {
    relay: Relay,
    finished: bool,
    last_output: Instant,
    /// When the provider's silence becomes a failure; moved on by every byte it sends.
    idle_deadline: Instant,
    /// Wakes the relay for a ping or the idle timeout. Every event pushes both deadlines later, and
    /// moving a timer is a trip through tokio's timer wheel, so it is only ever moved earlier; when
    /// it fires before anything is due, it is re-armed.
    timer: Pin<Box<Sleep>>,
    /// Resolves when the balancer starts ending open streams (one registration per stream).
    closing: Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl Running {
    fn record_failure(&self, reason: &str) {
        self.relay.state.health.record(
            &self.relay.provider,
            Verdict::Fault {
                reason: reason.to_owned(),
                retry_after: None,
            },
            Instant::now(),
            &self.relay.health,
        );
        tracing::warn!(provider = %self.relay.provider, %reason, "stream failed after commit");
    }

    fn fail(&mut self, reason: String) -> Bytes {
        self.finished = true;
        self.record_failure(&reason);
        self.relay.transform.fail(&self.relay.provider, &reason)
    }

    /// When the relay must next act without upstream data: a ping or the idle timeout.
    fn next_wake(&self) -> Instant {
        (self.last_output + PING_INTERVAL).min(self.idle_deadline)
    }

    async fn next_item(&mut self) -> Option<Bytes> {
        if let Some(first) = self.relay.first.take() {
            self.last_output = Instant::now();
            return Some(first);
        }
        if self.finished {
            return None;
        }
        enum Wake {
            Chunk(Option<Result<Bytes, TransportError>>),
            Closing,
            Timer,
        }
        loop {
            let wake = self.next_wake();
            if wake < self.timer.deadline() {
                self.timer.as_mut().reset(wake);
            }
            let woke = tokio::select! {
                chunk = self.relay.upstream.next() => Wake::Chunk(chunk),
                () = &mut self.closing => Wake::Closing,
                () = self.timer.as_mut() => Wake::Timer,
            };
            match woke {
                Wake::Chunk(Some(Ok(data))) => {
                    self.idle_deadline = Instant::now() + self.relay.read_timeout;
                    let events = self.relay.splitter.push(data);
                    if self.relay.splitter.pending().len() > MAX_EVENT_BYTES {
                        let reason = format!(
                            "an event larger than {} MiB (no end in sight)",
                            MAX_EVENT_BYTES >> 20
                        );
                        return Some(self.fail(reason));
                    }
                    if events.bytes.is_empty() {
                        continue;
                    }
                    let (out, done) = self.relay.transform.events(
                        events.bytes,
                        &events.kinds,
                        &self.relay.redactor,
                    );
                    self.finished = done;
                    if out.is_empty() {
                        continue;
                    }
                    self.last_output = Instant::now();
                    return Some(out);
                }
                Wake::Chunk(Some(Err(e))) => {
                    let reason = format!("connection lost mid-stream: {e}");
                    return Some(self.fail(reason));
                }
                Wake::Chunk(None) => {
                    self.finished = true;
                    let (out, failure) = self
                        .relay
                        .transform
                        .end(&self.relay.splitter, &self.relay.redactor);
                    if let Some(reason) = failure {
                        self.record_failure(&reason);
                    }
                    return (!out.is_empty()).then_some(out);
                }
                Wake::Closing => {
                    self.finished = true;
                    return Some(
                        self.relay
                            .transform
                            .fail(&self.relay.provider, "the balancer is shutting down"),
                    );
                }
                Wake::Timer => {
                    let now = Instant::now();
                    if now >= self.idle_deadline {
                        let secs = self.relay.read_timeout.as_secs();
                        return Some(self.fail(format!("no data for {secs} s (read_timeout)")));
                    }
                    let ping = now >= self.last_output + PING_INTERVAL;
                    if ping {
                        self.last_output = now;
                    }
                    let wake = self.next_wake();
                    self.timer.as_mut().reset(wake);
                    if ping {
                        return Some(self.relay.transform.keepalive());
                    }
                }
            }
        }
    }
}

/// The client-facing event stream: every item is one or more whole events.
pub fn relay(relay: Relay) -> impl Stream<Item = Bytes> + Send + 'static {
    let now = Instant::now();
    let idle_deadline = now + relay.read_timeout;
    let mut closing = relay.state.closing();
    let running = Running {
        finished: relay.ended,
        relay,
        last_output: now,
        idle_deadline,
        timer: Box::pin(sleep_until(idle_deadline.min(now + PING_INTERVAL))),
        closing: Box::pin(async move {
            // An error means the state is gone: the stream ends either way.
            let _ = closing.wait_for(|c| *c).await;
        }),
    };
    stream::unfold(running, |mut r| async move {
        r.next_item().await.map(|b| (b, r))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chat_stream_ends_at_its_done_line_or_error_chunk_only() {
        let mut w = NativeRelay::chat();
        let text = b"data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"data: [DONE] and \\\"error\\\"\"},\"finish_reason\":null}]}\n\n";
        assert!(!w.observe(text), "the words inside a chunk end nothing");
        assert!(!w.finished_choice);
        assert!(!w.observe(
            b"data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\": \"stop\"}]}\n\n"
        ));
        assert!(w.finished_choice);
        assert!(w.observe(b"data: [DONE]\n\n"));
        let mut e = NativeRelay::chat();
        assert!(e.observe(b"data: {\"error\":{\"message\":\"boom\"}}\n\n"));
        assert!(e.failed);
    }

    #[test]
    fn a_responses_stream_ends_at_its_terminal_event() {
        let mut w = NativeRelay::responses();
        let delta = b"event: response.output_text.delta\ndata: {\"type\":\"response.output_text.delta\",\"delta\":\"\\\"response.completed\\\" error\"}\n\n";
        assert!(!w.observe(delta));
        assert_eq!(w.events, 1);
        assert!(w.observe(b"event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{}}\n\n"));
        let mut f = NativeRelay::responses();
        assert!(f.observe(
            b"event: error\ndata: {\"type\":\"error\",\"code\":\"x\",\"message\":\"m\"}\n\n"
        ));
        assert!(f.failed);
    }
}
