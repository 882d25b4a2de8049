//! Checks the NCCL engine end to end on GPUs: start one process per GPU with `fuselora launch`
//! (or by hand: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT, FUSELORA_JOB_TOKEN) or
//! under mpirun. Each rank binds the GPU of its local rank, shares the NCCL id through
//! `connect`, and checks with rank r holding x_i = (r+1)(i+1)/2 on the device:
//! - f32 sum Σ_r x_i = W(W+1)/2 · (i+1)/2, and the bf16 average (rounded to bf16);
//! - the host-buffer path, broadcast from the last rank, and a barrier.
//!
//! Prints `rank R of W: nccl ok` and exits 0, or names the first wrong value and exits 1.

use comms::{connect, detect, Communicator, Placement, ReduceOp};
use cudarc::driver::CudaContext;
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
            eprintln!("nccl_allreduce: {why}");
            ExitCode::FAILURE
        }
    }
}

fn check() -> Result<String, String> {
    let info = detect().map_err(|e| e.to_string())?;
    let ctx =
        CudaContext::new(info.local_rank).map_err(|e| format!("GPU {}: {e}", info.local_rank))?;
    let stream = ctx.default_stream();
    let comms = connect(
        &info,
        Placement::Cuda(stream.clone()),
        Duration::from_secs(60),
    )
    .map_err(|e| e.to_string())?;
    let nccl = comms.nccl().ok_or("connect did not pick NCCL")?;
    let (rank, world) = (comms.rank(), comms.world_size());
    let triangle = (world * (world + 1) / 2) as f32;
    let mine = |i: usize| (rank + 1) as f32 * (i + 1) as f32 / 2.0;
    let cuda = |e: cudarc::driver::DriverError| e.to_string();

    let host: Vec<f32> = (0..4096).map(mine).collect();
    let mut device = stream.clone_htod(&host).map_err(cuda)?;
    nccl.all_reduce_device(&mut device, ReduceOp::Sum)
        .map_err(|e| e.to_string())?;
    let sums = stream.clone_dtoh(&device).map_err(cuda)?;
    expect("device f32 sum", &sums, |i| triangle * (i + 1) as f32 / 2.0)?;

    let halves: Vec<bf16> = (0..64).map(|i| bf16::from_f32(mine(i))).collect();
    let mut device = stream.clone_htod(&halves).map_err(cuda)?;
    nccl.all_reduce_device(&mut device, ReduceOp::Average)
        .map_err(|e| e.to_string())?;
    let means: Vec<f32> = stream
        .clone_dtoh(&device)
        .map_err(cuda)?
        .iter()
        .map(|x| x.to_f32())
        .collect();
    expect("device bf16 average", &means, |i| {
        bf16::from_f32(triangle * (i + 1) as f32 / 2.0 / world as f32).to_f32()
    })?;

    let mut loss = [mine(0)];
    comms
        .all_reduce_f32(&mut loss, ReduceOp::Average)
        .map_err(|e| e.to_string())?;
    expect("host f32 average", &loss, |_| triangle / 2.0 / world as f32)?;

    let root = world - 1;
    let mut bytes = if rank == root {
        *b"from the last rank"
    } else {
        [0u8; 18]
    };
    comms
        .broadcast(&mut bytes, root)
        .map_err(|e| e.to_string())?;
    if &bytes != b"from the last rank" {
        return Err(format!("rank {rank}: broadcast gave {bytes:?}"));
    }
    comms.barrier().map_err(|e| e.to_string())?;
    Ok(format!(
        "rank {rank} of {world}: nccl ok ({})",
        comms.describe()
    ))
}

fn expect(what: &str, got: &[f32], want: impl Fn(usize) -> f32) -> Result<(), String> {
    match got.iter().enumerate().find(|&(i, &x)| x != want(i)) {
        Some((i, x)) => Err(format!("{what}[{i}] = {x}, want {}", want(i))),
        None => Ok(()),
    }
}
