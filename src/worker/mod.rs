//! The queue loop: N tokio workers claim queued jobs (each claim one statement, with a
//! lease), run the engine on a thread of its own, write progress, new curve points and sweep
//! runs with a heartbeat that renews the lease a few times a second, and commit the outcome
//! in one transaction. Besides the workers, every process runs a reaper, which queues again
//! (or fails) jobs whose lease ran out, whichever process claimed them, and listens for
//! cancels of the jobs it runs.

mod data;
mod flusher;
pub mod priority;
mod runner;
mod running;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn, Instrument};

pub use data::{planned_shape, JobDatasets};
pub use runner::{EngineRunner, JobRunner, RunOutput};

use crate::config::QueueConfig;
use crate::engine::admission::admit_job;
use crate::engine::spec::WeightsSource;
use crate::engine::{self, EngineError, Event, JobSpec, Limits, ValidSpec};
use crate::store::{
    Attempt, Change, FinalState, JobError, JobRow, ProgressUpdate, Store, StoreError,
};
use crate::telemetry::Telemetry;
use flusher::{stalled, Flusher, WriteSchedule};
use running::Running;

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Jobs run at the same time (0: none, only the reaper).
    pub workers: usize,
    /// What jobs show as their `worker`: `NAME@HOST` (`NAME.I@HOST` for the I-th of several).
    pub name: String,
    pub queue: QueueConfig,
    pub limits: Limits,
    /// How often progress, new points and sweep runs are written.
    pub flush_every: Duration,
    /// How often an idle worker looks for work without being woken.
    pub poll_every: Duration,
    /// Threads of the compute pool that trains (none: one per core).
    pub threads: Option<usize>,
}

impl WorkerSettings {
    pub fn new(workers: usize, name: String, queue: QueueConfig, limits: Limits) -> WorkerSettings {
        WorkerSettings {
            workers,
            name,
            queue,
            limits,
            flush_every: Duration::from_millis(250),
            poll_every: Duration::from_millis(500),
            threads: None,
        }
    }

    fn lease(&self) -> Duration {
        self.queue.stale_after
    }

    /// Often enough that a few heartbeats fit in a lease, and at least once a second so that
    /// a cancel from another process on the same SQLite file is seen within a second.
    fn heartbeat_every(&self) -> Duration {
        (self.lease() / 4).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    fn worker_name(&self, index: usize) -> String {
        let (name, host) = self
            .name
            .split_once('@')
            .unwrap_or((self.name.as_str(), "localhost"));
        if self.workers > 1 {
            format!("{name}.{index}@{host}")
        } else {
            format!("{name}@{host}")
        }
    }
}

/// `NAME@HOST` for this process: the name given, or `pid<PID>`, at this machine's name.
pub fn worker_name(name: Option<&str>) -> String {
    let host = whoami::hostname().unwrap_or_else(|_| "localhost".to_string());
    match name {
        Some(name) => format!("{name}@{host}"),
        None => format!("pid{}@{host}", std::process::id()),
    }
}

/// The running workers, reaper and cancel listener of one process.
pub struct WorkerPool {
    handles: Vec<JoinHandle<()>>,
    reaper: JoinHandle<()>,
    cancels: JoinHandle<()>,
    stop_claiming: watch::Sender<bool>,
    running: Arc<Running>,
}

impl WorkerPool {
    pub fn start(
        store: Store,
        settings: WorkerSettings,
        runner: Arc<dyn JobRunner>,
        telemetry: Arc<Telemetry>,
    ) -> WorkerPool {
        if settings.workers > 0 {
            priority::lower_compute_pool(settings.threads);
        }
        let (stop_claiming, stop) = watch::channel(false);
        let running = Arc::new(Running::default());
        let handles = (0..settings.workers)
            .map(|index| {
                let worker = Worker {
                    name: settings.worker_name(index),
                    store: store.clone(),
                    running: running.clone(),
                    settings: settings.clone(),
                    runner: runner.clone(),
                    telemetry: telemetry.clone(),
                    stop: stop.clone(),
                };
                tokio::spawn(worker.run())
            })
            .collect();
        let cancels = tokio::spawn(hear_cancels(store.subscribe(), running.clone()));
        let reaper = tokio::spawn(reap_forever(store, settings, stop));
        WorkerPool {
            handles,
            reaper,
            cancels,
            stop_claiming,
            running,
        }
    }

