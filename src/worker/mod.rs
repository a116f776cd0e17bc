//! The queue loop: N tokio workers claim queued jobs, run the engine on a blocking thread,
//! stream its events to subscribers, write progress and a heartbeat a few times a second,
//! and commit the outcome in one transaction. A reaper puts back jobs whose worker died.

mod data;
mod hub;
pub mod priority;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

pub use data::{parse_task, planned_shape, JobDatasets};
pub use hub::{DurationHistogram, Hub, JobEvent, JobStats, DURATION_BUCKETS};

use crate::engine::admission::admit;
use crate::engine::{self, EngineError, Event, JobOutput, JobSpec, Limits, LoadedData};
use crate::store::{
    Attempt, FinalState, JobError, JobRow, JobStatus, PointRow, ProgressUpdate, Store, StoreError,
    SweepRunRow,
};

/// Runs one job's compute. The engine in production; tests swap in runners that panic or
/// block to prove the worker survives them.
pub trait JobRunner: Send + Sync + 'static {
    fn run(
        &self,
        spec: &JobSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<JobOutput, EngineError>;
}

pub struct EngineRunner;

impl JobRunner for EngineRunner {
    fn run(
        &self,
        spec: &JobSpec,
        loaded: LoadedData,
        limits: &Limits,
        cancel: &AtomicBool,
        observer: &mut dyn FnMut(Event),
    ) -> Result<JobOutput, EngineError> {
        engine::run_job(spec, loaded, limits, cancel, observer)
    }
}

#[derive(Clone)]
pub struct WorkerSettings {
    pub workers: usize,
    pub limits: Limits,
    /// A running job without a heartbeat for this long is taken to be orphaned.
    pub stale_after: Duration,
    /// Claims after which an orphaned job is failed instead of queued again.
    pub max_attempts: i64,
    /// How often progress, new points and the heartbeat are written.
    pub flush_every: Duration,
    /// How often an idle worker looks for work without being woken.
    pub poll_every: Duration,
}

impl WorkerSettings {
    fn heartbeat_every(&self) -> Duration {
        (self.stale_after / 4).clamp(Duration::from_millis(100), Duration::from_secs(5))
    }
}

/// The running workers and reaper of one process.
pub struct WorkerPool {
    handles: Vec<JoinHandle<()>>,
    reaper: JoinHandle<()>,
    stop_claiming: watch::Sender<bool>,
    hub: Arc<Hub>,
}

