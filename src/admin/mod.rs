//! Admin and status endpoints: `GET /providers`, `POST /providers/reload`, `GET /health`, `GET /`.
//! Secrets are masked in everything they return.

pub mod models;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde_json::{Value, json};
use tokio::time::Instant;

use crate::config::{Auth, ModelMapping};
use crate::routing::health::{HealthReport, HealthState};
use crate::secret::mask_url_credentials;
use crate::state::{AppState, Runtime};
use crate::upstream::Provider;

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 10.0).round() / 10.0
}

/// The state shown for a provider: configuration first, then health, then credentials.
fn display_state(p: &Provider, health: HealthState) -> &'static str {
    if !p.config.usable() {
        "disabled"
    } else if health != HealthState::Healthy {
        health.as_str()
    } else if !p.has_credentials() {
        "no_credentials"
    } else {
        "healthy"
    }
}

/// A provider's key pool as `/providers` shows it: each key masked, with its state and the last
/// rate-limit figures the provider reported for it; `null` without a pool.
fn keys(state: &AppState, pc: &crate::config::ProviderConfig, now: Instant) -> Value {
    if pc.keys.is_empty() {
        return Value::Null;
    }
    let reports = state.keys.report(&pc.name, &pc.keys, now);
    Value::Array(
        pc.keys
            .iter()
            .zip(reports)
            .map(|(k, r)| {
                json!({
                    "name": k.name,
                    "credentials": credentials(&k.auth),
                    "state": if r.resting.is_zero() { "available" } else { "resting" },
                    "resting_seconds": secs(r.resting),
                    "reason": r.reason,
                    "requests_remaining": r.requests_remaining,
                    "tokens_remaining": r.tokens_remaining,
                    "reset": r.reset.map(rfc3339),
                    "requests": r.uses,
                })
            })
            .collect(),
    )
}

fn credentials(auth: &Auth) -> Value {
    match auth {
        Auth::ApiKey(k) => json!({"kind": "x-api-key", "value": k.masked()}),
        Auth::Bearer(k) => json!({"kind": "bearer", "value": k.masked()}),
        Auth::Passthrough => json!({"kind": "passthrough"}),
        Auth::None => json!({"kind": "none"}),
    }
}

/// One configured provider as the admin views show it.
struct Row<'a> {
    provider: &'a Provider,
    health: HealthReport,
    shown: &'static str,
}

impl Row<'_> {
    /// Enabled and not cooling down: it may serve the next request.
    fn usable(&self) -> bool {
        self.provider.config.usable() && self.health.state != HealthState::CoolingDown
    }
}

/// Every configured provider with its health, in file order.
fn rows<'a>(state: &AppState, runtime: &'a Runtime) -> Vec<Row<'a>> {
    let now = Instant::now();
    runtime
        .config
        .providers
        .iter()
        .filter_map(|pc| runtime.providers.get(&pc.name))
        .map(|p| {
            let health = state.health.report(&p.config.name, now);
            let shown = display_state(p, health.state);
            Row {
                provider: p,
                health,
                shown,
            }
        })
        .collect()
}

