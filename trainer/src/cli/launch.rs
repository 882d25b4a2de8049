//! `fuselora launch [--nproc-per-node N] [--nnodes M --node-rank R --master-addr A --master-port P]
//! -- train ...`: starts this node's ranks of `fuselora <command>` through the launcher crate.

use anyhow::{Context, Result};
use std::process::ExitCode;

pub fn run(args: launcher::LaunchArgs) -> Result<ExitCode> {
    let program = std::env::current_exe()
        .context("cannot find the path of the running fuselora binary to start the ranks")?;
    let code = launcher::run(args, program)?;
    Ok(ExitCode::from(u8::try_from(code).unwrap_or(1)))
}
