//! A scriptable fake model provider on a loopback port.
//!
//! It speaks HTTP/1.1 over raw TCP, so it can do what a real server library would not let a test
//! do: drop the connection before the headers, cut a stream mid-chunk, hang forever, or write an
//! exact byte sequence with delays between chunks. Each request is answered by the next scripted
//! [`Reply`] (or the default one), and recorded for the test to inspect. Delays use tokio's clock,
//! so tests with a paused clock run them instantly.

pub mod brain;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// How a scripted stream ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// The terminating chunk is sent; the connection stays open for the next request.
    Complete,
    /// The connection is closed mid-body (no terminating chunk).
    Cut,
    /// Nothing more is sent, and the connection stays open until the client closes it.
    Hang,
}

/// One scripted answer.
#[derive(Debug, Clone)]
pub enum Reply {
    /// A complete response with a `content-length`.
    Full {
        status: u16,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
        delay: Duration,
    },
    /// A chunked response written piece by piece, each after its delay.
    Stream {
        status: u16,
        headers: Vec<(String, String)>,
        chunks: Vec<(Duration, Vec<u8>)>,
        end: End,
    },
    /// The connection is closed without any response.
    DropBeforeHeaders,
    /// No response at all; the connection stays open until the client closes it.
    Hang,
    /// A model-like answer ([`brain`]) in the request's dialect, streamed or not as asked.
    Model,
    /// Like `Model`, but a stream is cut after this many events (a non-stream answer is cut mid-body).
    ModelCut(usize),
    /// A 200 stream whose first event is an error (an error body for a non-stream request).
    ModelStreamError,
    /// A 200 whose body (or first stream event) is not valid JSON.
    ModelMalformed,
}

impl Reply {
    pub fn json(status: u16, body: &serde_json::Value) -> Self {
        Reply::Full {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            body: body.to_string().into_bytes(),
            delay: Duration::ZERO,
        }
    }

    /// An Anthropic-shaped error with the given status.
    pub fn error(status: u16, error_type: &str, message: &str) -> Self {
        Self::json(
            status,
            &serde_json::json!({"type": "error", "error": {"type": error_type, "message": message}}),
        )
    }

    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        match &mut self {
            Reply::Full { headers, .. } | Reply::Stream { headers, .. } => {
                headers.push((name.into(), value.into()))
            }
            _ => {}
        }
        self
    }

    /// A fault described in JSON, for the control endpoint `POST /_mock/push`:
    /// `{"kind": "status", "status": 529, "retry_after": "1", "message": "…"}`, `drop_before_headers`,
    /// `drop_mid_stream` (`after`: events), `hang`, `error_in_stream`, `malformed_json`,
    /// `truncated_sse`, `delay` (`ms`, then a model answer), `model`.
    pub fn from_spec(spec: &serde_json::Value) -> Option<Self> {
        let kind = spec.get("kind")?.as_str()?;
        Some(match kind {
            "status" => {
                let status = spec
                    .get("status")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(529) as u16;
                let message = spec
                    .get("message")
                    .and_then(serde_json::Value::as_str)
                    .unwrap_or("injected fault");
                let error_type = match status {
                    429 => "rate_limit_error",
                    529 | 503 => "overloaded_error",
                    401 => "authentication_error",
                    400 => "invalid_request_error",
                    _ => "api_error",
                };
                let mut r = Reply::error(status, error_type, message);
                if let Some(ra) = spec.get("retry_after") {
                    let v = ra
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| ra.to_string());
                    r = r.with_header("retry-after", &v);
                }
                r
            }
            "drop_before_headers" => Reply::DropBeforeHeaders,
            "drop_mid_stream" => Reply::ModelCut(
                spec.get("after")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(3) as usize,
            ),
            "truncated_sse" => Reply::ModelCut(usize::MAX),
            "hang" => Reply::Hang,
            "error_in_stream" => Reply::ModelStreamError,
            "malformed_json" => Reply::ModelMalformed,
            "delay" => Reply::Model.with_delay(Duration::from_millis(
                spec.get("ms")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(1000),
            )),
            "model" => Reply::Model,
            _ => return None,
        })
    }

    pub fn with_delay(mut self, d: Duration) -> Self {
        match &mut self {
            Reply::Full { delay, .. } => *delay = d,
            Reply::Model => {
                return Reply::Stream {
                    status: 0,
                    headers: vec![],
                    chunks: vec![(d, vec![])],
                    end: End::Complete,
                };
            }
            _ => {}
        }
        self
    }

    /// A non-streaming Anthropic message with one text block.
    pub fn message(model: &str, text: &str) -> Self {
        Self::json(200, &anthropic_message(model, text))
    }

    /// An SSE body sent as one chunk per event, with no delays.
    pub fn sse(body: &str) -> Self {
        let chunks = split_events(body)
            .into_iter()
            .map(|e| (Duration::ZERO, e.into_bytes()))
            .collect();
        Self::sse_chunks(chunks, End::Complete)
    }

    pub fn sse_chunks(chunks: Vec<(Duration, Vec<u8>)>, end: End) -> Self {
        Reply::Stream {
            status: 200,
            headers: vec![(
                "content-type".into(),
                "text/event-stream; charset=utf-8".into(),
            )],
            chunks,
            end,
        }
    }

    /// A streamed Anthropic message with one text block, one event per chunk.
    pub fn message_stream(model: &str, text: &str) -> Self {
        Self::sse(&anthropic_stream(model, text))
    }
}

