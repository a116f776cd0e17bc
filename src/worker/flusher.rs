//! A running job's events between database writes ([`Flusher`]), when the next write is due
//! ([`WriteSchedule`]), and the watchdog's verdict on a job that stalled.

use std::time::{Duration, Instant};

use tracing::error;

use crate::engine::Event;
use crate::store::{
    nan_as_null, Attempt, JobError, PointRow, ProgressUpdate, RacePointRow, SweepRunRow,
    TrialUpdate,
};

/// Collects a running job's events between database writes: each point and sweep run is
/// handed to exactly one write.
pub(super) struct Flusher {
    pub(super) attempt: Attempt,
    pub(super) stage: Option<String>,
    pub(super) done: usize,
    pub(super) total: usize,
    points: Vec<PointRow>,
    sweep_runs: Vec<SweepRunRow>,
    race_points: Vec<RacePointRow>,
    trials: Vec<TrialUpdate>,
    /// Points, sweep runs and race points the engine reported so far.
    pub(super) points_seen: usize,
    sweep_runs_seen: usize,
    pub(super) race_points_seen: usize,
    pub(super) dirty: bool,
}

impl Flusher {
    pub(super) fn new(attempt: Attempt) -> Flusher {
        Flusher {
            attempt,
            stage: None,
            done: 0,
            total: 0,
            points: Vec::new(),
            sweep_runs: Vec::new(),
            race_points: Vec::new(),
            trials: Vec::new(),
            points_seen: 0,
            sweep_runs_seen: 0,
            race_points_seen: 0,
            dirty: false,
        }
    }

    pub(super) fn observe(&mut self, event: Event) {
        self.dirty = true;
        match event {
            Event::Stage(stage) => self.stage = Some(stage.to_string()),
            Event::Point(point) => {
                self.points_seen += 1;
                self.points.push(PointRow::new(
                    point.step,
                    point.lr,
                    point.loss,
                    point.smoothed,
                ));
            }
            Event::SweepRun(run) => {
                self.sweep_runs.push(SweepRunRow {
                    position: self.sweep_runs_seen as i64,
                    peak_lr: run.peak_lr,
                    seed: run.seed as i64,
                    steps: Some(run.steps as i64),
                    val_loss: nan_as_null(run.val_loss),
                    val_accuracy: run.val_accuracy.and_then(nan_as_null),
                    train_loss: nan_as_null(run.train_loss),
                    diverged: run.diverged,
                    spiked: Some(run.spiked),
                });
                self.sweep_runs_seen += 1;
            }
            Event::RacePoint(race) => {
                self.race_points.push(RacePointRow {
                    position: self.race_points_seen as i64,
                    recipe: race.recipe,
                    seed: race.seed as i64,
                    step: race.point.step as i64,
                    seconds: race.point.seconds,
                    val_loss: race.point.val_loss.and_then(nan_as_null),
                    val_accuracy: race.point.val_accuracy.and_then(nan_as_null),
                });
                self.race_points_seen += 1;
            }
            Event::Trial(trial) => self.trials.push(TrialUpdate::from_event(&trial)),
            Event::Progress { done, total } => {
                self.done = done;
                self.total = total;
            }
        }
    }

    pub(super) fn take_update(&mut self) -> ProgressUpdate {
        self.dirty = false;
        ProgressUpdate {
            stage: self.stage.clone(),
            done: self.done as i64,
            total: self.total as i64,
            points: std::mem::take(&mut self.points),
            sweep_runs: std::mem::take(&mut self.sweep_runs),
            race_points: std::mem::take(&mut self.race_points),
            trials: std::mem::take(&mut self.trials),
        }
    }

    /// Rows waiting to be written.
    pub(super) fn buffered(&self) -> usize {
        self.points.len() + self.sweep_runs.len() + self.race_points.len() + self.trials.len()
    }

    /// An update that could not be written: its points and runs go first in the next one.
    pub(super) fn put_back(&mut self, update: ProgressUpdate) {
        self.points.splice(0..0, update.points);
        self.sweep_runs.splice(0..0, update.sweep_runs);
        self.race_points.splice(0..0, update.race_points);
        self.trials.splice(0..0, update.trials);
        self.dirty = true;
    }
}

/// When the next progress write is due: when there is something new, or a heartbeat is due,
/// and never sooner than the backoff after failed writes (the database is down or full), which
/// doubles up to 5 s and resets on success.
pub(super) struct WriteSchedule {
    heartbeat_every: Duration,
    last: Instant,
    backoff: Duration,
}

impl WriteSchedule {
    const MAX_BACKOFF: Duration = Duration::from_secs(5);

    pub(super) fn new(heartbeat_every: Duration) -> WriteSchedule {
        WriteSchedule {
            heartbeat_every,
            last: Instant::now(),
            backoff: Duration::ZERO,
        }
    }

    pub(super) fn due(&self, dirty: bool) -> bool {
        let since = self.last.elapsed();
        since >= self.backoff && (dirty || since >= self.heartbeat_every)
    }

    pub(super) fn done(&mut self, written: bool) {
        self.last = Instant::now();
        self.backoff = if written {
            Duration::ZERO
        } else {
            (self.backoff * 2).clamp(Duration::from_millis(250), Self::MAX_BACKOFF)
        };
    }
}

/// The watchdog's verdict on a job that reported nothing for `stall_after`.
pub(super) fn stalled(stall_after: Duration, flusher: &Flusher) -> JobError {
    let stage = flusher.stage.as_deref().unwrap_or("loading the data");
    error!(stage, step = flusher.done, "no progress: the job stalled");
    JobError {
        code: "stalled".into(),
        message: format!(
            "no step finished for {} s (stage {stage}, step {} of {}): the job was stopped and is \
             not retried, since it would stall again",
            stall_after.as_secs_f64(),
            flusher.done,
            flusher.total
        ),
        field: None,
    }
}
