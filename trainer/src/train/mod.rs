//! Training: the run config, learning-rate schedules, the loop and its checkpoints, and the
//! data-parallel pieces (the rank's communicator, the gradient all-reduce, the example trace).

pub mod checkpoint;
pub mod config;
pub mod distributed;
pub mod dpo;
pub mod dpo_reference;
pub mod dpo_run;
pub mod dump;
pub mod grad_reduce;
pub mod init;
pub mod metrics;
pub mod nonfinite;
pub mod plot;
pub mod resume_check;
pub mod run;
pub mod schedule;
pub mod stream;
pub mod trace;