/// An OpenAI-style SSE body: one `data:` event per chunk, then `data: [DONE]` when `done`.
pub fn openai_sse(chunks: &[serde_json::Value], done: bool) -> String {
    let mut s = String::new();
    for c in chunks {
        s.push_str(&format!("data: {c}\n\n"));
    }
    if done {
        s.push_str("data: [DONE]\n\n");
    }
    s
}

/// One streamed Chat Completions chunk with the given delta.
pub fn openai_chunk(delta: serde_json::Value, finish_reason: Option<&str>) -> serde_json::Value {
    serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 1_760_000_000u64, "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})
}

/// A non-streaming Chat Completions answer with the given message.
pub fn openai_completion(message: serde_json::Value, finish_reason: &str) -> serde_json::Value {
    serde_json::json!({"id": "chatcmpl-mock", "object": "chat.completion", "created": 1_760_000_000u64, "model": "mock",
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25}})
}

/// A complete Anthropic `Message` JSON with one text block.
pub fn anthropic_message(model: &str, text: &str) -> serde_json::Value {
    serde_json::json!({
        "id": "msg_mock01", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn", "stop_sequence": null,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 5}
    })
}

/// A complete Anthropic event stream with one text block split into words.
pub fn anthropic_stream(model: &str, text: &str) -> String {
    let mut out = String::new();
    let mut event = |name: &str, data: serde_json::Value| {
        out.push_str(&format!("event: {name}\ndata: {data}\n\n"));
    };
    event(
        "message_start",
        serde_json::json!({"type": "message_start", "message": {
        "id": "msg_mock01", "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": null, "stop_sequence": null,
        "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
    );
    event(
        "content_block_start",
        serde_json::json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
    );
    event("ping", serde_json::json!({"type": "ping"}));
    for word in text.split_inclusive(' ') {
        event(
            "content_block_delta",
            serde_json::json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": word}}),
        );
    }
    event(
        "content_block_stop",
        serde_json::json!({"type": "content_block_stop", "index": 0}),
    );
    event(
        "message_delta",
        serde_json::json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 5}}),
    );
    event("message_stop", serde_json::json!({"type": "message_stop"}));
    out
}

/// Splits an SSE text after each blank line.
pub fn split_events(body: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(i) = rest.find("\n\n") {
        out.push(rest[..i + 2].to_owned());
        rest = &rest[i + 2..];
    }
    if !rest.is_empty() {
        out.push(rest.to_owned());
    }
    out
}

/// One request as the provider received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    /// Path with query string.
    pub path: String,
    /// Header names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

