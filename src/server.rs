//! The HTTP front: the router, its fallbacks (every error Anthropic-shaped) and `serve`.

use std::any::Any;
use std::future::Future;
use std::sync::Arc;

use axum::Router;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, head, post};
use axum::serve::ListenerExt;
use http::StatusCode;
use tokio::net::TcpListener;
use tower_http::catch_panic::CatchPanicLayer;

use crate::error::ApiError;
use crate::state::AppState;
use crate::{admin, inbound};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/v1/messages", post(inbound::messages))
        .route("/v1/messages/count_tokens", post(inbound::count_tokens))
        .route("/providers", get(admin::providers))
        .route("/providers/reload", post(admin::reload))
        .route("/cache/clear", post(admin::clear_cache))
        .route("/health", get(admin::health))
        .route("/metrics", get(admin::metrics))
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
        .layer(CatchPanicLayer::custom(panic_response))
        .with_state(state)
}

fn panic_response(_: Box<dyn Any + Send + 'static>) -> Response {
    ApiError::internal("internal error in the balancer").into_response()
}

/// Serves until `shutdown` resolves. TCP_NODELAY is set on every client connection.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("cannot set TCP_NODELAY: {e}");
        }
    });
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}
