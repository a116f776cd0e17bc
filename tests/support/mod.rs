//! The one harness every test binary uses (tests/api, tests/cli, tests/dashboard, tests/engine;
//! dev/tests takes `run.rs`): real `lrtune` processes, the CLI runner, the event-stream reader,
//! the shared job specs, and the services some tests need.
//!
//! A test that needs a service (PostgreSQL, Chromium, root for tmpfs and `chattr`) always runs
//! and fails, saying what is missing and how to provide it, when the service is not there: it
//! never passes without running. Leaving such tests out is a visible choice: they sit in modules
//! named for what they need (`on_postgres`, `in_chromium`, `as_root`), so that
//! `cargo test -- --skip on_postgres` runs the rest and the summary counts them as filtered out.

// Each binary uses the part it needs.
#![allow(dead_code)]

pub mod browser;
pub mod fixtures;
pub mod process;
pub mod run;
#[path = "../../src/store/scratch.rs"]
pub mod scratch;
pub mod sse;