#[derive(Debug)]
struct Shared {
    script: Mutex<VecDeque<Reply>>,
    default: Mutex<Reply>,
    requests: Mutex<Vec<Recorded>>,
    client_closed: AtomicUsize,
    /// Added before the first byte of every model answer.
    latency: Mutex<Duration>,
    /// Pause between the events of a model stream.
    event_gap: Mutex<Duration>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running fake provider. Dropping it stops accepting connections.
#[derive(Debug)]
pub struct MockProvider {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl Drop for MockProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockProvider {
    /// Starts on `127.0.0.1:0`; every request gets `default` unless a reply was pushed.
    pub async fn start(default: Reply) -> std::io::Result<Self> {
        Self::bind("127.0.0.1:0", default).await
    }

    pub async fn bind(addr: &str, default: Reply) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            script: Mutex::new(VecDeque::new()),
            default: Mutex::new(default),
            requests: Mutex::new(Vec::new()),
            client_closed: AtomicUsize::new(0),
            latency: Mutex::new(Duration::ZERO),
            event_gap: Mutex::new(Duration::ZERO),
        });
        let s = Arc::clone(&shared);
        let task = tokio::spawn(async move {
            while let Ok((socket, _)) = listener.accept().await {
                let _ = socket.set_nodelay(true);
                tokio::spawn(serve_connection(socket, Arc::clone(&s)));
            }
        });
        Ok(Self { addr, shared, task })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The next request gets `reply` (replies queue up in order).
    pub fn push(&self, reply: Reply) {
        lock(&self.shared.script).push_back(reply);
    }

    /// Drops every reply still queued.
    pub fn clear_script(&self) {
        lock(&self.shared.script).clear();
    }

    pub fn set_default(&self, reply: Reply) {
        *lock(&self.shared.default) = reply;
    }

