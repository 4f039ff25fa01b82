//! SSE framing: splitting a byte stream into complete events without copying them apart.
//!
//! The relay forwards only complete events, so it can always insert a `ping` or a final
//! `error` event at an event boundary, and it can tell when `message_stop` has gone by.

use bytes::{Bytes, BytesMut};

/// The event names the relay cares about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    MessageStart,
    MessageStop,
    Error,
    Ping,
    /// An event with neither an `event:` nor a `data:` line: only comments (`: keep-alive`).
    Comment,
    Other,
}

impl EventKind {
    /// Carries nothing for the client to read: a ping or a comment.
    pub fn is_keepalive(self) -> bool {
        matches!(self, EventKind::Ping | EventKind::Comment)
    }
}

impl EventKind {
    fn from_name(name: &[u8]) -> Self {
        match name {
            b"message_start" => EventKind::MessageStart,
            b"message_stop" => EventKind::MessageStop,
            b"error" => EventKind::Error,
            b"ping" => EventKind::Ping,
            _ => EventKind::Other,
        }
    }
}

/// Complete events taken out of the splitter.
#[derive(Debug, Default)]
pub struct Events {
    /// The raw bytes of the events, boundaries included, exactly as received.
    pub bytes: Bytes,
    /// One entry per event, in order (by `event:` name; `Other` for unnamed events).
    pub kinds: Vec<EventKind>,
}

/// Incremental SSE event splitter. Accepts `\n`, `\r\n` line endings.
#[derive(Debug, Default)]
pub struct Splitter {
    buf: BytesMut,
    /// Bytes of `buf` already scanned (always at a line start).
    scanned: usize,
    /// End of the last complete event in `buf`.
    complete_end: usize,
    /// Kind of the event being read, if it has an `event:` line.
    current: Option<EventKind>,
    /// Whether the event being read has any line yet.
    current_has_lines: bool,
    /// Whether the event being read has a `data:` line.
    current_has_data: bool,
    kinds: Vec<EventKind>,
}

impl Splitter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds bytes and returns the events completed by them (possibly none).
    ///
    /// With nothing pending (a provider usually sends whole events), the events are handed out as
    /// a slice of `data` itself; only an incomplete tail is copied and kept.
    pub fn push(&mut self, data: Bytes) -> Events {
        if self.buf.is_empty() {
            self.scan(&data);
            let end = std::mem::take(&mut self.complete_end);
            if end < data.len() {
                self.buf.extend_from_slice(&data[end..]);
            }
            self.scanned -= end;
            return self.events(data.slice(..end));
        }
        self.buf.extend_from_slice(&data);
        let buf = std::mem::take(&mut self.buf);
        self.scan(&buf);
        self.buf = buf;
        let end = std::mem::take(&mut self.complete_end);
        let bytes = self.buf.split_to(end).freeze();
        self.scanned -= end;
        self.events(bytes)
    }

    fn events(&mut self, bytes: Bytes) -> Events {
        if bytes.is_empty() {
            return Events::default();
        }
        Events {
            bytes,
            kinds: std::mem::take(&mut self.kinds),
        }
    }

    /// Reads the whole lines of `pending` (the bytes not yet handed out) from `scanned` on,
    /// noting where complete events end.
    fn scan(&mut self, pending: &[u8]) {
        while let Some(nl) = memchr::memchr(b'\n', &pending[self.scanned..]) {
            let line_end = self.scanned + nl;
            let mut line = &pending[self.scanned..line_end];
            if let [rest @ .., b'\r'] = line {
                line = rest;
            }
            if line.is_empty() {
                if self.current_has_lines {
                    self.kinds.push(self.current_kind());
                }
                self.current = None;
                self.current_has_lines = false;
                self.current_has_data = false;
                self.complete_end = line_end + 1;
            } else {
                self.current_has_lines = true;
                if let Some(name) = line.strip_prefix(b"event:") {
                    self.current = Some(EventKind::from_name(name.trim_ascii()));
                } else if line.starts_with(b"data:") {
                    self.current_has_data = true;
                }
            }
            self.scanned = line_end + 1;
        }
    }

    /// Bytes received that do not yet form a complete event.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Whether the pending bytes hold a final event that only lacks its blank line, and its kind.
    pub fn unterminated_kind(&self) -> Option<EventKind> {
        self.current_has_lines.then(|| self.current_kind())
    }

    fn current_kind(&self) -> EventKind {
        match (self.current, self.current_has_data) {
            (Some(kind), _) => kind,
            (None, true) => EventKind::Other,
            (None, false) => EventKind::Comment,
        }
    }
}

/// The bytes of a ping event, as Anthropic sends it.
pub const PING_EVENT: &[u8] = b"event: ping\ndata: {\"type\": \"ping\"}\n\n";

/// The bytes of an `event: error`.
pub fn error_event(error_type: &str, message: &str) -> Bytes {
    let body =
        serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}});
    Bytes::from(format!("event: error\ndata: {body}\n\n"))
}

