//! The HTTP API: shared state, one router per module merged here, auth,
//! request ids, tracing, metrics, the drain on shutdown, the OpenAPI document and Swagger UI,
//! and the static files.

mod auth;
pub mod connections;
mod datasets;
mod drain;
mod error;
mod events;
mod health;
mod jobs;
mod metrics;
mod openapi;
mod paging;
pub mod startup;
mod static_files;
mod tools;
mod uploads;
mod weights;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::http::{HeaderName, Request};
use axum::Router;
use tokio::sync::{watch, Semaphore};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

pub use drain::Phase;
pub use error::{ApiError, ErrorBody};
pub use openapi::ApiDoc;

use crate::config::ApiConfig;
use crate::engine::Limits;
use crate::store::Store;
use crate::telemetry::Telemetry;

#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub settings: Arc<ApiConfig>,
    pub limits: Arc<Limits>,
    pub telemetry: Arc<Telemetry>,
    /// One permit per upload body being read and held (`--max-concurrent-uploads`).
    pub uploads: Arc<Semaphore>,
    /// Serving, draining after SIGTERM, or drained: new requests are refused while draining,
    /// open event streams end once the workers have stopped.
    pub phase: watch::Receiver<Phase>,
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn router(state: AppState) -> Router {
    let v1 = Router::new()
        .merge(jobs::router())
        .merge(events::router())
        .merge(datasets::router(state.settings.max_upload_bytes))
        .merge(weights::router(state.settings.max_upload_bytes))
        .merge(tools::router())
        .fallback(|| async { ApiError::NotFound("route".to_string()) })
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    Router::new()
        .nest("/v1", v1)
        .merge(health::router())
        .merge(openapi::router())
        .merge(static_files::router())
        .route_layer(axum::middleware::from_fn(metrics::note_route))
        .layer(DefaultBodyLimit::max(state.settings.max_json_bytes))
        .layer(RequestBodyTimeoutLayer::new(
            state.settings.connections.body_read_timeout,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            drain::refuse_while_draining,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            metrics::track,
        ))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let request_id = request
                    .headers()
                    .get(REQUEST_ID)
                    .and_then(|value| value.to_str().ok())
                    .unwrap_or("-");
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    uri = %request.uri().path(),
                    request_id = %request_id,
                )
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}
