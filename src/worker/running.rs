//! The jobs running in this process, each with the cancel flag its engine polls every step:
//! raised by a cancel (heard from the store, from any process) or by the shutdown once the
//! grace period is over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Default)]
pub(super) struct Running {
    cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Set when the process stops waiting for running jobs: they go back to the queue.
    stopping: AtomicBool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding this short lock leaves consistent data: keep going.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Running {
    /// The job's cancel flag, raised already when the process is stopping.
    pub(super) fn register(&self, job_id: &str) -> Arc<AtomicBool> {
        let flag = Arc::new(AtomicBool::new(self.stopping.load(Ordering::SeqCst)));
        lock(&self.cancels).insert(job_id.to_string(), flag.clone());
        flag
    }

    pub(super) fn unregister(&self, job_id: &str) {
        lock(&self.cancels).remove(job_id);
    }

    /// Raises the cancel flag of a job running here; false when it does not run here.
    pub(super) fn cancel(&self, job_id: &str) -> bool {
        match lock(&self.cancels).get(job_id) {
            Some(flag) => {
                flag.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    /// Stops every running job so that it goes back to the queue (shutdown past the grace).
    pub(super) fn stop_all(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        for flag in lock(&self.cancels).values() {
            flag.store(true, Ordering::SeqCst);
        }
    }

    pub(super) fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }
}