pub async fn providers(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime();
    let now = Instant::now();
    let rows = rows(&state, &runtime);
    let healthy = rows.iter().filter(|r| r.usable()).count();
    let mut list = Vec::with_capacity(rows.len());
    for row in &rows {
        let (pc, h, shown) = (&row.provider.config, &row.health, row.shown);
        list.push(json!({
            "name": pc.name,
            "type": pc.kind.as_str(),
            "base_url": mask_url_credentials(&pc.base_url),
            "enabled": pc.enabled,
            "disabled_reason": pc.disabled_reason,
            "state": shown,
            "healthy": row.usable(),
            "credentials": credentials(&pc.auth),
            "proxy": pc.proxy.as_ref().map(|u| mask_url_credentials(u.expose())),
            "consecutive_failures": h.consecutive_faults,
            "cooldown_remaining_seconds": secs(h.cooldown_remaining),
            "last_error": h.last_error.as_ref().map(|(e, _)| e),
            "last_error_time": h.last_error.as_ref().map(|(_, t)| rfc3339(*t)),
            "requests": h.requests,
            "successes": h.successes,
            "failures": h.failures,
            "avg_ttfb_ms": h.ttfb_ewma_ms.map(|v| (v * 10.0).round() / 10.0),
            "state_changed_by": h.changed_by,
            "keys": keys(&state, pc, now),
        }));
    }
    let mut routes = serde_json::Map::new();
    for r in &runtime.config.routes {
        let entries: Vec<Value> = r
            .entries
            .iter()
            .map(|e| {
                json!({
                    "provider": e.provider,
                    "model": match &e.model { ModelMapping::Passthrough => "passthrough", ModelMapping::Name(n) => n.as_str() },
                    "priority": e.priority,
                    "weight": e.weight,
                    "enabled": e.enabled,
                })
            })
            .collect();
        routes.insert(r.pattern.clone(), Value::Array(entries));
    }
    Json(json!({
        "total_providers": runtime.config.providers.len(),
        "healthy_providers": healthy,
        "selection_strategy": runtime.config.settings.selection_strategy.as_str(),
        "total_model_routes": runtime.config.routes.len(),
        "config_loaded_at": rfc3339(runtime.loaded_at),
        "providers": list,
        "model_routes": routes,
        "deduplication": state.dedup.stats(),
        // Whether the state shown is shared by the cluster (redis, up) or this instance's own.
        "state": state.backend_status(),
    }))
    .into_response()
}

pub async fn reload(
    State(state): State<Arc<AppState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    // `?scope=cluster`: every other instance is asked to reload its own file too.
    let cluster = match (query.get("scope").map(String::as_str), &state.cluster) {
        (Some("cluster"), Some(c)) => match c.publish_reload().await {
            Ok(n) => json!({"requested": true, "other_instances": n}),
            Err(e) => json!({"requested": false, "error": e}),
        },
        (Some("cluster"), None) => {
            json!({"requested": false, "error": "the memory state backend has no cluster"})
        }
        _ => json!(null),
    };
    match crate::reload::reload_and_log(&state, "POST /providers/reload").await {
        Ok(s) => Json(json!({
            "status": "reloaded",
            "providers": s.providers,
            "model_routes": s.routes,
            "added_providers": s.added,
            "removed_providers": s.removed,
            "warnings": s.warnings,
            "cluster": cluster,
        }))
        .into_response(),
        Err(errors) => {
            let body = json!({
                "type": "error",
                "error": {
                    "type": "invalid_request_error",
                    "message": format!("configuration not reloaded, the running one is unchanged:\n{errors}"),
                    "errors": errors.0,
                }
            });
            (StatusCode::BAD_REQUEST, Json(body)).into_response()
        }
    }
}

/// `GET /usage`: usage and cost from the usage file, grouped and bucketed as asked
/// (`from`, `to`, `group_by`, `bucket`), with each named client's limits and their use now.
pub async fn usage(
    State(state): State<Arc<AppState>>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let query =
        match crate::usage::Query::from_params(|k| params.get(k).cloned(), SystemTime::now()) {
            Ok(q) => q,
            Err(e) => return crate::error::ApiError::invalid_request(e).into_response(),
        };
    let Some(store) = state.usage.clone() else {
        return crate::error::ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found_error",
            "usage is not recorded: settings.usage.path is empty",
        )
        .into_response();
    };
    let (answer, scope) = usage_answer(&state, store, &query).await;
    let (rows, totals) = match answer {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            return crate::error::ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                format!("the usage file could not be read: {e}"),
            )
            .into_response();
        }
        Err(_) => {
            return crate::error::ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "api_error",
                "the usage query did not finish",
            )
            .into_response();
        }
    };
    let runtime = state.runtime();
    let now = Instant::now();
    let clients: Vec<Value> = runtime
        .clients
        .iter()
        .map(|c| json!({"name": &*c.name, "limits": limit_uses(&state, c, now)}))
        .collect();
    Json(json!({
        "from": rfc3339(query.from),
        "to": rfc3339(query.to),
        "group_by": query.group_by.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "bucket": query.bucket.map(|b| match b {
            crate::usage::Bucket::Hour => "hour",
            crate::usage::Bucket::Day => "day",
        }),
        // `cluster`: every instance's usage (Redis backend); `instance`: this one's file.
        "scope": scope,
        "rows": rows,
        "totals": totals,
        "clients": clients,
    }))
    .into_response()
}

