//! Trials: one training run each, repeatable from what describes it (the job's model, data
//! and optimizer, a schedule, a length and a seed), and the two things every trial shares.
//! - [`TrialLoop`]: the one place a trial's steps go through: its seed's batch order and
//!   dropout stream, the cancel check, progress, the training time, and validation where the
//!   optimizer says the model is evaluated. The range test, every sweep run and every race
//!   run step through it.
//! - [`Trials`]: runs a batch of independent trials (a sweep's screening, its finalists, a
//!   race's recipes x seeds), one at a time or side by side, and hands the results back in
//!   the batch's order whatever order they finished in. The planners (`sweep`, `tune`,
//!   `compare`) decide only from those results, so a job's result does not depend on how
//!   many trials ran at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::backend::{BatchOrder, DeviceData, Evaluation};
use super::events::{Control, EngineError, Event};
use super::optim::Optimizer;
use super::rng::Rng;
use super::trainer::Trainer;

/// The stream of a trial's dropout masks, derived from its seed.
const DROPOUT_STREAM: u64 = 0xd50;

/// What every trial of a job trains and validates on.
#[derive(Clone, Copy)]
pub struct TrialData<'a> {
    pub train: &'a DeviceData,
    pub validation: &'a DeviceData,
    pub batch_size: usize,
}

/// One trial's training: the model, its optimizer, and the batches and dropout masks of its
/// seed, in order.
pub struct TrialLoop<'a, 'o> {
    trainer: &'a Trainer,
    data: TrialData<'a>,
    optimizer: &'o mut Optimizer,
    order: BatchOrder,
    dropout_rng: Rng,
    training: Duration,
}

impl<'a, 'o> TrialLoop<'a, 'o> {
    /// A trial from the model's current weights, with the batch order and dropout stream of
    /// `seed`.
    pub fn new(
        trainer: &'a Trainer,
        data: TrialData<'a>,
        optimizer: &'o mut Optimizer,
        seed: u64,
    ) -> Self {
        Self {
            trainer,
            order: BatchOrder::new(data.train.rows, data.batch_size, seed),
            dropout_rng: Rng::derive(seed, DROPOUT_STREAM),
            data,
            optimizer,
            training: Duration::ZERO,
        }
    }

    /// One optimizer step on the next batch at `lr` and `momentum` (after a cancel check),
    /// counted as done; the batch's training loss, which may be non-finite.
    pub fn step(
        &mut self,
        lr: f64,
        momentum: f64,
        control: &mut Control<'_>,
    ) -> Result<f64, EngineError> {
        control.check_cancel()?;
        let began = Instant::now();
        let loss = self.trainer.train_step(
            self.optimizer,
            self.data.train,
            self.order.next_batch(),
            lr,
            momentum,
            &mut self.dropout_rng,
        )?;
        self.training += began.elapsed();
        control.step_done();
        Ok(loss)
    }

    /// The validation loss (and accuracy) where the optimizer says the model is evaluated
    /// (see [`Trainer::evaluate_with`]).
    pub fn evaluate(&mut self, control: &Control<'_>) -> Result<Evaluation, EngineError> {
        self.trainer.evaluate_with(
            self.optimizer,
            self.data.validation,
            self.data.train,
            self.data.batch_size,
            control.cancel_flag(),
        )
    }

    pub fn optimizer(&self) -> &Optimizer {
        self.optimizer
    }

    /// Seconds spent in training steps so far (validation left out).
    pub fn training_seconds(&self) -> f64 {
        self.training.as_secs_f64()
    }
}

/// Runs batches of independent trials.
#[derive(Debug, Clone, Copy)]
pub struct Trials {
    parallel: usize,
}

impl Trials {
    /// `parallel` trials at a time (at least 1). Side by side, each runs on its own share of
    /// rayon's threads (at least one), so that a 2-core host runs two single-threaded trials
    /// rather than two that fight over both cores.
    pub fn new(parallel: usize) -> Self {
        Self {
            parallel: parallel.max(1),
        }
    }

    /// One at a time, on the caller's thread.
    pub fn serial() -> Self {
        Self::new(1)
    }

    pub fn parallel(&self) -> usize {
        self.parallel
    }

