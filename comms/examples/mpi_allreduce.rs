//! Checks the MPI engine end to end: run as `mpirun -np 3 mpi_allreduce`. Each rank detects its
//! place from mpirun's environment, connects through the factory, and checks
//! - sum: rank r holds x_i = (r+1)(i+1)/2, so Σ_r x_i = W(W+1)/2 · (i+1)/2;
//! - average of f32 and of bf16: the sum divided by W;
//! - broadcast from the last rank, and a barrier.
//!
//! Prints `rank R of W: all-reduce ok` and exits 0, or names the first wrong value and exits 1.

use comms::{connect, detect, Communicator, Placement, ReduceOp};
use half::bf16;
use std::process::ExitCode;
use std::time::Duration;

fn main() -> ExitCode {
    match check() {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(why) => {
            eprintln!("mpi_allreduce: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> Result<String, String> {
    let info = detect().map_err(|e| e.to_string())?;
    let comm =
        connect(&info, Placement::Host, Duration::from_secs(30)).map_err(|e| e.to_string())?;
    let (rank, world) = (comm.rank(), comm.world_size());
    let triangle = (world * (world + 1) / 2) as f32;
    let mine = |i: usize| (rank + 1) as f32 * (i + 1) as f32 / 2.0;

    let mut sums: Vec<f32> = (0..1000).map(mine).collect();
    comm.all_reduce_f32(&mut sums, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    expect("f32 sum", &sums, |i| triangle * (i + 1) as f32 / 2.0)?;

    let mut means: Vec<f32> = (0..1000).map(mine).collect();
    comm.all_reduce_f32(&mut means, ReduceOp::Average)
        .map_err(|e| e.to_string())?;
    expect("f32 average", &means, |i| {
        triangle * (i + 1) as f32 / 2.0 / world as f32
    })?;

    let mut halves: Vec<bf16> = (0..64).map(|i| bf16::from_f32(mine(i))).collect();
    comm.all_reduce_bf16(&mut halves, ReduceOp::Average)
        .map_err(|e| e.to_string())?;
    let widened: Vec<f32> = halves.iter().map(|x| x.to_f32()).collect();
    expect("bf16 average", &widened, |i| {
        bf16::from_f32(triangle * (i + 1) as f32 / 2.0 / world as f32).to_f32()
    })?;

    let root = world - 1;
    let mut bytes = if rank == root {
        *b"from the last rank"
    } else {
        [0u8; 18]
    };
    comm.broadcast(&mut bytes, root)
        .map_err(|e| e.to_string())?;
    if &bytes != b"from the last rank" {
        return Err(format!("rank {rank}: broadcast gave {bytes:?}"));
    }
    comm.barrier().map_err(|e| e.to_string())?;
    Ok(format!(
        "rank {rank} of {world}: all-reduce ok ({})",
        comm.describe()
    ))
}

fn expect(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> Result<(), String> {
    match got.iter().enumerate().find(|&(i, &x)| x != want(i)) {
        Some((i, x)) => Err(format!("{what}[{i}] = {x}, want {}", want(i))),
        None => Ok(()),
    }
}