impl WorkerPool {
    pub fn start(
        store: Store,
        hub: Arc<Hub>,
        settings: WorkerSettings,
        runner: Arc<dyn JobRunner>,
    ) -> WorkerPool {
        priority::lower_compute_pool();
        let (stop_claiming, stop) = watch::channel(false);
        let handles = (0..settings.workers)
            .map(|index| {
                let worker = Worker {
                    name: format!("{}-{index}", process_name()),
                    store: store.clone(),
                    hub: hub.clone(),
                    settings: settings.clone(),
                    runner: runner.clone(),
                    stop: stop.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        let reaper = tokio::spawn(reap_forever(store, hub.clone(), settings, stop));
        WorkerPool {
            handles,
            reaper,
            stop_claiming,
            hub,
        }
    }

    /// Stops claiming, waits up to `grace` for running jobs, then stops them and puts them
    /// back to the queue.
    pub async fn shutdown(self, grace: Duration) {
        let _ = self.stop_claiming.send(true);
        self.reaper.abort();
        let mut handles = self.handles;
        let waited = tokio::time::timeout(grace, async {
            for handle in handles.iter_mut() {
                let _ = handle.await;
            }
        })
        .await;
        if waited.is_err() {
            warn!("grace period over: stopping running jobs and queueing them again");
            self.hub.stop_all();
            for handle in handles {
                let _ = handle.await;
            }
        }
    }
}

fn process_name() -> String {
    format!("pid{}", std::process::id())
}

async fn reap_forever(
    store: Store,
    hub: Arc<Hub>,
    settings: WorkerSettings,
    mut stop: watch::Receiver<bool>,
) {
    let every =
        (settings.stale_after / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        match store
            .reap_stale(settings.stale_after, settings.max_attempts)
            .await
        {
            Ok(outcome) => {
                for id in &outcome.requeued {
                    warn!(job = %id, "job had no heartbeat: queued again");
                }
                for id in &outcome.failed {
                    warn!(job = %id, "job had no heartbeat too many times: failed");
                    hub.finish(
                        id,
                        JobEvent::Status {
                            status: JobStatus::Failed,
                            error: None,
                        },
                    );
                }
                if !outcome.requeued.is_empty() {
                    hub.wake.notify_waiters();
                }
            }
            Err(error) => error!(%error, "reaping stale jobs"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = stop.changed() => return,
        }
    }
}

struct Worker {
    name: String,
    store: Store,
    hub: Arc<Hub>,
    settings: WorkerSettings,
    runner: Arc<dyn JobRunner>,
    stop: watch::Receiver<bool>,
}

/// Why the engine's cancel flag went up.
#[derive(Default)]
struct CancelReason {
    lost: AtomicBool,
}

impl Worker {
    async fn run(mut self) {
        loop {
            if *self.stop.borrow() {
                return;
            }
            match self.store.claim_job(&self.name).await {
                Ok(Some(job)) => {
                    let span = tracing::info_span!("job", id = %job.id, attempt = job.attempts, worker = %self.name);
                    self.run_job(job).instrument(span).await;
                }
                Ok(None) => {
                    let wake = self.hub.wake.notified();
                    tokio::select! {
                        _ = wake => {}
                        _ = tokio::time::sleep(self.settings.poll_every) => {}
                        _ = self.stop.changed() => {}
                    }
                }
                Err(error) => {
                    error!(%error, "claiming a job");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run_job(&self, job: JobRow) {
        let attempt = job.attempt();
        info!("job started");
        self.hub.publish(
            &job.id,
            JobEvent::Status {
                status: JobStatus::Running,
                error: None,
            },
        );
        let started = Instant::now();
        let (state, steps) = match self.execute(&job, &attempt).await {
            Ok(state) => state,
            Err(error) => (FinalState::Failed(error), 0),
        };
        let status = match &state {
            FinalState::Succeeded { .. } => JobStatus::Succeeded,
            FinalState::Failed(_) => JobStatus::Failed,
            FinalState::Canceled => JobStatus::Canceled,
            FinalState::Requeue => JobStatus::Queued,
        };
        let error = match &state {
            FinalState::Failed(error) => Some(error.clone()),
            _ => None,
        };
        match self.finish(&attempt, state).await {
            Ok(true) => {
                info!(status = status.as_str(), "job finished");
                if status.is_finished() {
                    self.hub
                        .record_finished(status, started.elapsed().as_secs_f64(), steps);
                    self.hub.finish(&job.id, JobEvent::Status { status, error });
                } else {
                    self.hub
                        .publish(&job.id, JobEvent::Status { status, error });
                }
            }
            Ok(false) => warn!("job was taken over by another attempt: outcome dropped"),
            Err(error) => error!(%error, "writing the job's outcome"),
        }
        self.hub.unregister_cancel(&job.id);
    }

    /// Writes the attempt's outcome, trying again while the database is unavailable (locked
    /// by another process, say): a finished job's result is worth waiting for. Not past
    /// `stale_after`, though: no heartbeat is written meanwhile, so by then the reaper may
    /// have queued the job again and the guarded write would find it gone.
    async fn finish(&self, attempt: &Attempt, state: FinalState) -> Result<bool, StoreError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.store.finish_attempt(attempt, state.clone()).await {
                Err(error)
                    if error.is_unavailable()
                        && started.elapsed() + pause < self.settings.stale_after =>
                {
                    warn!(%error, retry_in = ?pause, "writing the job's outcome: trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                outcome => return outcome,
            }
        }
    }

    /// Runs the attempt to its end state; an `Err` is a failure to report on the job.
    async fn execute(
        &self,
        job: &JobRow,
        attempt: &Attempt,
    ) -> Result<(FinalState, u64), JobError> {
        let spec = JobSpec::from_json(&job.spec).map_err(spec_error)?;
        let datasets = self.fetch_datasets(&spec).await?;
        // Admission again (limits may have changed since the submit, or the job was written
        // by another process): a job that does not fit fails here, before anything is loaded
        // or built, and is not retried.
        let planned = data::planned_shape(
            &spec,
            datasets.as_ref().map(|d| &d.train.row),
            datasets
                .as_ref()
                .and_then(|d| d.validation.as_ref())
                .map(|stored| &stored.row),
        )
        .map_err(spec_error)?;
        if let Some(shape) = planned {
            admit(&spec, &shape, &self.settings.limits).map_err(spec_error)?;
        }
        let cancel = self.hub.register_cancel(&job.id);
        if job.cancel_requested {
            cancel.store(true, Ordering::SeqCst);
        }
        let reason = Arc::new(CancelReason::default());
        let (events, mut received) = mpsc::unbounded_channel::<Event>();
        let runner = self.runner.clone();
        let limits = self.settings.limits.clone();
        let engine_cancel = cancel.clone();
        let span = tracing::Span::current();
        let compute = spawn_compute(move || {
            let _entered = span.enter();
            let mut observer = |event: Event| {
                let _ = events.send(event);
            };
            let loaded = data::load(&spec, datasets)?;
            runner.run(&spec, loaded, &limits, &engine_cancel, &mut observer)
        })
        .map_err(|error| JobError {
            code: "internal".into(),
            message: format!("the job's thread could not start: {error}"),
            field: None,
        })?;

        let mut flusher = Flusher::new(attempt.clone());
        let mut tick = tokio::time::interval(self.settings.flush_every);
        let mut last_write = Instant::now();
        let heartbeat_every = self.settings.heartbeat_every();
        loop {
            tokio::select! {
                event = received.recv() => match event {
                    Some(event) => flusher.observe(event, &self.hub),
                    None => break,
                },
                _ = tick.tick() => {
                    if flusher.dirty || last_write.elapsed() >= heartbeat_every {
                        last_write = Instant::now();
                        self.flush(&mut flusher, &cancel, &reason).await;
                    }
                }
            }
        }
        flusher.publish_progress(&self.hub);
        let outcome = compute.await;
        let steps = flusher.done as u64;
        let state = match outcome {
            Ok(Ok(output)) => {
                let result = serde_json::to_string(&output.result).map_err(|e| JobError {
                    code: "internal".into(),
                    message: format!("the result could not be encoded: {e}"),
                    field: None,
                })?;
                FinalState::Succeeded {
                    result,
                    steps: output.result.timing.total_steps as i64,
                    curve: output
                        .curve
                        .iter()
                        .map(|p| PointRow::new(p.step, p.lr, p.loss, p.smoothed))
                        .collect(),
                    sweep: Vec::new(),
                }
                .with_sweep(flusher.sweep_runs)
            }
            Ok(Err(EngineError::Canceled)) => {
                if self.hub.is_stopping() || reason.lost.load(Ordering::SeqCst) {
                    FinalState::Requeue
                } else {
                    // Keep the points measured before the cancel.
                    self.flush(&mut flusher, &cancel, &reason).await;
                    FinalState::Canceled
                }
            }
            Ok(Err(error)) => {
                self.flush(&mut flusher, &cancel, &reason).await;
                FinalState::Failed(engine_error(error))
            }
            Err(panic) => {
                let message = match panic {
                    Some(payload) => panic_message(payload),
                    None => "the job's thread was stopped".to_string(),
                };
                error!(%message, "job panicked");
                FinalState::Failed(JobError {
                    code: "panic".into(),
                    message: format!("the job panicked: {message}"),
                    field: None,
                })
            }
        };
        Ok((state, steps))
    }

    async fn flush(&self, flusher: &mut Flusher, cancel: &AtomicBool, reason: &CancelReason) {
        let update = flusher.take_update();
        match self.store.record_progress(&flusher.attempt, &update).await {
            Ok(Some(cancel_requested)) => {
                if cancel_requested {
                    cancel.store(true, Ordering::SeqCst);
                }
            }
            Ok(None) => {
                warn!("job no longer belongs to this attempt: stopping it");
                reason.lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
            }
            Err(error) => {
                // Keep the points for the next try; the heartbeat is retried on the next tick.
                error!(%error, "writing progress");
                flusher.pending.splice(0..0, update.points);
                flusher.dirty = true;
            }
        }
    }

    async fn fetch_datasets(&self, spec: &JobSpec) -> Result<Option<JobDatasets>, JobError> {
        let Some(id) = &spec.data.dataset_id else {
            return Ok(None);
        };
        let train = self.fetch_dataset(id, "data.dataset_id").await?;
        let validation = match &spec.data.validation_dataset_id {
            Some(id) => Some(self.fetch_dataset(id, "data.validation_dataset_id").await?),
            None => None,
        };
        Ok(Some(JobDatasets { train, validation }))
    }

    async fn fetch_dataset(
        &self,
        id: &str,
        field: &str,
    ) -> Result<crate::store::StoredDataset, JobError> {
        match self.store.load_dataset(id).await {
            Ok(Some(dataset)) => Ok(dataset),
            Ok(None) => Err(JobError {
                code: "invalid_spec".into(),
                message: format!("no dataset {id}"),
                field: Some(field.to_string()),
            }),
            Err(error) => {
                error!(%error, "loading a dataset");
                Err(JobError {
                    code: "internal".into(),
                    message: "the dataset could not be read".into(),
                    field: Some(field.to_string()),
                })
            }
        }
    }
}

impl FinalState {
    fn with_sweep(self, runs: Vec<SweepRunRow>) -> FinalState {
        match self {
            FinalState::Succeeded {
                result,
                steps,
                curve,
                ..
            } => FinalState::Succeeded {
                result,
                steps,
                curve,
                sweep: runs,
            },
            other => other,
        }
    }
}

/// Collects a running job's events between database writes, and forwards them to
/// subscribers (progress at most ten times a second).
struct Flusher {
    attempt: Attempt,
    stage: Option<String>,
    done: usize,
    total: usize,
    pending: Vec<PointRow>,
    sweep_runs: Vec<SweepRunRow>,
    dirty: bool,
    last_progress_sent: Option<Instant>,
}

impl Flusher {
    fn new(attempt: Attempt) -> Flusher {
        Flusher {
            attempt,
            stage: None,
            done: 0,
            total: 0,
            pending: Vec::new(),
            sweep_runs: Vec::new(),
            dirty: false,
            last_progress_sent: None,
        }
    }

    fn observe(&mut self, event: Event, hub: &Hub) {
        let job_id = &self.attempt.job_id;
        match event {
            Event::Stage(stage) => {
                self.stage = Some(stage.to_string());
                self.dirty = true;
                self.publish_progress(hub);
            }
            Event::Point(point) => {
                let row = PointRow::new(point.step, point.lr, point.loss, point.smoothed);
                hub.publish(job_id, JobEvent::Point(row.clone()));
                self.pending.push(row);
                self.dirty = true;
            }
            Event::SweepRun(run) => {
                let row = SweepRunRow::new(&run);
                hub.publish(job_id, JobEvent::SweepRun(row.clone()));
                self.sweep_runs.push(row);
                self.dirty = true;
            }
            Event::Progress { done, total } => {
                self.done = done;
                self.total = total;
                self.dirty = true;
                let due = self
                    .last_progress_sent
                    .is_none_or(|sent| sent.elapsed() >= Duration::from_millis(100));
                if due {
                    self.publish_progress(hub);
                }
            }
        }
    }

    fn publish_progress(&mut self, hub: &Hub) {
        self.last_progress_sent = Some(Instant::now());
        hub.publish(
            &self.attempt.job_id,
            JobEvent::Progress {
                stage: self.stage.clone(),
                done: self.done,
                total: self.total,
            },
        );
    }

    fn take_update(&mut self) -> ProgressUpdate {
        self.dirty = false;
        ProgressUpdate {
            stage: self.stage.clone(),
            done: self.done as i64,
            total: self.total as i64,
            points: std::mem::take(&mut self.pending),
        }
    }
}

fn spec_error(error: engine::SpecError) -> JobError {
    JobError {
        code: "invalid_spec".into(),
        message: error.message,
        field: Some(error.field),
    }
}

fn engine_error(error: EngineError) -> JobError {
    match error {
        EngineError::Spec(spec) => spec_error(spec),
        EngineError::Data(data) => JobError {
            code: "invalid_data".into(),
            message: data.to_string(),
            field: Some("data".into()),
        },
        EngineError::Canceled => JobError {
            code: "canceled".into(),
            message: "canceled".into(),
            field: None,
        },
        EngineError::Candle(candle) => JobError {
            code: "compute_error".into(),
            message: candle.to_string(),
            field: None,
        },
    }
}

type Panic = Box<dyn std::any::Any + Send>;

/// Runs a job's compute on a thread of its own at the training priority (see `priority`),
/// ended with the job, so that no thread of the runtime's blocking pool is left at a lower
/// priority. Resolves to the result, or `Err(Some(payload))` when it panicked (`None`: the
/// thread went away without answering).
fn spawn_compute<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<impl std::future::Future<Output = Result<T, Option<Panic>>>> {
    let (done, outcome) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("lrtune-job".to_string())
        .spawn(move || {
            priority::lower_this_thread();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(work));
            let _ = done.send(result);
        })?;
    Ok(async move {
        match outcome.await {
            Ok(result) => result.map_err(Some),
            Err(_) => Err(None),
        }
    })
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        text.to_string()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "unknown panic".to_string()
    }
}