    /// Runs every trial of `batch` with `run` and returns the results in the batch's order.
    /// Events and progress reach `control` as the trials report them (side by side, in the
    /// order they happen). A trial's error ends the batch: the trials already running
    /// finish, none is started after it, and the error of the earliest failed trial in the
    /// batch is returned.
    pub fn run_batch<T, R>(
        &self,
        batch: &[T],
        run: &(dyn Fn(&T, &mut Control<'_>) -> Result<R, EngineError> + Sync),
        control: &mut Control<'_>,
    ) -> Result<Vec<R>, EngineError>
    where
        T: Sync,
        R: Send,
    {
        let slots = self.parallel.min(batch.len());
        if slots <= 1 {
            return batch.iter().map(|trial| run(trial, control)).collect();
        }
        let threads = (rayon::current_num_threads() / slots).max(1);
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let cancel = control.cancel_flag();
        let counter = control.trial_counter();
        let (sender, receiver) = mpsc::channel::<Message<R>>();
        let mut results: Vec<Option<Result<R, EngineError>>> =
            std::iter::repeat_with(|| None).take(batch.len()).collect();
        std::thread::scope(|scope| {
            for slot in 0..slots {
                let sender = sender.clone();
                let (next, failed, counter) = (&next, &failed, &counter);
                scope.spawn(move || {
                    let work = || loop {
                        if failed.load(Ordering::Relaxed) {
                            break;
                        }
                        let index = next.fetch_add(1, Ordering::Relaxed);
                        let Some(trial) = batch.get(index) else { break };
                        let mut forward = |event: Event| {
                            // The receiver lives until every slot has ended.
                            let _ = sender.send(Message::Event(slot, event));
                        };
                        let mut inner = Control::with_trials(cancel, &mut forward, counter.clone());
                        let result = run(trial, &mut inner);
                        if result.is_err() {
                            failed.store(true, Ordering::Relaxed);
                        }
                        let _ = sender.send(Message::Done(slot, index, result));
                    };
                    match rayon::ThreadPoolBuilder::new()
                        .num_threads(threads)
                        .thread_name(move |index| format!("lrtune-trial-{slot}-{index}"))
                        .build()
                    {
                        Ok(pool) => pool.install(work),
                        // No pool of its own: the trial's kernels run on the global one.
                        Err(_) => work(),
                    }
                });
            }
            drop(sender);
            // A slot's trial reports its own steps from 0; the batch's progress is their sum.
            let mut reported = vec![0; slots];
            for message in receiver {
                match message {
                    Message::Event(slot, Event::Progress { done, .. }) => {
                        control.add_done(done.saturating_sub(reported[slot]));
                        reported[slot] = done;
                    }
                    Message::Event(_, event) => control.emit(event),
                    Message::Done(slot, index, result) => {
                        reported[slot] = 0;
                        results[index] = Some(result);
                    }
                }
            }
        });
        // A trial is left unstarted only after one failed, so with no error every one ran.
        let mut finished = Vec::with_capacity(batch.len());
        let mut first_error = None;
        for result in results.into_iter().flatten() {
            match result {
                Ok(value) => finished.push(value),
                Err(error) => {
                    first_error.get_or_insert(error);
                }
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(finished),
        }
    }
}

enum Message<R> {
    Event(usize, Event),
    Done(usize, usize, Result<R, EngineError>),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn collect_events(trials: Trials, batch: &[u64], fail_at: Option<u64>) -> TestRun {
        let cancel = AtomicBool::new(false);
        let mut events = Vec::new();
        let mut observer = |event: Event| events.push(event);
        let mut control = Control::new(&cancel, &mut observer);
        let run = |&trial: &u64, control: &mut Control<'_>| -> Result<u64, EngineError> {
            // Later trials finish first: the results must still come back in batch order.
            std::thread::sleep(Duration::from_millis(5 * (10 - trial.min(10))));
            for _ in 0..trial {
                control.step_done();
            }
            if Some(trial) == fail_at {
                return Err(EngineError::Canceled);
            }
            Ok(trial * 100)
        };
        let result = trials.run_batch(batch, &run, &mut control);
        let done = control.steps_done();
        TestRun {
            result,
            done,
            events,
        }
    }

    struct TestRun {
        result: Result<Vec<u64>, EngineError>,
        done: usize,
        events: Vec<Event>,
    }

    #[test]
    fn a_batch_comes_back_in_its_order_with_every_step_counted_whatever_the_slots() {
        let batch = [1, 2, 3, 4, 5, 6, 7];
        for parallel in [1, 2, 3, 8] {
            let run = collect_events(Trials::new(parallel), &batch, None);
            assert_eq!(
                run.result.unwrap(),
                vec![100, 200, 300, 400, 500, 600, 700],
                "{parallel} at a time"
            );
            assert_eq!(run.done, 28, "{parallel} at a time");
            let last = run.events.iter().rev().find_map(|event| match event {
                Event::Progress { done, .. } => Some(*done),
                _ => None,
            });
            assert_eq!(last, Some(28), "{parallel} at a time");
        }
    }

    #[test]
    fn a_failed_trial_fails_the_batch_and_no_trial_starts_after_it() {
        for parallel in [1, 3] {
            let run = collect_events(Trials::new(parallel), &[2, 9, 3, 4, 5, 6], Some(9));
            assert!(
                matches!(run.result, Err(EngineError::Canceled)),
                "{parallel} at a time"
            );
            // 2 and 9 always ran; side by side, at most the slots' other trials ran too.
            assert!(run.done >= 11, "{parallel} at a time: {}", run.done);
            assert!(
                run.done <= 2 + 9 + 3 + 4,
                "{parallel} at a time: {}",
                run.done
            );
        }
    }

    #[test]
    fn side_by_side_each_trial_runs_on_its_share_of_the_threads() {
        let cancel = AtomicBool::new(false);
        let mut observer = |_: Event| {};
        let mut control = Control::new(&cancel, &mut observer);
        let run = |_: &u8, _: &mut Control<'_>| Ok(rayon::current_num_threads());
        let threads = Trials::new(2)
            .run_batch(&[0u8, 1], &run, &mut control)
            .unwrap();
        let expected = (rayon::current_num_threads() / 2).max(1);
        assert_eq!(threads, vec![expected, expected]);
    }
}
