//! After commit: relaying an Anthropic SSE stream to the client, event by event.
//!
//! Complete events are forwarded the moment they arrive. While the provider is silent, a `ping`
//! goes out every [`PING_INTERVAL`]; after `read_timeout` of silence, or if the provider fails or
//! ends the stream before `message_stop`, the client gets one `event: error` and the stream ends.
//! Nothing is ever sent after `message_stop` or `error`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, Stream, StreamExt};
use tokio::time::{Instant, sleep_until};

use crate::routing::health::Verdict;
use crate::state::AppState;
use crate::upstream::sse::{EventKind, PING_EVENT, Splitter, error_event};

/// Silence after which a `ping` event is sent to the client.
pub const PING_INTERVAL: Duration = Duration::from_secs(15);

/// The upstream body as a stream of chunks.
pub type Upstream = BoxStream<'static, Result<Bytes, reqwest::Error>>;

pub struct Relay {
    /// Events already read before commit, sent first.
    pub first: Option<Bytes>,
    pub upstream: Upstream,
    pub splitter: Splitter,
    pub read_timeout: Duration,
    /// Where to report a failure after commit.
    pub state: Arc<AppState>,
    pub provider: String,
}

struct Running {
    relay: Relay,
    finished: bool,
    last_output: Instant,
    /// When the provider's silence becomes a failure; moved on by every byte it sends.
    idle_deadline: Instant,
}

impl Running {
    fn fail(&mut self, reason: String) -> Bytes {
        self.finished = true;
        let runtime = self.relay.state.runtime();
        self.relay.state.health.record(
            &self.relay.provider,
            Verdict::Fault {
                reason: reason.clone(),
                retry_after: None,
            },
            Instant::now(),
            &runtime.config.settings,
        );
        tracing::warn!(provider = %self.relay.provider, %reason, "stream failed after commit");
        error_event(
            "api_error",
            &format!("upstream provider {}: {reason}", self.relay.provider),
        )
    }

    async fn next_item(&mut self) -> Option<Bytes> {
        if let Some(first) = self.relay.first.take() {
            self.last_output = Instant::now();
            return Some(first);
        }
        if self.finished {
            return None;
        }
        loop {
            let ping_at = self.last_output + PING_INTERVAL;
            let wake = ping_at.min(self.idle_deadline);
            tokio::select! {
                chunk = self.relay.upstream.next() => match chunk {
                    Some(Ok(data)) => {
                        self.idle_deadline = Instant::now() + self.relay.read_timeout;
                        let events = self.relay.splitter.push(&data);
                        if events.bytes.is_empty() {
                            continue;
                        }
                        if events.kinds.iter().any(|k| matches!(k, EventKind::MessageStop | EventKind::Error)) {
                            self.finished = true;
                        }
                        self.last_output = Instant::now();
                        return Some(events.bytes);
                    }
                    Some(Err(e)) => {
                        let reason = format!("connection lost mid-stream: {}", crate::dispatch::error_chain(&e));
                        return Some(self.fail(reason));
                    }
                    None => {
                        self.finished = true;
                        if self.relay.splitter.unterminated_kind() == Some(EventKind::MessageStop) {
                            // The last event only lacks its blank line: complete it.
                            let mut last = BytesMut::from(self.relay.splitter.pending());
                            last.extend_from_slice(b"\n\n");
                            return Some(last.freeze());
                        }
                        return Some(self.fail("stream ended before message_stop".to_owned()));
                    }
                },
                _ = sleep_until(wake) => {
                    if Instant::now() >= self.idle_deadline {
                        let secs = self.relay.read_timeout.as_secs();
                        return Some(self.fail(format!("no data for {secs} s (read_timeout)")));
                    }
                    self.last_output = Instant::now();
                    return Some(Bytes::from_static(PING_EVENT));
                }
            }
        }
    }
}

/// The client-facing body stream.
pub fn relay(relay: Relay) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
    let now = Instant::now();
    let idle_deadline = now + relay.read_timeout;
    let running = Running {
        relay,
        finished: false,
        last_output: now,
        idle_deadline,
    };
    stream::unfold(running, |mut r| async move {
        r.next_item().await.map(|b| (Ok(b), r))
    })
}
