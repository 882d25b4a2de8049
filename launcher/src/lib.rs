//! `fuselora launch`: starts one training rank per GPU on this node, like torchrun.
//!
//! - [`LaunchArgs`]: the flags (`--nproc-per-node`, `--nnodes`, `--node-rank`, `--master-addr`,
//!   `--master-port`, `--job-token`, `--grace-seconds`, then `-- <command>`).
//! - [`run`]: spawns the ranks with `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//!   `MASTER_ADDR`, `MASTER_PORT` and `FUSELORA_JOB_TOKEN` (leaving `CUDA_VISIBLE_DEVICES` as it
//!   is: each rank binds the GPU of its local rank), prefixes their output with `[rank r] `,
//!   forwards SIGINT/SIGTERM, and stops all ranks when one fails, returning its exit code.
//! - [`count_visible_gpus`]: the default `--nproc-per-node`.

mod args;
mod error;
mod gpus;
mod output;
mod supervise;

pub use args::LaunchArgs;
pub use error::LaunchError;
pub use gpus::{count_visible_gpus, default_nproc_per_node};

use std::path::PathBuf;

/// Runs `program <args.command>` as every rank of this node and supervises them; returns the
/// code the launcher should exit with (0, or the first failed rank's code).
///
/// `program` is the fuselora binary itself (`std::env::current_exe()`). Without `--job-token`
/// the token comes from `FUSELORA_JOB_TOKEN`, or is random on a single node.
pub fn run(mut args: LaunchArgs, program: PathBuf) -> Result<i32, LaunchError> {
    if args.job_token.is_none() {
        args.job_token = std::env::var("FUSELORA_JOB_TOKEN")
            .ok()
            .filter(|token| !token.is_empty());
    }
    let visible_gpus = match args.nproc_per_node {
        Some(_) => 0,
        None => default_nproc_per_node(),
    };
    let layout = args.layout(visible_gpus)?;
    supervise::run_ranks(&layout, &program, &args.command, output::Sinks::process())
}
