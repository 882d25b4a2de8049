//! Where a CPU training step spends its time: `fuselora bench`'s step on the CPU backend with its
//! op profile on (`kernels::cpu::profile`), printed as the per-op table of docs/benchmarks.md.
//! One step is run first and not counted. Wall and CPU time (all threads) per op: on a machine
//! other programs share, compare the CPU time, which their load stretches much less.
//!
//! usage: cargo run --release -p trainer --example cpu_profile [-- PRESET BATCH SEQ STEPS]
//! (defaults: smollm2-135m 2 512 3; checkpointing off, as `fuselora bench --no-checkpointing`)

use anyhow::{Context, Result};
use kernels::cpu::{profile, CpuBackend};
use kernels::Backend;
use trainer::bench::{self, BenchSpec};
use trainer::model::CheckpointPolicy;
use trainer::residence::Residence;
use trainer::train::distributed::Distributed;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).map_or(default, |s| s.as_str()).to_string();
    let number = |i: usize, default: &str| -> Result<usize> {
        arg(i, default)
            .parse()
            .with_context(|| format!("argument {} must be a whole number", i + 1))
    };
    let mut spec = BenchSpec {
        preset: arg(0, "smollm2-135m"),
        batch: number(1, "2")?,
        seq: number(2, "512")?,
        grad_accum: 1,
        checkpointing: CheckpointPolicy::OFF,
        warmup: 0,
        steps: 1,
        seed: 0,
        peak_tflops: None,
        profile: false,
        quantize: None,
        optimizer_state: Residence::Device,
        embedding: Residence::Device,
    };
    let steps = number(3, "3")?;
    let be = CpuBackend::new();
    profile::enable();
    bench::run(&be, &spec, &Distributed::single())?;
    profile::take();
    spec.steps = steps;
    let cpu0 = profile::cpu_seconds();
    let result = bench::run(&be, &spec, &Distributed::single())?;
    let ops = profile::take();
    // includes building the model and batches, once per run
    let step_cpu = (profile::cpu_seconds() - cpu0) / steps as f64;
    let per_step = |x: f64| x / steps as f64;
    let step_s = result.step_times_s.iter().sum::<f64>() / steps as f64;
    println!(
        "{} batch {} × {} on {}: {:.3} s per step (mean of {steps}), {:.3} CPU s, {:.0} tokens/s",
        spec.preset,
        spec.batch,
        spec.seq,
        be.describe(),
        step_s,
        step_cpu,
        result.tokens_per_s
    );
    println!(
        "| op | calls/step | ms/step | CPU ms/step | share of CPU | GFLOP/step | GFLOP/s | GFLOP/CPU-s |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- |");
    let (mut counted, mut counted_cpu) = (0.0, 0.0);
    for op in &ops {
        let (s, cpu) = (per_step(op.seconds), per_step(op.cpu_seconds));
        counted += s;
        counted_cpu += cpu;
        let (gflop, rate, cpu_rate) = if op.flops > 0.0 {
            let g = per_step(op.flops) / 1e9;
            let f = |x: f64| format!("{x:.1}");
            (f(g), f(g / s), f(g / cpu))
        } else {
            ("—".into(), "—".into(), "—".into())
        };
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} % | {gflop} | {rate} | {cpu_rate} |",
            op.op,
            op.calls / steps as u64,
            s * 1e3,
            cpu * 1e3,
            100.0 * cpu / step_cpu
        );
    }
    let (rest, rest_cpu) = (step_s - counted, step_cpu - counted_cpu);
    println!(
        "| everything else (copies, adds, clipping, …) | | {:.1} | {:.1} | {:.1} % | | | |",
        rest * 1e3,
        rest_cpu * 1e3,
        100.0 * rest_cpu / step_cpu
    );
    let flops: f64 = ops.iter().map(|o| per_step(o.flops)).sum();
    println!(
        "| **step** | | {:.1} | {:.1} | 100 % | {:.1} | {:.1} | {:.1} |",
        step_s * 1e3,
        step_cpu * 1e3,
        flops / 1e9,
        flops / 1e9 / step_s,
        flops / 1e9 / step_cpu
    );
    Ok(())
}
