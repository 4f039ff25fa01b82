//! The HTTP front: the router, its fallbacks (every error Anthropic-shaped) and `serve`.
//!
//! `POST /v1/messages`, nearly every request a balancer serves, and `POST /v1/chat/completions`
//! go straight from hyper to their handlers (the same key check, the same panic answer);
//! everything else goes through the router.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use futures_util::FutureExt;
use http::StatusCode;
use http::{Method, Request};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{admin, inbound};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        // `POST` is served by `front` before the router; the route stays for the 405 on other methods.
        .route("/v1/messages", post(inbound::messages))
        .route("/v1/messages/count_tokens", post(inbound::count_tokens))
        .route("/v1/chat/completions", post(inbound::openai::chat_completions))
        .route("/v1/responses", post(inbound::openai::responses))
        .route(
            "/v1/responses/{*rest}",
            axum::routing::any(|| async {
                openai_not_found(
                    "this gateway stores no responses: retrieve, cancel, input_items and compact are not available",
                )
            }),
        )
        .route("/providers", get(admin::providers))
        .route("/providers/reload", post(admin::reload))
        .route("/cache/clear", post(admin::clear_cache))
        .route("/usage", get(admin::usage))
        .route("/v1/models", get(admin::models::list))
        .route("/v1/models/{id}", get(admin::models::one))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
        .route("/dashboard", get(admin::dashboard))
        .route("/dashboard/data", get(admin::dashboard_data))
        .route("/", get(admin::root))
        // Claude Code's connection-warming probe and telemetry: cheap answers instead of 404 noise.
        .route(
            "/api/hello",
            head(|| async { StatusCode::OK }).get(|| async { StatusCode::OK }),
        )
        .route(
            "/api/event_logging/{*rest}",
            post(|| async { axum::Json(serde_json::json!({})) }),
        )
        .fallback(|| async { ApiError::not_found("no such endpoint").into_response() })
        .method_not_allowed_fallback(|| async { ApiError::method_not_allowed().into_response() })
        .layer(axum::middleware::from_fn_with_state(
            Arc::clone(&state),
            inbound::auth::guard,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

/// A 404 in OpenAI's error shape.
fn openai_not_found(message: &str) -> Response {
    crate::error::openai_response(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        message,
        Some("not_found"),
    )
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::internal("internal error in the balancer").into_response()
}

/// The service for one client connection. Each request counts as activity on the connection
/// until its response head is ready (after that, its body's bytes do).
fn front(
    state: Arc<AppState>,
    app: Router,
    activity: Arc<Activity>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response,
    Error = Infallible,
    Future = impl Future<Output = Result<Response, Infallible>> + Send,
> + Clone {
    service_fn(move |request: Request<Incoming>| {
        let (state, app) = (Arc::clone(&state), app.clone());
        let busy = Busy::new(&activity);
        async move {
            let _busy = busy;
            // Boxed: hyper keeps one slot the size of this future for every connection's whole life
            // (streams included), while a box is freed as soon as the answer's head is ready.
            if request.method() == Method::POST && request.uri().path() == "/v1/messages" {
                let served = AssertUnwindSafe(Box::pin(messages(state, request))).catch_unwind();
                return Ok(served.await.unwrap_or_else(panic_response));
            }
            if request.method() == Method::POST && request.uri().path() == "/v1/chat/completions" {
                let served =
                    AssertUnwindSafe(Box::pin(chat_completions(state, request))).catch_unwind();
                return Ok(served.await.unwrap_or_else(panic_response));
            }
            Box::pin(app.oneshot(request.map(Body::new))).await
        }
    })
}

async fn chat_completions(state: Arc<AppState>, request: Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let caller = match inbound::auth::check(&state, &parts.uri, &parts.headers) {
        Ok(caller) => caller,
        Err(why) => return inbound::auth::refuse_openai(why),
    };
    inbound::openai::chat_completions(
        State(state),
        axum::Extension(caller),
        parts.headers,
        Body::new(body),
    )
    .await
}

async fn messages(state: Arc<AppState>, request: Request<Incoming>) -> Response {
    let (parts, body) = request.into_parts();
    let caller = match inbound::auth::check(&state, &parts.uri, &parts.headers) {
        Ok(caller) => caller,
        Err(why) => return inbound::auth::refuse(why),
    };
    inbound::messages(
        State(state),
        axum::Extension(caller),
        parts.uri,
        parts.headers,
        Body::new(body),
    )
    .await
}

/// Keeps a timer always due within [`TICK`]. tokio wakes its timer driver (an `eventfd` write and
/// a thread wake-up) whenever a new timer is due before everything it already waits for; every
/// request registers long timers (the header read timeout, the body timeout), and with no short
/// timer pending each one did: about 0.4 extra `write` calls and 0.3 `futex` calls per request.
async fn timer_ticker() {
    let mut tick = tokio::time::interval(TICK);
    loop {
        tick.tick().await;
    }
}

/// The period of [`timer_ticker`].
const TICK: Duration = Duration::from_secs(1);

/// Drops what has expired from the books that would otherwise keep it until they fill: session
/// affinity and the response cache.
async fn housekeeping(state: Arc<AppState>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    loop {
        tick.tick().await;
        let now = tokio::time::Instant::now();
        state.affinity.sweep(now);
        state.keys.sweep(now);
        state.dedup.sweep_cache(now);
    }
}

/// The period of [`housekeeping`].
const HOUSEKEEPING: Duration = Duration::from_secs(60);

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A new connection must send its first bytes within this time.
pub const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection with no request being answered and no byte in either direction for this long is
/// closed (checked this often, so it goes within twice this time). HTTP/1 keep-alive and HTTP/2
/// alike: idle sockets must not pile up until the process runs out of descriptors.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// What the idle check of one connection sees: bytes moved and requests being answered.
#[derive(Debug, Default)]
pub struct Activity {
    /// Bumped by every read or write that moved bytes.
    moved: AtomicU64,
    /// Requests whose response head is not ready yet.
    busy: AtomicUsize,
}

/// One request being answered on a connection.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.busy.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(activity))
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Resolves when the connection should be closed: nothing arrived within
/// [`FIRST_REQUEST_TIMEOUT`], or later nothing moved for [`IDLE_TIMEOUT`] with no request being
/// answered.
async fn idle(activity: Arc<Activity>) {
    tokio::time::sleep(FIRST_REQUEST_TIMEOUT).await;
    let mut seen = 0;
    loop {
        let moved = activity.moved.load(Ordering::Relaxed);
        if moved == seen && activity.busy.load(Ordering::Relaxed) == 0 {
            return;
        }
        seen = moved;
        tokio::time::sleep(IDLE_TIMEOUT).await;
    }
}

/// A client connection's socket, counting the reads and writes that move bytes.
struct Watched {
    tcp: TcpStream,
    activity: Arc<Activity>,
}

impl Watched {
    fn moved<T>(&self, r: Poll<std::io::Result<T>>) -> Poll<std::io::Result<T>> {
        if matches!(r, Poll::Ready(Ok(_))) {
            self.activity.moved.fetch_add(1, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.tcp).poll_read(cx, buf);
        self.moved(r)
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        self.moved(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write_vectored(cx, bufs);
        self.moved(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A client must send its request headers within this time.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After the grace period, streams still open get a moment to flush their final error event.
const FLUSH_AFTER_GRACE: Duration = Duration::from_secs(2);

/// The most a client connection's read buffer grows to. A buffer keeps its size while its
/// connection lives, and a streamed answer keeps the connection for minutes: an unbounded buffer
/// sized to a 40 KB request body would be held by every open stream.
const READ_BUFFER_BYTES: usize = 16 * 1024;

/// Serves until `shutdown` resolves, then stops accepting, lets requests in flight finish within
/// `settings.shutdown_grace_seconds`, and ends the streams still open with an `event: error`.
/// TCP_NODELAY is set on every client connection; slow request headers are cut off. Every
/// connection is served on the runtime `serve` runs on.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_on(listener, state, shutdown, &[]).await
}

/// [`serve`], with each accepted connection handed in turn to one of `workers` (single-threaded
/// runtimes, one per core; none: the current runtime) and served there for its whole life.
///
/// Why not one work-stealing runtime: reading a request body inside its connection's task makes
/// hyper wake that same task, tokio reschedules a task woken during its own poll as a yield, and a
/// yield wakes an idle sibling worker, which steals the request and finishes it on another, cold
/// CPU. On an idle machine (one Claude Code session) that cost every request a `futex` call, a
/// context switch and a CPU migration (BENCHMARKS.md, issue 15). A connection pinned to one
/// single-threaded runtime, with the upstream pool of that runtime's thread
/// (`upstream::client`), has no sibling to wake.
pub async fn serve_on(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    workers: &[tokio::runtime::Handle],
) -> std::io::Result<()> {
    let app = router(Arc::clone(&state));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(READ_BUFFER_BYTES);
    builder.http2().timer(TokioTimer::new());
    let graceful = GracefulShutdown::new();
    // Aborted when `serve` returns or is dropped. Each serving runtime's timer driver gets its
    // ticker (the binary's accepting runtime is one of its workers).
    let _tickers: Vec<AbortOnDrop> = if workers.is_empty() {
        vec![AbortOnDrop(tokio::spawn(timer_ticker()))]
    } else {
        workers
            .iter()
            .map(|w| AbortOnDrop(w.spawn(timer_ticker())))
            .collect()
    };
    let _housekeeping = AbortOnDrop(tokio::spawn(housekeeping(Arc::clone(&state))));
    let mut next_worker = 0usize;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, _) = match accepted {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors and the like: wait a little instead of spinning.
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(e) = tcp.set_nodelay(true) {
                    tracing::debug!("cannot set TCP_NODELAY: {e}");
                }
                let (state, app, builder, watcher) =
                    (Arc::clone(&state), app.clone(), builder.clone(), graceful.watcher());
                let connection = move |tcp: TcpStream| async move {
                    let activity = Arc::new(Activity::default());
                    let service = front(state, app, Arc::clone(&activity));
                    let io = Watched { tcp, activity: Arc::clone(&activity) };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
                    let conn = watcher.watch(conn.into_owned());
                    // Dropping an idle connection closes its socket.
                    tokio::select! {
                        _ = conn => {}
                        () = idle(activity) => {}
                    }
                };
                match workers.get(next_worker % workers.len().max(1)) {
                    None => {
                        tokio::spawn(connection(tcp));
                    }
                    Some(worker) => {
                        next_worker = next_worker.wrapping_add(1);
                        // The socket moves to the worker's own I/O driver.
                        match tcp.into_std() {
                            Ok(std) => {
                                worker.spawn(async move {
                                    match TcpStream::from_std(std) {
                                        Ok(tcp) => connection(tcp).await,
                                        Err(e) => tracing::warn!("cannot serve a connection: {e}"),
                                    }
                                });
                            }
                            Err(e) => tracing::warn!("cannot hand a connection over: {e}"),
                        }
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let grace = state.runtime().config.settings.shutdown_grace;
    tracing::info!(
        grace_seconds = grace.as_secs_f64(),
        "no longer accepting; waiting for requests in flight"
    );
    let drained = graceful.shutdown();
    tokio::pin!(drained);
    tokio::select! {
        () = &mut drained => {}
        () = tokio::time::sleep(grace) => {
            tracing::warn!("grace period over: ending the streams still open");
            state.close_streams();
            let _ = tokio::time::timeout(FLUSH_AFTER_GRACE, &mut drained).await;
        }
    }
    Ok(())
}