/// The `data:` payloads of complete events, comments and `event:` lines ignored, empty ones
/// skipped.
pub fn data_payloads(events: &[u8]) -> Vec<String> {
    parse_all(&String::from_utf8_lossy(events))
        .into_iter()
        .map(|(_, d)| d)
        .filter(|d| !d.trim().is_empty())
        .collect()
}

/// Splits complete SSE text into `(event name, data)` pairs. The relay reads whole events with
/// [`Splitter`]; this is for event text already gathered (the events before commit, a cached or
/// coalesced stream, tests).
pub fn parse_all(text: &str) -> Vec<(Option<String>, String)> {
    let mut out = Vec::new();
    let normalized = text.replace("\r\n", "\n");
    for block in normalized.split("\n\n") {
        let mut name = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if name.is_some() || !data.is_empty() {
            out.push((name, data.join("\n")));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const STREAM: &str = "event: message_start\ndata: {\"type\":\"message_start\"}\n\n\
event: ping\r\ndata: {\"type\":\"ping\"}\r\n\r\n\
data: {\"unnamed\":true}\n\n\
event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n";

    fn split_all(chunks: &[&[u8]]) -> (Vec<u8>, Vec<EventKind>) {
        let mut s = Splitter::new();
        let mut bytes = Vec::new();
        let mut kinds = Vec::new();
        for c in chunks {
            let ev = s.push(Bytes::copy_from_slice(c));
            bytes.extend_from_slice(&ev.bytes);
            kinds.extend(ev.kinds);
        }
        assert!(
            s.pending().is_empty(),
            "left over: {:?}",
            String::from_utf8_lossy(s.pending())
        );
        (bytes, kinds)
    }

    #[test]
    fn whole_stream_in_one_chunk() {
        let (bytes, kinds) = split_all(&[STREAM.as_bytes()]);
        assert_eq!(bytes, STREAM.as_bytes());
        assert_eq!(
            kinds,
            vec![
                EventKind::MessageStart,
                EventKind::Ping,
                EventKind::Other,
                EventKind::MessageStop
            ]
        );
    }

    #[test]
    fn whole_events_are_handed_out_without_a_copy() {
        let mut s = Splitter::new();
        let data = Bytes::from_static(STREAM.as_bytes());
        let ev = s.push(data.clone());
        assert_eq!(ev.bytes.as_ptr(), data.as_ptr());
        assert_eq!(ev.bytes.len(), data.len());
        // A chunk that ends inside an event: the complete part is still a slice of it.
        let data = Bytes::from_static(b"event: ping\ndata: {}\n\nevent: message_stop\ndata:");
        let ev = s.push(data.clone());
        assert_eq!(ev.bytes.as_ptr(), data.as_ptr());
        assert_eq!(&ev.bytes[..], b"event: ping\ndata: {}\n\n");
        assert_eq!(s.pending(), b"event: message_stop\ndata:");
        let ev = s.push(Bytes::from_static(b" {}\n\n"));
        assert_eq!(ev.kinds, vec![EventKind::MessageStop]);
        assert!(s.pending().is_empty());
    }

    #[test]
    fn partial_event_is_held_back() {
        let mut s = Splitter::new();
        let ev = s.push(Bytes::from_static(b"event: message_start\ndata: {\"a\""));
        assert!(ev.bytes.is_empty());
        assert_eq!(s.unterminated_kind(), Some(EventKind::MessageStart));
        let ev = s.push(Bytes::from_static(b":1}\n\nevent: err"));
        assert_eq!(&ev.bytes[..], b"event: message_start\ndata: {\"a\":1}\n\n");
        assert_eq!(ev.kinds, vec![EventKind::MessageStart]);
        let ev = s.push(Bytes::from_static(b"or\ndata: {}\n\n"));
        assert_eq!(ev.kinds, vec![EventKind::Error]);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        #[test]
        fn splitting_does_not_depend_on_chunk_boundaries(cuts in proptest::collection::vec(0usize..STREAM.len(), 0..12)) {
            let mut cuts = cuts;
            cuts.sort_unstable();
            cuts.dedup();
            let bytes = STREAM.as_bytes();
            let mut chunks = Vec::new();
            let mut last = 0;
            for c in cuts {
                chunks.push(&bytes[last..c]);
                last = c;
            }
            chunks.push(&bytes[last..]);
            let (out, kinds) = split_all(&chunks);
            prop_assert_eq!(out, bytes.to_vec());
            prop_assert_eq!(kinds.len(), 4);
        }
    }

    #[test]
    fn parse_all_reads_names_and_data() {
        let events = parse_all(STREAM);
        assert_eq!(events.len(), 4);
        assert_eq!(events[0].0.as_deref(), Some("message_start"));
        assert_eq!(events[2].0, None);
        assert_eq!(events[3].1, "{\"type\":\"message_stop\"}");
    }
}
