//! The real `lrtune` binary as a CI hook and a client: `check`, `submit`, `analyze` and
//! `--plot`, locally and against a real `lrtune serve` started per test. Exit codes are
//! ripgrep's: 0 ok, 1 check failed, 2 error. Every wait is bounded.

mod analyze;
mod check;
mod helpers;
mod server;
#[path = "../support/mod.rs"]
mod support;
