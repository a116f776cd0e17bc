//! Training runs at a lower OS scheduling priority than the HTTP runtime, so that the API
//! answers at once while jobs keep every core busy: when a request arrives, the scheduler
//! hands a core to the runtime's thread instead of sharing it evenly with the training
//! threads. A training thread alone on a core still runs at full speed.

/// The nice value of the threads that train. At 10, a training thread weighs about a ninth
/// of a nice-0 thread (Linux's CFS weights 110 and 1024) when both want the same core.
pub const COMPUTE_NICE: i32 = 10;

/// Lowers the calling thread's priority to [`COMPUTE_NICE`]. On Linux the nice value belongs
/// to the thread, not the process, so nothing else is affected.
pub fn lower_this_thread() {
    #[cfg(target_os = "linux")]
    {
        let thread = rustix::thread::gettid();
        if let Err(error) = rustix::process::setpriority_process(Some(thread), COMPUTE_NICE) {
            tracing::warn!(%error, "could not lower a training thread's priority");
        }
    }
}

/// Builds rayon's global pool, which runs the training step's parallel kernels and matrix
/// products, with every thread at [`COMPUTE_NICE`]: `threads` of them (by default one per
/// core). Only the first call in a process builds it (a second server in the same process,
/// as in tests, shares the pool).
pub fn lower_compute_pool(threads: Option<usize>) {
    let built = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.unwrap_or(0))
        .thread_name(|index| format!("lrtune-compute-{index}"))
        .start_handler(|_| lower_this_thread())
        .build_global();
    if let Err(error) = built {
        tracing::debug!(%error, "rayon's pool was already built");
    }
}

/// The calling thread's nice value (Linux; 0 elsewhere).
pub fn this_thread_nice() -> i32 {
    #[cfg(target_os = "linux")]
    {
        rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap_or(0)
    }
    #[cfg(not(target_os = "linux"))]
    {
        0
    }
}