    pub fn requests(&self) -> Vec<Recorded> {
        lock(&self.shared.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// Latency before the first byte of every model answer, and the pause between stream events.
    pub fn set_latency(&self, first_byte: Duration, between_events: Duration) {
        *lock(&self.shared.latency) = first_byte;
        *lock(&self.shared.event_gap) = between_events;
    }

    /// How many times a client closed the connection while a reply was pending or streaming.
    pub fn client_closed(&self) -> usize {
        self.shared.client_closed.load(Ordering::SeqCst)
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        413 => "Payload Too Large",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

fn head(status: u16, headers: &[(String, String)], framing: &str) -> Vec<u8> {
    let mut h = format!("HTTP/1.1 {status} {}\r\n{framing}", reason(status));
    for (n, v) in headers {
        h.push_str(&format!("{n}: {v}\r\n"));
    }
    h.push_str("\r\n");
    h.into_bytes()
}

/// Reads one request; `None` when the client closed the connection or sent garbage.
async fn read_request(socket: &mut TcpStream, buf: &mut Vec<u8>) -> Option<Recorded> {
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(head_len)) = req.parse(buf) {
            let method = req.method.unwrap_or("").to_owned();
            let path = req.path.unwrap_or("").to_owned();
            let headers: Vec<(String, String)> = req
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_ascii_lowercase(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect();
            let len = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            while buf.len() < head_len + len {
                let mut chunk = [0u8; 65536];
                let n = socket.read(&mut chunk).await.ok()?;
                if n == 0 {
                    return None;
                }
                buf.extend_from_slice(&chunk[..n]);
            }
            let body = buf[head_len..head_len + len].to_vec();
            buf.drain(..head_len + len);
            return Some(Recorded {
                method,
                path,
                headers,
                body,
            });
        }
        let mut chunk = [0u8; 65536];
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until the client closes the connection.
async fn wait_for_close(socket: &mut TcpStream, shared: &Shared) {
    let mut sink = [0u8; 1024];
    loop {
        match socket.read(&mut sink).await {
            Ok(0) | Err(_) => {
                shared.client_closed.fetch_add(1, Ordering::SeqCst);
                return;
            }
            Ok(_) => {}
        }
    }
}

/// The control endpoints: `POST /_mock/push` (a fault spec, or a list of them), `GET /_mock/requests`,
/// `POST /_mock/reset`.
fn control(request: &Recorded, shared: &Shared) -> Reply {
    let path = request.path.split('?').next().unwrap_or("");
    match (request.method.as_str(), path) {
        ("POST", "/_mock/push") => {
            let spec = request.json();
            let specs = match spec {
                serde_json::Value::Array(items) => items,
                one => vec![one],
            };
            let mut pushed = 0;
            for s in &specs {
                let count = s
                    .get("count")
                    .and_then(serde_json::Value::as_u64)
                    .unwrap_or(1);
                let Some(reply) = Reply::from_spec(s) else {
                    return Reply::json(
                        400,
                        &serde_json::json!({"error": format!("unknown fault spec {s}")}),
                    );
                };
                for _ in 0..count {
                    lock(&shared.script).push_back(reply.clone());
                    pushed += 1;
                }
            }
            Reply::json(200, &serde_json::json!({"queued": pushed}))
        }
        ("GET", "/_mock/requests") => {
            let list: Vec<serde_json::Value> = lock(&shared.requests)
                .iter()
                .map(|r| {
                    let headers: serde_json::Map<String, serde_json::Value> =
                        r.headers.iter().map(|(n, v)| (n.clone(), serde_json::Value::String(v.clone()))).collect();
                    serde_json::json!({"method": r.method, "path": r.path, "headers": headers, "body": r.json()})
                })
                .collect();
            Reply::json(200, &serde_json::Value::Array(list))
        }
        ("POST", "/_mock/reset") => {
            lock(&shared.script).clear();
            lock(&shared.requests).clear();
            Reply::json(200, &serde_json::json!({"reset": true}))
        }
        _ => Reply::json(
            404,
            &serde_json::json!({"error": "unknown control endpoint"}),
        ),
    }
}

/// Turns model-like replies into concrete bytes for this request.
fn resolve(reply: Reply, request: &Recorded, shared: &Shared) -> Reply {
    let latency = *lock(&shared.latency);
    let gap = *lock(&shared.event_gap);
    // A `Model` with a delay is stored as a placeholder stream with one empty chunk.
    let (reply, extra_delay) = match reply {
        Reply::Stream {
            status: 0, chunks, ..
        } => (Reply::Model, chunks.first().map_or(Duration::ZERO, |c| c.0)),
        other => (other, Duration::ZERO),
    };
    let delay = latency + extra_delay;
    let body = request.json();
    let dialect = brain::dialect_of(&request.path);
    let stream = body.get("stream").and_then(serde_json::Value::as_bool) == Some(true);
    if request.path.contains("/count_tokens") && matches!(reply, Reply::Model) {
        let n = (request.body.len() / 4).max(1);
        return Reply::json(200, &serde_json::json!({"input_tokens": n})).with_delay(delay);
    }
    let sse_reply = |events: Vec<String>, end: End| {
        let mut chunks: Vec<(Duration, Vec<u8>)> =
            events.into_iter().map(|e| (gap, e.into_bytes())).collect();
        if let Some(first) = chunks.first_mut() {
            first.0 = delay;
        }
        Reply::sse_chunks(chunks, end)
    };
    match reply {
        Reply::Model if stream => sse_reply(brain::events(&body, dialect), End::Complete),
        Reply::Model => Reply::json(200, &brain::message(&body, dialect)).with_delay(delay),
        Reply::ModelCut(after) if stream => {
            let mut events = brain::events(&body, dialect);
            if after == usize::MAX {
                // Truncated SSE: half of the third event, then the connection closes.
                events.truncate(3);
                if let Some(last) = events.last_mut() {
                    let half = last.len() / 2;
                    last.truncate(half);
                }
            } else {
                events.truncate(after);
            }
            sse_reply(events, End::Cut)
        }
        Reply::ModelCut(_) => {
            let full = brain::message(&body, dialect).to_string();
            Reply::Stream {
                status: 200,
                headers: vec![("content-type".into(), "application/json".into())],
                chunks: vec![(delay, full.as_bytes()[..full.len() / 2].to_vec())],
                end: End::Cut,
            }
        }
        Reply::ModelStreamError if stream => {
            sse_reply(vec![brain::stream_error(dialect)], End::Complete)
        }
        Reply::ModelStreamError => match dialect {
            brain::Dialect::Anthropic => Reply::json(
                200,
                &serde_json::json!({"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}),
            ),
            brain::Dialect::Openai => Reply::json(
                200,
                &serde_json::json!({"error":{"message":"The server is overloaded","type":"server_error"}}),
            ),
        },
        Reply::ModelMalformed if stream => match dialect {
            brain::Dialect::Anthropic => sse_reply(
                vec!["event: message_start\ndata: {not json\n\n".into()],
                End::Complete,
            ),
            brain::Dialect::Openai => sse_reply(vec!["data: {not json\n\n".into()], End::Complete),
        },
        Reply::ModelMalformed => Reply::Full {
            status: 200,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{not json".to_vec(),
            delay,
        },
        other => other,
    }
}

async fn write_full(socket: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    if let Reply::Full {
        status,
        headers,
        body,
        ..
    } = reply
    {
        let mut out = head(
            *status,
            headers,
            &format!("content-length: {}\r\n", body.len()),
        );
        out.extend_from_slice(body);
        socket.write_all(&out).await?;
    }
    Ok(())
}

async fn serve_connection(mut socket: TcpStream, shared: Arc<Shared>) {
    let mut buf = Vec::new();
    while let Some(request) = read_request(&mut socket, &mut buf).await {
        if request.path.starts_with("/_mock/") {
            let reply = control(&request, &shared);
            if write_full(&mut socket, &reply).await.is_err() {
                return;
            }
            continue;
        }
        let scripted = lock(&shared.script)
            .pop_front()
            .unwrap_or_else(|| lock(&shared.default).clone());
        let reply = resolve(scripted, &request, &shared);
        lock(&shared.requests).push(request);
        match reply {
            Reply::DropBeforeHeaders => return,
            // Resolved above; nothing model-like reaches this point.
            Reply::Model | Reply::ModelCut(_) | Reply::ModelStreamError | Reply::ModelMalformed => {
                return;
            }
            Reply::Hang => {
                wait_for_close(&mut socket, &shared).await;
                return;
            }
            Reply::Full {
                status,
                headers,
                body,
                delay,
            } => {
                if !delay.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = wait_for_close(&mut socket, &shared) => return,
                    }
                }
                let mut out = head(
                    status,
                    &headers,
                    &format!("content-length: {}\r\n", body.len()),
                );
                out.extend_from_slice(&body);
                if socket.write_all(&out).await.is_err() {
                    shared.client_closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
            }
            Reply::Stream {
                status,
                headers,
                chunks,
                end,
            } => {
                if socket
                    .write_all(&head(status, &headers, "transfer-encoding: chunked\r\n"))
                    .await
                    .is_err()
                {
                    return;
                }
                for (delay, bytes) in chunks {
                    if !delay.is_zero() {
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => {}
                            _ = wait_for_close(&mut socket, &shared) => return,
                        }
                    }
                    if bytes.is_empty() {
                        continue;
                    }
                    let mut out = format!("{:x}\r\n", bytes.len()).into_bytes();
                    out.extend_from_slice(&bytes);
                    out.extend_from_slice(b"\r\n");
                    if socket.write_all(&out).await.is_err() {
                        shared.client_closed.fetch_add(1, Ordering::SeqCst);
                        return;
                    }
                }
                match end {
                    End::Complete => {
                        if socket.write_all(b"0\r\n\r\n").await.is_err() {
                            return;
                        }
                    }
                    End::Cut => return,
                    End::Hang => {
                        wait_for_close(&mut socket, &shared).await;
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_builder_splits_into_whole_events() {
        let s = anthropic_stream("m", "a b");
        let parts = split_events(&s);
        assert_eq!(parts.concat(), s);
        assert!(
            parts
                .iter()
                .all(|p| p.ends_with("\n\n") && p.starts_with("event: "))
        );
        assert!(
            parts[0].contains("message_start") && parts.last().unwrap().contains("message_stop")
        );
    }
}
