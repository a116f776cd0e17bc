//! `/healthz` (the database can serve: read, and take the write lock) and `/metrics`
//! (Prometheus text); both stay open when a token is set.

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;

use super::{ApiError, AppState, Phase};

/// How long the health check waits for the write lock: a load balancer polls often and wants
/// its answer fast, and our own writes hold the lock for milliseconds.
const LOCK_WAIT: Duration = Duration::from_secs(1);

/// Everything the check does (opening the file, reading, locking) within this, in case the
/// file system itself hangs.
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
    /// The database behind the service: `sqlite`.
    #[schema(example = "sqlite")]
    pub database: String,
    /// Why the status is not `ok`: SQLite's own words (`database is locked`,
    /// `database disk image is malformed`) or the shutdown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Health {
    fn new(status: &str, reason: Option<String>) -> Health {
        Health {
            status: status.into(),
            database: "sqlite".into(),
            reason,
        }
    }
}

/// Readiness: the server is not shutting down, and its database file can be read from disk
/// and written (the write lock can be had within a second). 503 with the reason otherwise.
#[utoipa::path(get, path = "/healthz", tag = "service",
    responses(
        (status = 200, body = Health, description = "The database can be read and written"),
        (status = 503, body = Health,
            description = "Shutting down, or the database is locked, damaged or unreadable")))]
pub async fn healthz(State(state): State<AppState>) -> (StatusCode, Json<Health>) {
    if *state.phase.borrow() != Phase::Serving {
        let reason = "the server is shutting down".to_string();
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health::new("shutting_down", Some(reason))),
        );
    }
    let reason = match tokio::time::timeout(DEADLINE, state.store.check_health(LOCK_WAIT)).await {
        Ok(Ok(())) => return (StatusCode::OK, Json(Health::new("ok", None))),
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
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(Health::new("unavailable", Some(reason))),
    )
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let jobs = state.store.count_jobs_by_status().await?;
    let text = state.metrics.render(&jobs, &state.hub.stats());
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    ))
}
