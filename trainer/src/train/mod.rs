//! Training: the run config, learning-rate schedules, the loop and its checkpoints.

pub mod checkpoint;
pub mod config;
pub mod init;
pub mod schedule;
pub mod stream;
