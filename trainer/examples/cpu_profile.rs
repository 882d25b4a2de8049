//! Where a CPU training step spends its time: `fuselora bench`'s step on the CPU backend with its
//! op profile on (`kernels::cpu::profile`), printed as the per-op table of docs/benchmarks.md.
//! One step is run first and not counted.
//!
//! usage: cargo run --release -p trainer --example cpu_profile [-- PRESET BATCH SEQ STEPS]
//! (defaults: smollm2-135m 2 512 3; checkpointing off, as `fuselora bench --no-checkpointing`)

use anyhow::{Context, Result};
use kernels::cpu::{profile, CpuBackend};
use kernels::Backend;
use trainer::bench::{self, BenchSpec};
use trainer::model::Checkpointing;
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
        checkpointing: Checkpointing::Off,
        warmup: 0,
        steps: 1,
        seed: 0,
        peak_tflops: None,
        profile: false,
        quantize: None,
    };
    let steps = number(3, "3")?;
    let be = CpuBackend::new();
    profile::enable();
    bench::run(&be, &spec, &Distributed::single())?;
    profile::take();
    spec.steps = steps;
    let result = bench::run(&be, &spec, &Distributed::single())?;
    let ops = profile::take();
    let per_step = |x: f64| x / steps as f64;
    let step_s = result.step_times_s.iter().sum::<f64>() / steps as f64;
    println!(
        "{} batch {} × {} on {}: {:.3} s per step (mean of {steps}), {:.0} tokens/s",
        spec.preset,
        spec.batch,
        spec.seq,
        be.describe(),
        step_s,
        result.tokens_per_s
    );
    println!("| op | calls/step | ms/step | share | GFLOP/step | GFLOP/s |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let mut counted = 0.0;
    for op in &ops {
        let s = per_step(op.seconds);
        counted += s;
        let (gflop, rate) = if op.flops > 0.0 {
            let g = per_step(op.flops) / 1e9;
            (format!("{g:.1}"), format!("{:.1}", g / s))
        } else {
            ("—".into(), "—".into())
        };
        println!(
            "| {} | {} | {:.1} | {:.1} % | {gflop} | {rate} |",
            op.op,
            op.calls / steps as u64,
            s * 1e3,
            100.0 * s / step_s
        );
    }
    let rest = step_s - counted;
    println!(
        "| everything else (copies, adds, clipping, …) | | {:.1} | {:.1} % | | |",
        rest * 1e3,
        100.0 * rest / step_s
    );
    let flops: f64 = ops.iter().map(|o| per_step(o.flops)).sum();
    println!(
        "| **step** | | {:.1} | 100 % | {:.1} | {:.1} |",
        step_s * 1e3,
        flops / 1e9,
        flops / 1e9 / step_s
    );
    Ok(())
}
