//! Prometheus metrics of one process, on the `metrics` crate's counters, gauges and
//! histograms: HTTP requests by route and status (API), jobs finished, their durations and
//! steps trained (workers), and the jobs in the store by status (set from the database at
//! each scrape, so that every replica tells the same truth). Each process (each test app)
//! has a recorder of its own, not the global one, so that apps in one test binary do not
//! count each other's requests.

use std::sync::{Arc, Weak};
use std::time::Duration;

use metrics::{counter, gauge, histogram, with_local_recorder};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};

use crate::store::{JobStatus, TrialStatus};

/// Upper bounds of the job duration buckets, in seconds: from a tiny job to a long sweep.
const JOB_SECONDS: [f64; 10] = [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0];

/// Upper bounds of the request duration buckets, in seconds.
const REQUEST_SECONDS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0];

pub struct Telemetry {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
}

impl Telemetry {
    /// A recorder of its own, kept up by a task on the current tokio runtime.
    pub fn new() -> Arc<Telemetry> {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                Matcher::Full("lrtune_job_duration_seconds".into()),
                &JOB_SECONDS,
            )
            .and_then(|builder| {
                builder.set_buckets_for_metric(
                    Matcher::Full("lrtune_http_request_duration_seconds".into()),
                    &REQUEST_SECONDS,
                )
            })
            .expect("the bucket bounds are not empty")
            .build_recorder();
        let handle = recorder.handle();
        let telemetry = Telemetry { recorder, handle };
        telemetry.describe();
        let telemetry = Arc::new(telemetry);
        tokio::spawn(upkeep(Arc::downgrade(&telemetry)));
        telemetry
    }

    fn describe(&self) {
        with_local_recorder(&self.recorder, || {
            metrics::describe_gauge!("lrtune_jobs", "Jobs in the database by status.");
            metrics::describe_gauge!(
                "lrtune_trials",
                "Trials (training runs of jobs) in the database by status."
            );
            metrics::describe_histogram!(
                "lrtune_job_duration_seconds",
                metrics::Unit::Seconds,
                "Wall time of jobs finished by this process's workers."
            );
            metrics::describe_counter!(
                "lrtune_steps_total",
                "Optimizer steps trained by this process's workers."
            );
            metrics::describe_gauge!(
                "lrtune_steps_per_second",
                "Training speed of the last job this process finished."
            );
            metrics::describe_counter!(
                "lrtune_http_requests_total",
                "HTTP requests by method, route and status."
            );
            metrics::describe_histogram!(
                "lrtune_http_request_duration_seconds",
                metrics::Unit::Seconds,
                "Time spent answering, by method, route and status."
            );
        });
    }

    /// One request. Each label must come from a closed set (see `http::metrics`): every
    /// distinct value is a series kept for the life of the process.
    pub fn record_request(&self, method: &'static str, route: &str, status: u16, seconds: f64) {
        let labels = [
            ("method", method.to_string()),
            ("route", route.to_string()),
            ("status", status.to_string()),
        ];
        with_local_recorder(&self.recorder, || {
            counter!("lrtune_http_requests_total", &labels).increment(1);
            histogram!("lrtune_http_request_duration_seconds", &labels).record(seconds);
        });
    }

    pub fn record_job(&self, status: JobStatus, seconds: f64, steps: u64) {
        with_local_recorder(&self.recorder, || {
            histogram!("lrtune_job_duration_seconds", "status" => status.as_str()).record(seconds);
            counter!("lrtune_steps_total").increment(steps);
            if seconds > 0.0 && steps > 0 {
                gauge!("lrtune_steps_per_second").set(steps as f64 / seconds);
            }
        });
    }

    /// The Prometheus text, with the store's job and trial counts.
    pub fn render(&self, jobs: &[(JobStatus, i64)], trials: &[(TrialStatus, i64)]) -> String {
        with_local_recorder(&self.recorder, || {
            // Registered before the first job finishes, so that a scrape always has them.
            counter!("lrtune_steps_total").increment(0);
            for (status, count) in jobs {
                gauge!("lrtune_jobs", "status" => status.as_str()).set(*count as f64);
            }
            for (status, count) in trials {
                gauge!("lrtune_trials", "status" => status.as_str()).set(*count as f64);
            }
        });
        self.handle.render()
    }
}

/// Folds recorded histogram samples into their buckets now and then, so that memory stays
/// bounded between scrapes (a scrape does it too); ends with the telemetry.
async fn upkeep(telemetry: Weak<Telemetry>) {
    loop {
        tokio::time::sleep(Duration::from_secs(10)).await;
        match telemetry.upgrade() {
            Some(telemetry) => telemetry.handle.run_upkeep(),
            None => return,
        }
    }
}
