//! lrtune finds the learning rate before you train: Leslie Smith's range test and short
//! OneCycle sweeps on candle models, as a library, a CLI and an HTTP service.

pub mod cli;
pub mod config;
pub mod engine;
pub mod http;
pub mod store;
pub mod telemetry;
pub mod worker;

#[cfg(test)]
mod import_cycles;