/// `POST /cache/clear`: empties the response cache.
pub async fn clear_cache(State(state): State<Arc<AppState>>) -> Response {
    let mut removed = state.dedup.clear_cache();
    // With the Redis backend, the cluster's cache too: every instance's next lookup misses.
    let shared = match &state.cluster {
        None => json!(null),
        Some(cluster) => match cluster.clear_cache().await {
            Ok(n) => {
                removed += n;
                json!({"cleared": true, "entries_removed": n})
            }
            Err(e) => json!({"cleared": false, "error": e}),
        },
    };
    Json(json!({"status": "cleared", "entries_removed": removed, "shared": shared})).into_response()
}

/// `GET /dashboard`: one self-contained page (no external scripts or fonts) that polls
/// `/dashboard/data` every two seconds.
pub async fn dashboard() -> Response {
    let mut resp = include_str!("dashboard.html").into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/html; charset=utf-8"),
    );
    resp
}

/// `GET /dashboard/data`: providers, totals and the last minutes of traffic.
pub async fn dashboard_data(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime();
    let rows = rows(&state, &runtime);
    let healthy = rows.iter().filter(|r| r.usable()).count();
    let requests: u64 = rows.iter().map(|r| r.health.requests).sum();
    let mut providers = Vec::with_capacity(rows.len());
    for row in &rows {
        let (pc, h) = (&row.provider.config, &row.health);
        providers.push(json!({
            "name": pc.name,
            "type": pc.kind.as_str(),
            "state": row.shown,
            "cooldown_remaining_seconds": secs(h.cooldown_remaining),
            "requests": h.requests,
            "failures": h.failures,
            "avg_ttfb_ms": h.ttfb_ewma_ms.map(|v| (v * 10.0).round() / 10.0),
            "last_error": h.last_error.as_ref().map(|(e, _)| e),
        }));
    }
    let clients = client_panels(&state, &runtime).await;
    let s = &runtime.config.settings;
    Json(json!({
        "app": {"name": s.app_name, "version": s.app_version, "uptime_seconds": state.started_at.elapsed().as_secs()},
        "clients": clients,
        "totals": {
            "requests": state.recent.total(),
            "attempts": requests,
            "in_flight": state.metrics.in_flight_now(),
            "healthy_providers": healthy,
        },
        "providers": providers,
        "recent": state.recent.snapshot(),
        "deduplication": state.dedup.stats(),
        // Whether the state shown is shared by the cluster (redis, up) or this instance's own.
        "state": state.backend_status(),
    }))
    .into_response()
}

/// Each of a named client's limits and how much of it this instance counts as used now.
fn limit_uses(state: &AppState, client: &crate::clients::Client, now: Instant) -> Vec<Value> {
    state
        .ledger
        .use_of(client, now)
        .into_iter()
        .map(|u| {
            json!({
                "limit": u.limit,
                "window": u.window.map(|w| w.as_str()),
                "used": u.used,
                "max": u.max,
            })
        })
        .collect()
}

