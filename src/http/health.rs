//! `/healthz` (the database can serve: on SQLite read the file and take the write lock, on
//! PostgreSQL answer a read and take writes) and `/metrics` (Prometheus text, with the jobs
//! counted in the store). `/healthz` stays open when a token is set, for load balancers;
//! `/metrics` too unless `--metrics-token-required`. A worker process with `--metrics-addr`
//! serves the same two routes.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::error::{RETRY_SHUTTING_DOWN, RETRY_UNAVAILABLE};
use super::{ApiError, AppState, ErrorBody, Phase};
use crate::store::Store;
use crate::telemetry::Telemetry;

/// How long the health check waits for the write lock (SQLite) or the read (PostgreSQL): a
/// load balancer polls often and wants its answer fast, and our own writes hold the lock for
/// milliseconds.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Everything the check does (opening the file or connecting, reading, locking) within this,
/// in case the file system or the network hangs.
const DEADLINE: Duration = Duration::from_secs(2);

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`; `unavailable` when the database cannot serve requests; `shutting_down` while
    /// the server drains after SIGTERM.
    #[schema(example = "ok")]
    pub status: String,
    /// The database behind the service: `sqlite` or `postgres`.
    #[schema(example = "sqlite")]
    pub database: String,
    /// Why the status is not `ok`: the database's own words (`database is locked`,
    /// `database disk image is malformed`, `connection refused`) or the shutdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Health {
    fn new(store: &Store, status: &str, reason: Option<String>) -> Health {
        Health {
            status: status.into(),
            database: store.backend().into(),
            reason,
        }
    }
}

/// Readiness: the server is not shutting down, and its database answers: a SQLite file can be
/// read from disk and written (the write lock can be had within a second); a PostgreSQL
/// server answers a read within a second and takes writes. 503 with the reason otherwise.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses(
        (status = 200, body = Health, description = "The database can be read and written"),
        (status = 503, body = Health,
            description = "Shutting down, or the database is locked, damaged, unreadable or unreachable")))]
pub async fn healthz(State(state): State<AppState>) -> HealthResponse {
    if *state.phase.borrow() != Phase::Serving {
        let reason = "the server is shutting down".to_string();
        let health = Health::new(&state.store, "shutting_down", Some(reason));
        return unavailable(health, RETRY_SHUTTING_DOWN);
    }
    check(&state.store).await
}

/// A health answer: its status, `Retry-After` on a 503, and the body.
pub type HealthResponse = (StatusCode, HeaderMap, Json<Health>);

/// 503 with the body and, as every 503 of the API, when to try again.
fn unavailable(health: Health, retry_after: u64) -> HealthResponse {
    let mut headers = HeaderMap::new();
    headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
    (StatusCode::SERVICE_UNAVAILABLE, headers, Json(health))
}

/// The database's part of the check, for the API and for a worker's metrics listener.
pub async fn check(store: &Store) -> HealthResponse {
    let reason = match tokio::time::timeout(DEADLINE, store.check_health(LOCK_WAIT)).await {
        Ok(Ok(())) => {
            let health = Health::new(store, "ok", None);
            return (StatusCode::OK, HeaderMap::new(), Json(health));
        }
        Ok(Err(error)) => {
            tracing::warn!(%error, "health check: the database cannot serve");
            error.reason()
        }
        Err(_) => {
            tracing::warn!("health check: the database did not answer in time");
            format!(
                "the database did not answer within {} s",
                DEADLINE.as_secs()
            )
        }
    };
    unavailable(
        Health::new(store, "unavailable", Some(reason)),
        RETRY_UNAVAILABLE,
    )
}

/// Prometheus metrics in the text exposition format. With `--metrics-token-required`, only
/// for a request with the API token.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain"),
        (status = 401, body = ErrorBody,
            description = "The server requires the token for /metrics and the request lacks it")))]
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<impl IntoResponse, ApiError> {
    if state.settings.metrics_token_required && !super::auth::authorized(&state, &headers) {
        return Err(ApiError::Unauthorized);
    }
    render_metrics(&state.store, &state.telemetry).await
}

/// The process's metrics with the store's job counts, for the API and for a worker's metrics
/// listener.
pub async fn render_metrics(
    store: &Store,
    telemetry: &Telemetry,
) -> Result<impl IntoResponse, ApiError> {
    let jobs = store.count_jobs_by_status().await?;
    let trials = store.count_trials_by_status().await?;
    let text = telemetry.render(&jobs, &trials);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}
