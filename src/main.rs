use std::process::ExitCode;

// candle allocates a fresh buffer for every op; mimalloc keeps those allocations cheap where
// glibc's malloc hands large blocks back to the OS each time.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    lrtune::cli::main()
}
