use std::process::ExitCode;

// candle allocates a fresh buffer for every op; mimalloc keeps those allocations cheap where
// glibc's malloc hands large blocks back to the OS each time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // candle runs element-wise ops on a pool of threads that spin at a barrier after every op.
    // On this tool's problem sizes that costs more than it gains, and with a second job or any
    // other process on the machine the spinning threads starve the real work (a transformer
    // range test measured 2.8 s with one such thread, 14.5 s with two). Matrix products keep
    // their own threads (RAYON_NUM_THREADS). Set CANDLE_NUM_THREADS to override.
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // Still single-threaded here: nothing else can be reading the environment.
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    lrtune::cli::main()
}
