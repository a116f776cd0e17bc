//! The service end to end: a real server on port 0, a real SQLite file per test, no mocks.
//! Failure injection (panics, jobs that only stop when canceled) goes through the worker's
//! `JobRunner`, the same seam the engine is plugged into.

mod admission;
mod crash;
mod datasets;
mod drain;
mod faults;
mod fleet;
mod helpers;
mod jobs;
mod metrics;
mod outage;
mod paging;
mod priority;
mod race;
mod service;
mod slow_clients;
#[path = "../support/mod.rs"]
mod support;
mod uploads;
mod weights;
