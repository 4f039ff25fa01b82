//! The client side: reading and validating `POST /v1/messages` and `count_tokens` requests.

pub mod auth;
pub mod body;
pub mod canonical;
pub mod count_tokens;
pub mod openai;

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::response::Response;
use bytes::{Bytes, BytesMut};
use http::{HeaderMap, Uri};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::clients::{Caller, Client};
use crate::dispatch::{Answer, Endpoint, Inbound};
use crate::error::ApiError;
use crate::observability::{self, Record};
use crate::respond::respond;
use crate::state::AppState;
use body::Envelope;

/// A client must send its whole request body within this time.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// Reads the whole request body, refusing more than `limit` bytes with a 413.
///
/// The bytes are gathered into one buffer sized from `content-length`, each frame released as soon
/// as it is copied: gathering all frames first and joining them at the end held every body twice
/// while a burst of requests was being read.
pub async fn read_request_body(
    body: Body,
    headers: &HeaderMap,
    limit: usize,
) -> Result<Bytes, ApiError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(ApiError::too_large(limit));
    }
    let capacity = declared.map_or(0, |n| usize::try_from(n).unwrap_or(0));
    let gather = async move {
        let mut body = Limited::new(body, limit);
        let mut gathered: Option<BytesMut> = None;
        let mut single: Option<Bytes> = None;
        while let Some(frame) = body.frame().await {
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            match (&mut gathered, single.take()) {
                (Some(buf), _) => buf.extend_from_slice(&data),
                // The first frame: kept as it is if it turns out to be the whole body.
                (None, None) => single = Some(data),
                (None, Some(first)) => {
                    let mut buf = BytesMut::with_capacity(capacity.max(first.len() + data.len()));
                    buf.extend_from_slice(&first);
                    buf.extend_from_slice(&data);
                    gathered = Some(buf);
                }
            }
        }
        Ok::<Bytes, Box<dyn std::error::Error + Send + Sync>>(match (gathered, single) {
            (Some(buf), _) => buf.freeze(),
            (None, Some(one)) => one,
            (None, None) => Bytes::new(),
        })
    };
    match tokio::time::timeout(BODY_READ_TIMEOUT, gather).await {
        Ok(Ok(bytes)) => Ok(bytes),
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Err(ApiError::too_large(limit))
        }
        Ok(Err(e)) => Err(ApiError::invalid_request(format!(
            "could not read the request body: {e}"
        ))),
        Err(_) => Err(ApiError::new(
            http::StatusCode::REQUEST_TIMEOUT,
            "timeout_error",
            format!(
                "the request body did not arrive within {} s",
                BODY_READ_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// The Claude Code session id of a request, from its header or from `metadata.user_id`.
/// A session id longer than this is replaced by a hash of itself: affinity still works, and the
/// affinity book and the log lines hold a bounded string (Claude Code's ids are 36-byte UUIDs).
pub const MAX_SESSION_ID_BYTES: usize = 128;

pub(crate) fn session_id(headers: &HeaderMap, from_metadata: Option<&str>) -> Option<String> {
    let id = headers
        .get("x-claude-code-session-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty())
        .or(from_metadata)?;
    Some(if id.len() <= MAX_SESSION_ID_BYTES {
        id.to_owned()
    } else {
        format!("hashed-{:032x}", xxhash_rust::xxh3::xxh3_128(id.as_bytes()))
    })
}

/// Reads and validates a request body.
async fn read_envelope(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    sign: bool,
) -> Result<(Bytes, Envelope), ApiError> {
    let runtime = state.runtime();
    let settings = &runtime.config.settings;
    let raw = read_request_body(body, headers, settings.max_request_bytes).await?;
    // The signature is only worth computing when coalescing or the cache will use it.
    let sign = sign && settings.signs_requests();
    let envelope = body::parse_with(&raw, sign)?;
    Ok((raw, envelope))
}

/// Reads and validates the body of a request to `endpoint`: its record and its [`Inbound`], or
/// its record and the refusal.
async fn accept(
    state: &AppState,
    endpoint: Endpoint,
    id: String,
    uri: &Uri,
    headers: HeaderMap,
    body: Body,
) -> Result<(Record, Inbound), (Record, ApiError)> {
    let messages = endpoint == Endpoint::Messages;
    let (raw, envelope) = match read_envelope(state, &headers, body, messages).await {
        Ok(x) => x,
        Err(e) => return Err((Record::new(id, endpoint, None, String::new(), false), e)),
    };
    let session = session_id(&headers, envelope.metadata_session.as_deref());
    let record = Record::new(
        id,
        endpoint,
        session.clone(),
        envelope.model.clone(),
        messages && envelope.stream,
    );
    let query = uri.query().map(str::to_owned);
    Ok((record, Inbound::new(envelope, raw, headers, query, session)))
}

pub async fn messages(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.started();
    let id = observability::request_id(&headers);
    let permit = match permit(&state) {
        Ok(permit) => permit,
        Err(busy) => {
            let record = Record::new(id, Endpoint::Messages, None, String::new(), false);
            return respond(&state, record, None, Answer::error(busy));
        }
    };
    match accept(&state, Endpoint::Messages, id, &uri, headers, body).await {
        Ok((mut record, inbound)) => {
            if let Some(client) = caller.0 {
                record.client = Some(Arc::clone(&client.name));
                if let Err(refusal) =
                    admit(&state, &client, &inbound.envelope.model, &mut record).await
                {
                    return respond(&state, record, permit, Answer::error(refusal));
                }
                record.charge_to = Some(client);
            }
            let answer = crate::dedup::serve(&state, inbound).await;
            respond(&state, record, permit, answer)
        }
        Err((mut record, refusal)) => {
            record.client = caller.0.map(|c| Arc::clone(&c.name));
            respond(&state, record, permit, Answer::error(refusal))
        }
    }
}

/// A place among the balancer's concurrent requests when `max_concurrent_requests` is set, or the
/// 529 that says none is left.
pub(crate) fn permit(state: &AppState) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
    let limit = state.runtime().limit.clone();
    match limit.map(Semaphore::try_acquire_owned) {
        None => Ok(None),
        Some(Ok(permit)) => Ok(Some(permit)),
        Some(Err(_)) => {
            let max = state.runtime().config.settings.max_concurrent_requests;
            Err(ApiError::new(
                http::StatusCode::from_u16(529).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
                format!("the balancer is serving its maximum of {max} concurrent requests"),
            )
            .with_retry_after(1))
        }
    }
}

/// The 403 for a named client asking for a model outside its list (counted in the metrics), or
/// `None` when it may use `model`.
fn model_refusal(state: &AppState, client: &Client, model: &str) -> Option<ApiError> {
    if client.may_use(model) {
        return None;
    }
    state.metrics.client_refused(&client.name, "models");
    Some(ApiError::new(
        http::StatusCode::FORBIDDEN,
        "permission_error",
        format!("client {:?} may not use model {model:?}", &*client.name),
    ))
}

/// A named client's request: refused with 403 for a model it may not use, or with 429 when it is
/// over one of its limits (before any provider is asked); else admitted, holding its place among
/// the client's concurrent requests until the response ends.
pub(crate) async fn admit(
    state: &Arc<AppState>,
    client: &Arc<Client>,
    model: &str,
    record: &mut Record,
) -> Result<(), ApiError> {
    if let Some(refusal) = model_refusal(state, client, model) {
        return Err(refusal);
    }
    if client.limits.is_empty() {
        return Ok(());
    }
    // With the Redis backend the windows are the cluster's; the ledger still holds this
    // instance's concurrent requests (and the windows, should Redis go away).
    let now = tokio::time::Instant::now();
    let admitted = match &state.cluster {
        // This instance's concurrent requests first: a request refused for them must not use up
        // one of the cluster's requests of the minute.
        Some(cluster) => match state.ledger.admit_checked(client, now) {
            Err(refusal) => Err(refusal),
            Ok(admission) => match cluster.admit_client(client).await {
                Some(Ok(())) => Ok(admission),
                Some(Err(refusal)) => Err(refusal),
                None => {
                    drop(admission);
                    state.ledger.admit(client, tokio::time::Instant::now())
                }
            },
        },
        None => state.ledger.admit(client, now),
    };
    match admitted {
        Ok(admission) => {
            record.admission = Some(admission);
            Ok(())
        }
        Err(refusal) => {
            state.metrics.client_refused(&client.name, refusal.limit);
            let secs = refusal.retry_after.as_secs_f64().ceil().max(1.0) as u64;
            Err(ApiError::new(
                http::StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                refusal.message,
            )
            .with_retry_after(secs))
        }
    }
}

pub async fn count_tokens(
    State(state): State<Arc<AppState>>,
    Extension(caller): Extension<Caller>,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    state.metrics.started();
    let id = observability::request_id(&headers);
    match accept(&state, Endpoint::CountTokens, id, &uri, headers, body).await {
        Ok((mut record, inbound)) => {
            // A named client counts tokens only for the models it may use (no limits: a count
            // costs nothing).
            if let Some(client) = caller.0 {
                record.client = Some(Arc::clone(&client.name));
                if let Some(refusal) = model_refusal(&state, &client, &inbound.envelope.model) {
                    return respond(&state, record, None, Answer::error(refusal));
                }
            }
            let answer = count_tokens::count_tokens(&state, inbound).await;
            respond(&state, record, None, answer)
        }
        Err((record, refusal)) => respond(&state, record, None, Answer::error(refusal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_session_ids_are_hashed_to_a_bounded_string() {
        let mut h = HeaderMap::new();
        assert_eq!(session_id(&h, Some("abc")), Some("abc".into()));
        h.insert("x-claude-code-session-id", "from-header".parse().unwrap());
        assert_eq!(session_id(&h, Some("abc")), Some("from-header".into()));
        let long = "s".repeat(20 * 1024 * 1024);
        let a = session_id(&HeaderMap::new(), Some(&long)).unwrap();
        let b = session_id(&HeaderMap::new(), Some(&long)).unwrap();
        assert!(a.len() <= MAX_SESSION_ID_BYTES, "{}", a.len());
        assert_eq!(a, b, "the same session keeps the same key");
        let other = session_id(&HeaderMap::new(), Some(&"t".repeat(200))).unwrap();
        assert_ne!(a, other);
        let edge = "e".repeat(MAX_SESSION_ID_BYTES);
        assert_eq!(
            session_id(&HeaderMap::new(), Some(&edge)),
            Some(edge.clone())
        );
    }
}