    /// Stops claiming and drains by `deadline`: running jobs get until [`STOP_RESERVE`]
    /// before it to finish, then they are stopped and put back to the queue, and the workers
    /// are given up `reserve` before the deadline (for the caller to close connections)
    /// whatever the jobs or the database do. A worker still busy then (its job's requeue not
    /// written, the database not answering) is dropped, and its job, still `running` in the
    /// store, is queued again by whichever process sees its lease run out.
    pub async fn shutdown(self, deadline: Instant, reserve: Duration) {
        let _ = self.stop_claiming.send(true);
        self.reaper.abort();
        let mut handles = self.handles;
        let stop_at = deadline.checked_sub(STOP_RESERVE).unwrap_or(deadline);
        if !all_ended(&mut handles, stop_at).await {
            warn!("grace period over: stopping running jobs and queueing them again");
            self.running.stop_all();
            let give_up_at = deadline.checked_sub(reserve).unwrap_or(deadline);
            if !all_ended(&mut handles, give_up_at).await {
                warn!(
                    "jobs not queued again in time (a computation that does not stop, or the \
                     database not answering): leaving them to be queued again when their \
                     lease runs out"
                );
                for handle in &handles {
                    handle.abort();
                }
            }
        }
        self.cancels.abort();
    }
}

/// The last part of the grace period, in which running jobs are stopped and put back to the
/// queue (jobs get the rest of it to finish).
pub const STOP_RESERVE: Duration = Duration::from_secs(3);

/// How long a worker waits for a job's computation to end once its cancel flag is up (a cancel,
/// a shutdown, a lost lease) before it writes the job's end without it. The engine checks the
/// flag every step and within long evaluations, so this is only reached by a computation stuck
/// in a kernel (or one very long step); its thread is left to end by itself.
const ABANDON_AFTER: Duration = Duration::from_secs(1);

/// Events the engine may send ahead of the worker loop that writes them.
const EVENT_CHANNEL: usize = 256;

/// True when every task ended by `deadline`.
async fn all_ended(handles: &mut [JoinHandle<()>], deadline: Instant) -> bool {
    tokio::time::timeout_at(deadline.into(), async {
        for handle in handles.iter_mut() {
            let _ = handle.await;
        }
    })
    .await
    .is_ok()
}

/// Raises the flag of a job running here as soon as any process asks for its cancel (its
/// heartbeat would see it too, a little later).
async fn hear_cancels(mut changes: broadcast::Receiver<Change>, running: Arc<Running>) {
    loop {
        match changes.recv().await {
            Ok(Change::CancelRequested(id)) => {
                if running.cancel(&id) {
                    info!(job = %id, "cancel requested: stopping the job");
                }
            }
            Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

async fn reap_forever(store: Store, settings: WorkerSettings, mut stop: watch::Receiver<bool>) {
    let every = (settings.lease() / 2).clamp(Duration::from_millis(100), Duration::from_secs(30));
    loop {
        match store.reap_expired(settings.queue.max_attempts).await {
            Ok(outcome) => {
                for id in &outcome.requeued {
                    warn!(job = %id, "the job's lease ran out: queued again");
                }
                for id in &outcome.failed {
                    warn!(job = %id, "the job's lease ran out on its last attempt: failed");
                }
            }
            Err(error) => error!(%error, "reaping jobs whose lease ran out"),
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
    running: Arc<Running>,
    settings: WorkerSettings,
    runner: Arc<dyn JobRunner>,
    telemetry: Arc<Telemetry>,
    stop: watch::Receiver<bool>,
}

/// Why the engine's cancel flag went up.
#[derive(Default)]
struct CancelReason {
    lost: AtomicBool,
}

impl Worker {
    async fn run(mut self) {
        // After a failed claim (the database down), the next try waits longer each time, up to
        // 5 s, so that a fleet does not hammer a database coming back.
        let mut backoff = Duration::ZERO;
        loop {
            if *self.stop.borrow() {
                return;
            }
            // Subscribed before the claim, so that a job queued after it wakes this worker.
            let mut changes = self.store.subscribe();
            match self
                .store
                .claim_job(&self.name, self.settings.lease())
                .await
            {
                Ok(Some(job)) => {
                    backoff = Duration::ZERO;
                    let span = tracing::info_span!("job", id = %job.id, attempt = job.attempts, worker = %self.name);
                    self.run_job(job).instrument(span).await;
                }
                Ok(None) => {
                    backoff = Duration::ZERO;
                    let poll = tokio::time::sleep(self.settings.poll_every);
                    tokio::pin!(poll);
                    loop {
                        tokio::select! {
                            change = changes.recv() => match change {
                                Ok(Change::Queued | Change::Unknown)
                                | Err(broadcast::error::RecvError::Lagged(_)) => break,
                                Ok(_) => {}
                                Err(broadcast::error::RecvError::Closed) => {
                                    (&mut poll).await;
                                    break;
                                }
                            },
                            _ = &mut poll => break,
                            _ = self.stop.changed() => break,
                        }
                    }
                }
                Err(error) => {
                    backoff =
                        (backoff * 2).clamp(Duration::from_millis(250), Duration::from_secs(5));
                    error!(%error, retry_in = ?backoff, "claiming a job");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.stop.changed() => {}
                    }
                }
            }
        }
    }

    async fn run_job(&self, job: JobRow) {
        let attempt = job.attempt();
        info!("job started");
        let started = Instant::now();
        let mut flusher = Flusher::new(attempt.clone());
        let reason = CancelReason::default();
        let state = match self.execute(&job, &mut flusher, &reason).await {
            Ok(state) => state,
            Err(error) => FinalState::Failed(error),
        };
        let status = state.status();
        let last = flusher.take_update();
        match self.finish(&attempt, &state, &last).await {
            Ok(true) => {
                info!(status = status.as_str(), "job finished");
                if status.is_finished() {
                    self.telemetry.record_job(
                        status,
                        started.elapsed().as_secs_f64(),
                        flusher.done as u64,
                    );
                }
            }
            // Said once already, when the first write was refused.
            Ok(false) if reason.lost.load(Ordering::SeqCst) => {}
            Ok(false) => warn!("job was taken over by another attempt: its outcome is refused"),
            Err(error) => {
                // Never a finished job without its points: this attempt is given up, and the
                // job runs again from the start.
                error!(%error, "the job's outcome could not be written: queueing the job again");
                let requeue = FinalState::Requeue;
                let empty = ProgressUpdate::default();
                if let Err(error) = self.store.finish_attempt(&attempt, &requeue, &empty).await {
                    error!(
                        %error,
                        "the job could not be queued again either: it will be when its lease \
                         runs out"
                    );
                }
            }
        }
        self.running.unregister(&job.id);
    }

    /// Writes the attempt's outcome, trying again while the database is unavailable (locked
    /// by another process, say): a finished job's result is worth waiting for. Not past the
    /// lease, though: no heartbeat is written meanwhile, so by then another process may have
    /// queued the job again and the guarded write would find it gone.
    async fn finish(
        &self,
        attempt: &Attempt,
        state: &FinalState,
        last: &ProgressUpdate,
    ) -> Result<bool, StoreError> {
        let started = Instant::now();
        let mut pause = Duration::from_millis(100);
        loop {
            match self.store.finish_attempt(attempt, state, last).await {
                Err(error)
                    if error.is_unavailable()
                        && started.elapsed() + pause < self.settings.lease() =>
                {
                    warn!(%error, retry_in = ?pause, "writing the job's outcome: trying again");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                outcome => return outcome,
            }
        }
    }

    /// Runs the attempt to its end state; an `Err` is a failure to report on the job. What
    /// the engine reported and was not written yet stays in `flusher`, for the final write.
    async fn execute(
        &self,
        job: &JobRow,
        flusher: &mut Flusher,
        reason: &CancelReason,
    ) -> Result<FinalState, JobError> {
        // Checked when it was submitted; only read back here.
        let spec = ValidSpec::from_stored(&job.spec).map_err(spec_error)?;
        let datasets = self.fetch_datasets(&spec).await?;
        let initial_weights = self.fetch_weights(&spec).await?;
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
            admit_job(&spec, &shape, &self.settings.limits).map_err(spec_error)?;
        }
        let cancel = self.running.register(&job.id);
        if job.cancel_requested {
            cancel.store(true, Ordering::SeqCst);
        }
        let (events, mut received) = mpsc::channel::<Event>(EVENT_CHANNEL);
        let runner = self.runner.clone();
        let limits = self.settings.limits.clone();
        let engine_cancel = cancel.clone();
        let span = tracing::Span::current();
        let compute = spawn_compute(move || {
            let _entered = span.enter();
            // Blocks while the worker holds as many unwritten rows as it may (see the loop
            // below): the training pauses until the database takes them.
            let mut observer = |event: Event| {
                let _ = events.blocking_send(event);
            };
            let loaded = data::load(&spec, datasets, initial_weights)?;
            runner.run(&spec, loaded, &limits, &engine_cancel, &mut observer)
        })
        .map_err(|error| JobError {
            code: "internal".into(),
            message: format!("the job's thread could not start: {error}"),
            field: None,
        })?;

        let mut tick = tokio::time::interval(self.settings.flush_every);
        let mut writes = WriteSchedule::new(self.settings.heartbeat_every());
        let stall_after = self.settings.queue.stall_after;
        let max_buffered =
            usize::try_from(self.settings.queue.max_buffered_rows).unwrap_or(usize::MAX);
        let mut last_event = Instant::now();
        let mut canceled_at: Option<Instant> = None;
        let compute = std::pin::pin!(compute);
        let ended = loop {
            let stopping = cancel.load(Ordering::SeqCst);
            // With the buffer full (the database has taken nothing for a while), events stay
            // in the channel and the engine's next send blocks. A job being stopped is drained
            // so that it sees its flag.
            let paused = flusher.buffered() >= max_buffered && !stopping;
            tokio::select! {
                event = received.recv(), if !paused => match event {
                    Some(event) => {
                        last_event = Instant::now();
                        flusher.observe(event);
                    }
                    None => break Some(compute.await),
                },
                _ = tick.tick() => {
                    if paused {
                        // Waiting on the database, not stalled.
                        last_event = Instant::now();
                    } else if last_event.elapsed() >= stall_after {
                        cancel.store(true, Ordering::SeqCst);
                        return Err(stalled(stall_after, flusher));
                    }
                    if stopping {
                        let since = *canceled_at.get_or_insert_with(Instant::now);
                        if since.elapsed() >= ABANDON_AFTER {
                            warn!(
                                waited = ?ABANDON_AFTER,
                                "the job's computation did not stop when asked: ending the job \
                                 without it"
                            );
                            break None;
                        }
                    }
                    if !reason.lost.load(Ordering::SeqCst) && writes.due(flusher.dirty) {
                        let written = self.flush(flusher, &cancel, reason).await;
                        writes.done(written);
                    }
                }
            }
        };
        let state = match ended {
            Some(Ok(Ok(output))) => self.succeeded(output, flusher)?,
            Some(Ok(Err(EngineError::Canceled))) | None => {
                if self.running.is_stopping() || reason.lost.load(Ordering::SeqCst) {
                    FinalState::Requeue
                } else {
                    FinalState::Canceled
                }
            }
            Some(Ok(Err(error))) => FinalState::Failed(engine_error(error)),
            Some(Err(panic)) => {
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
        Ok(state)
    }

    /// The result to store. Its curve (a race's points) is the one the engine streamed,
    /// point by point, and the flusher wrote as it came (the rest goes with the final write):
    /// the two must agree.
    fn succeeded(&self, output: RunOutput, flusher: &Flusher) -> Result<FinalState, JobError> {
        let (kept, seen, what) = match &output {
            RunOutput::Tune(output) => (output.curve.len(), flusher.points_seen, "curve points"),
            RunOutput::Race(result) => (
                result
                    .recipes
                    .iter()
                    .flat_map(|r| &r.runs)
                    .map(|run| run.points.len())
                    .sum(),
                flusher.race_points_seen,
                "race points",
            ),
        };
        if kept != seen {
            return Err(JobError {
                code: "internal".into(),
                message: format!("the engine reported {seen} {what} but its result has {kept}"),
                field: None,
            });
        }
        let encoded = match &output {
            RunOutput::Tune(output) => serde_json::to_string(&output.result),
            RunOutput::Race(result) => serde_json::to_string(&**result),
        };
        let result = encoded.map_err(|e| JobError {
            code: "internal".into(),
            message: format!("the result could not be encoded: {e}"),
            field: None,
        })?;
        let steps = match &output {
            RunOutput::Tune(output) => output.result.timing.total_steps,
            RunOutput::Race(result) => result.timing.tune_steps + result.timing.race_steps,
        };
        Ok(FinalState::Succeeded {
            result,
            steps: steps as i64,
        })
    }

    /// Writes what the flusher holds with a heartbeat. False when the database did not take
    /// it (the rows stay in the flusher for the next try).
    async fn flush(
        &self,
        flusher: &mut Flusher,
        cancel: &AtomicBool,
        reason: &CancelReason,
    ) -> bool {
        let update = flusher.take_update();
        let recorded = self
            .store
            .record_progress(&flusher.attempt, &update, self.settings.lease())
            .await;
        match recorded {
            Ok(Some(cancel_requested)) => {
                if cancel_requested {
                    cancel.store(true, Ordering::SeqCst);
                }
                true
            }
            Ok(None) => {
                // The one line a worker that lost its lease (frozen, cut off) logs: from here
                // on it writes nothing more for this attempt.
                warn!(
                    "the job's lease was lost to another attempt: its writes are refused; \
                     dropping the job"
                );
                reason.lost.store(true, Ordering::SeqCst);
                cancel.store(true, Ordering::SeqCst);
                true
            }
            Err(error) => {
                error!(%error, buffered = update.rows(), "writing progress: keeping it for the next try");
                flusher.put_back(update);
                false
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

    /// The stored bytes of the uploaded weights a job starts from (`init.weights.id`).
    async fn fetch_weights(&self, spec: &JobSpec) -> Result<Option<Vec<u8>>, JobError> {
        let Some(WeightsSource::Id(id)) = spec.init.as_ref().map(|init| &init.weights) else {
            return Ok(None);
        };
        let field = Some("init.weights.id".to_string());
        match self.store.load_weights(id).await {
            Ok(Some(weights)) => Ok(Some(weights.data)),
            Ok(None) => Err(JobError {
                code: "invalid_spec".into(),
                message: format!("no weights {id}"),
                field,
            }),
            Err(error) => {
                error!(%error, "loading weights");
                Err(JobError {
                    code: "internal".into(),
                    message: "the weights could not be read".into(),
                    field,
                })
            }
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
