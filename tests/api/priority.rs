//! Training runs below the HTTP runtime's priority: the job's thread and rayon's pool (the
//! training step's parallel kernels) at `COMPUTE_NICE`, the runtime's threads untouched.

use std::sync::{Arc, Mutex};

use lrtune::engine::{EngineError, Event, Limits, LoadedData, SpecError, ValidSpec};
use lrtune::worker::priority::{this_thread_nice, COMPUTE_NICE};
use lrtune::worker::{JobRunner, RunOutput};

use crate::helpers::*;

/// Records the nice value of the thread that runs the job and of a rayon pool thread.
#[derive(Default)]
struct NiceProbe {
    seen: Mutex<Option<(i32, i32)>>,
}

impl JobRunner for NiceProbe {
    fn run(
        &self,
        _spec: &ValidSpec,
        _loaded: LoadedData,
        _limits: &Limits,
        _cancel: &std::sync::atomic::AtomicBool,
        _observer: &mut dyn FnMut(Event),
    ) -> Result<RunOutput, EngineError> {
        let job_thread = this_thread_nice();
        let mut pool_thread = 0;
        rayon::scope(|_| pool_thread = this_thread_nice());
        *self.seen.lock().unwrap() = Some((job_thread, pool_thread));
        Err(SpecError::new("probe", "recorded the priorities").into())
    }
}

#[tokio::test]
async fn jobs_train_at_a_lower_priority_than_the_http_runtime() {
    let probe = Arc::new(NiceProbe::default());
    let app = spawn_app_with(|_| {}, probe.clone()).await;
    let id = app.submit(&tiny_spec()).await;
    let job = app.wait_until_finished(&id).await;
    assert_eq!(job["error"]["field"], "probe", "{job}");
    // The test's own thread (the runtime's side) keeps the priority it started with; the
    // comparison needs a process started at the default priority.
    if cfg!(target_os = "linux") && this_thread_nice() == 0 {
        assert_eq!(COMPUTE_NICE, 10);
        assert_eq!(
            *probe.seen.lock().unwrap(),
            Some((COMPUTE_NICE, COMPUTE_NICE))
        );
    }
}
