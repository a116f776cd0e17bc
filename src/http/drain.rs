//! The server's way down after SIGTERM, as the handlers see it: while it drains, new requests
//! get 503 with `Retry-After` (the listener stays open, so clients are not refused) and event
//! streams already open follow their job to its end; once the workers are done, those
//! streams send the job's last status and end, and the server closes.

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

use super::{ApiError, AppState};

/// Where the server is on its way down, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Serving,
    /// SIGTERM came: no job is claimed, running ones get the grace period.
    Draining,
    /// Every worker has finished its job or put it back in the queue.
    WorkersStopped,
}

/// Answers 503 `shutting_down` to every request that arrives after serving ended, except
/// `/healthz`, which says so itself in its own shape.
pub async fn refuse_while_draining(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if *state.phase.borrow() != Phase::Serving && request.uri().path() != "/healthz" {
        return ApiError::ShuttingDown.into_response();
    }
    next.run(request).await
}

/// Resolves once the server has reached `phase` (or is gone).
pub async fn reached(mut phases: watch::Receiver<Phase>, phase: Phase) {
    let _ = phases.wait_for(|now| *now >= phase).await;
}
