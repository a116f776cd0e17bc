//! What the workers share with the HTTP side in one process: a broadcast channel per job for
//! server-sent events, the cancel flag of each running job, a wake-up for idle workers, and
//! the job counters `/metrics` reports.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use tokio::sync::{broadcast, Notify};

use crate::store::{JobError, JobStatus, PointRow, SweepRunRow};

/// Events a job's subscribers receive; the SSE event name is the variant's name.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEvent {
    Progress {
        stage: Option<String>,
        done: usize,
        total: usize,
    },
    Point(PointRow),
    SweepRun(SweepRunRow),
    Status {
        status: JobStatus,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<JobError>,
    },
}

impl JobEvent {
    pub fn name(&self) -> &'static str {
        match self {
            JobEvent::Progress { .. } => "progress",
            JobEvent::Point(_) => "point",
            JobEvent::SweepRun(_) => "sweep_run",
            JobEvent::Status { .. } => "status",
        }
    }

    /// The event's data without its name.
    pub fn data(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(object) = value.as_object_mut() {
            object.remove("event");
        }
        value
    }
}

/// Durations of finished jobs and steps trained, for Prometheus.
#[derive(Debug, Default, Clone)]
pub struct JobStats {
    /// Per final status: count, sum of seconds, and cumulative bucket counts.
    pub durations: HashMap<JobStatus, DurationHistogram>,
    pub steps_total: u64,
    pub last_steps_per_second: f64,
}

pub const DURATION_BUCKETS: [f64; 10] =
    [0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 7200.0];

#[derive(Debug, Default, Clone)]
pub struct DurationHistogram {
    pub count: u64,
    pub sum: f64,
    pub buckets: [u64; DURATION_BUCKETS.len()],
}

impl DurationHistogram {
    fn observe(&mut self, seconds: f64) {
        self.count += 1;
        self.sum += seconds;
        for (bucket, bound) in self.buckets.iter_mut().zip(DURATION_BUCKETS) {
            if seconds <= bound {
                *bucket += 1;
            }
        }
    }
}

#[derive(Default)]
pub struct Hub {
    channels: Mutex<HashMap<String, broadcast::Sender<JobEvent>>>,
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    stats: Mutex<JobStats>,
    /// Set when the server stops waiting for running jobs: canceled jobs go back to the queue.
    stopping: AtomicBool,
    /// Wakes idle workers when a job is queued.
    pub wake: Notify,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these short locks leaves consistent data: keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Hub {
    pub fn new() -> Arc<Hub> {
        Arc::new(Hub::default())
    }

    /// A receiver for the job's events (the channel is made on first use).
    pub fn subscribe(&self, job_id: &str) -> broadcast::Receiver<JobEvent> {
        self.sender(job_id).subscribe()
    }

    fn sender(&self, job_id: &str) -> broadcast::Sender<JobEvent> {
        lock(&self.channels)
            .entry(job_id.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .clone()
    }

    /// Drops a channel nobody listens to (a subscription to a job that does not exist).
    pub fn drop_if_idle(&self, job_id: &str) {
        let mut channels = lock(&self.channels);
        if channels
            .get(job_id)
            .is_some_and(|sender| sender.receiver_count() == 0)
        {
            channels.remove(job_id);
        }
    }

    pub fn publish(&self, job_id: &str, event: JobEvent) {
        let sender = lock(&self.channels).get(job_id).cloned();
        if let Some(sender) = sender {
            // No subscriber is fine.
            let _ = sender.send(event);
        }
    }

    /// Sends the final status and drops the channel, which ends every subscriber's stream.
    pub fn finish(&self, job_id: &str, event: JobEvent) {
        let sender = lock(&self.channels).remove(job_id);
        if let Some(sender) = sender {
            let _ = sender.send(event);
        }
    }

    pub fn register_cancel(&self, job_id: &str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(self.stopping.load(Ordering::SeqCst)));
        lock(&self.cancels).insert(job_id.to_string(), flag.clone());
        flag
    }

    pub fn unregister_cancel(&self, job_id: &str) {
        lock(&self.cancels).remove(job_id);
    }

    /// Raises the cancel flag of a job running in this process; true when there was one.
    pub fn cancel(&self, job_id: &str) -> bool {
        match lock(&self.cancels).get(job_id) {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Stops every running job so that it goes back to the queue (shutdown past the grace).
    pub fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for flag in lock(&self.cancels).values() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    pub fn record_finished(&self, status: JobStatus, seconds: f64, steps: u64) {
        let mut stats = lock(&self.stats);
        stats.durations.entry(status).or_default().observe(seconds);
        stats.steps_total += steps;
        if seconds > 0.0 && steps > 0 {
            stats.last_steps_per_second = steps as f64 / seconds;
        }
    }

    pub fn stats(&self) -> JobStats {
        lock(&self.stats).clone()
    }
}
