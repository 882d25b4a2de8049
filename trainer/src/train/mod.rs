//! Training: the run config, the one loop ([`run`]) and the methods that plug into it
//! ([`method::Method`]: [`sft`], [`dpo`], [`orpo`]), learning-rate schedules, checkpoints, and the
//! data-parallel pieces (the rank's communicator, the gradient all-reduce, the example trace).
//!
//! Floors, each importing only from those above it in this list: schedule, stream, trace, dump,
//! metrics, plot, init, grad_reduce → distributed → config → checkpoint → dataset → method →
//! pairs → dpo_reference → sft, dpo, orpo → run.

pub mod checkpoint;
pub mod config;
pub mod dataset;
pub mod distributed;
pub mod dpo;
pub mod dpo_reference;
pub mod dump;
pub mod grad_reduce;
pub mod init;
pub mod method;
pub mod metrics;
pub mod nonfinite;
pub mod orpo;
pub mod pairs;
pub mod plot;
pub mod resume_check;
pub mod run;
pub mod schedule;
pub mod sft;
pub mod stream;
pub mod trace;