/// The usage for `query`: the cluster's with the Redis backend (while it answers), else this
/// instance's file; and which (`cluster` or `instance`).
async fn usage_answer(
    state: &AppState,
    store: Arc<crate::usage::UsageStore>,
    query: &crate::usage::Query,
) -> (
    Result<Result<(Vec<crate::usage::Row>, crate::usage::Totals), String>, tokio::task::JoinError>,
    &'static str,
) {
    if let Some(cluster) = state.cluster.as_ref().filter(|c| c.is_up()) {
        match cluster.usage(query).await {
            Ok(answer) => return (Ok(Ok(answer)), "cluster"),
            Err(e) => {
                tracing::warn!(error = %e, "the cluster's usage could not be read; answering with this instance's")
            }
        }
    }
    let q = query.clone();
    let answer = tokio::task::spawn_blocking(move || {
        store.flush();
        crate::usage::query(store.path(), &q)
    })
    .await;
    (answer, "instance")
}

/// The dashboard's panel per named client: today's requests, tokens and cost (UTC day, from the
/// usage file) and each limit's use now.
async fn client_panels(state: &Arc<AppState>, runtime: &Runtime) -> Vec<Value> {
    if runtime.clients.is_empty() {
        return Vec::new();
    }
    let today: HashMap<String, crate::usage::Totals> = match state.usage.clone() {
        None => HashMap::new(),
        Some(store) => {
            let now = SystemTime::now();
            let day_ms = 86_400_000;
            let midnight = crate::routing::health::unix_ms(now) / day_ms * day_ms;
            let query = crate::usage::Query {
                from: SystemTime::UNIX_EPOCH + Duration::from_millis(midnight),
                to: now + Duration::from_secs(3600),
                group_by: vec![crate::usage::Dimension::Client],
                bucket: None,
            };
            usage_answer(state, store, &query)
                .await
                .0
                .ok()
                .and_then(Result::ok)
                .map(|(rows, _)| {
                    rows.into_iter()
                        .filter_map(|r| {
                            let name = r.group.get("client")?.as_str()?.to_owned();
                            Some((name, r.totals))
                        })
                        .collect()
                })
                .unwrap_or_default()
        }
    };
    let now = Instant::now();
    runtime
        .clients
        .iter()
        .map(|c| {
            let t = today.get(&*c.name).copied().unwrap_or_default();
            json!({
                "name": &*c.name,
                "requests": t.requests,
                "tokens": t.tokens(),
                "cost_usd": (t.cost_usd * 10_000.0).round() / 10_000.0,
                "limits": limit_uses(state, c, now),
            })
        })
        .collect()
}

/// `GET /metrics`: the Prometheus text format.
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime();
    let rows = rows(&state, &runtime);
    let backend_up = state.cluster.as_ref().is_none_or(|c| c.is_up());
    state.metrics.state_backend_up.set(i64::from(backend_up));
    let text = state.metrics.encode(|states| {
        for row in &rows {
            let (name, current) = (&row.provider.config.name, row.shown);
            for s in [
                "healthy",
                "cooling_down",
                "probing",
                "disabled",
                "no_credentials",
            ] {
                let labels = crate::observability::metrics::StateLabels {
                    provider: name.clone(),
                    state: s.into(),
                };
                states.get_or_create(&labels).set(i64::from(s == current));
            }
        }
    });
    let mut resp = text.into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    resp
}

pub async fn health(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime();
    let rows = rows(&state, &runtime);
    let usable = rows.iter().filter(|r| r.usable()).count();
    let enabled = rows.iter().filter(|r| r.provider.config.usable()).count();
    let cooling = enabled - usable;
    let ok = usable > 0;
    let body = json!({
        "status": if ok { "healthy" } else { "unhealthy" },
        "providers": {
            "total": runtime.providers.len(),
            "usable": usable,
            "cooling_down": cooling,
            "disabled": rows.len() - enabled,
        },
        "uptime_seconds": state.started_at.elapsed().as_secs(),
        // Degraded shared state never makes the instance unhealthy: it serves on local state.
        "state": state.backend_status(),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

pub async fn root(State(state): State<Arc<AppState>>) -> Response {
    let runtime = state.runtime();
    let s = &runtime.config.settings;
    Json(json!({"name": s.app_name, "version": s.app_version, "status": "running"})).into_response()
}
