//! Prometheus text for `/metrics`: HTTP requests by route and status, jobs by status (from the
//! database, so it counts every process's jobs), job durations and steps trained (this
//! process's workers).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;

use super::AppState;
use crate::store::JobStatus;
use crate::worker::{JobStats, DURATION_BUCKETS};

/// (method, route, status)
type RequestKey = (String, String, u16);

#[derive(Default)]
pub struct HttpMetrics {
    /// Requests and seconds spent, by method, route and status.
    requests: Mutex<BTreeMap<RequestKey, (u64, f64)>>,
}

pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |path| path.as_str().to_string());
    let method = request.method().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let seconds = started.elapsed().as_secs_f64();
    let mut requests = state
        .metrics
        .requests
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let entry = requests
        .entry((method, route, response.status().as_u16()))
        .or_default();
    entry.0 += 1;
    entry.1 += seconds;
    response
}

impl HttpMetrics {
    pub fn render(&self, jobs: &[(JobStatus, i64)], stats: &JobStats) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP lrtune_jobs Jobs in the database by status.");
        let _ = writeln!(out, "# TYPE lrtune_jobs gauge");
        for (status, count) in jobs {
            let _ = writeln!(out, "lrtune_jobs{{status=\"{}\"}} {count}", status.as_str());
        }
        let _ = writeln!(
            out,
            "# HELP lrtune_job_duration_seconds Wall time of jobs finished by this process."
        );
        let _ = writeln!(out, "# TYPE lrtune_job_duration_seconds histogram");
        for status in JobStatus::ALL.into_iter().filter(|s| s.is_finished()) {
            let histogram = stats.durations.get(&status).cloned().unwrap_or_default();
            let label = status.as_str();
            for (bound, count) in DURATION_BUCKETS.iter().zip(histogram.buckets) {
                let _ = writeln!(
                    out,
                    "lrtune_job_duration_seconds_bucket{{status=\"{label}\",le=\"{bound}\"}} {count}"
                );
            }
            let _ = writeln!(
                out,
                "lrtune_job_duration_seconds_bucket{{status=\"{label}\",le=\"+Inf\"}} {}",
                histogram.count
            );
            let _ = writeln!(
                out,
                "lrtune_job_duration_seconds_sum{{status=\"{label}\"}} {}",
                histogram.sum
            );
            let _ = writeln!(
                out,
                "lrtune_job_duration_seconds_count{{status=\"{label}\"}} {}",
                histogram.count
            );
        }
        let _ = writeln!(
            out,
            "# HELP lrtune_steps_total Optimizer steps trained by this process."
        );
        let _ = writeln!(out, "# TYPE lrtune_steps_total counter");
        let _ = writeln!(out, "lrtune_steps_total {}", stats.steps_total);
        let _ = writeln!(
            out,
            "# HELP lrtune_steps_per_second Training speed of the last finished job."
        );
        let _ = writeln!(out, "# TYPE lrtune_steps_per_second gauge");
        let _ = writeln!(
            out,
            "lrtune_steps_per_second {}",
            stats.last_steps_per_second
        );
        let _ = writeln!(
            out,
            "# HELP lrtune_http_requests_total HTTP requests by route and status."
        );
        let _ = writeln!(out, "# TYPE lrtune_http_requests_total counter");
        let requests = self
            .requests
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        for ((method, route, status), (count, _)) in &requests {
            let _ = writeln!(
                out,
                "lrtune_http_requests_total{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {count}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP lrtune_http_request_duration_seconds_sum Time spent answering, by route and status."
        );
        let _ = writeln!(
            out,
            "# TYPE lrtune_http_request_duration_seconds_sum counter"
        );
        for ((method, route, status), (_, seconds)) in &requests {
            let _ = writeln!(
                out,
                "lrtune_http_request_duration_seconds_sum{{method=\"{method}\",route=\"{route}\",status=\"{status}\"}} {seconds}"
            );
        }
        out
    }
}
