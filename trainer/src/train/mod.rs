//! Training: the run config, learning-rate schedules, the loop and its checkpoints.

pub mod checkpoint;
pub mod config;
pub mod dpo;
pub mod dpo_reference;
pub mod dpo_run;
pub mod init;
pub mod metrics;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod stream;
