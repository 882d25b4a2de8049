//! Training: the run config, learning-rate schedules, the loop and its checkpoints.

pub mod config;
pub mod schedule;
pub mod checkpoint;
pub mod init;
pub mod stream;
