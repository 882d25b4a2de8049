//! GEMM rate on the CPU backend for the shapes of a SmolLM2-135M LoRA step (batch 2 × 512):
//! the best of several runs, in GFLOP/s of the process's CPU time (so that other processes'
//! load counts less than in wall time), and wall time, on the current rayon pool (set
//! RAYON_NUM_THREADS).
//!
//! usage: RAYON_NUM_THREADS=1 cargo run --release -p kernels --example gemm_shapes

use kernels::cpu::{gemm_f32, profile::cpu_seconds};
use std::time::Instant;

fn main() {
    let n = 1024;
    // (label, m, n, k, trans_a, trans_b, beta) as `trainer/src/model/linear.rs` calls them
    let shapes: &[(&str, usize, usize, usize, bool, bool, f32)] = &[
        ("frozen fwd x·Wᵀ 576→1536", n, 1536, 576, false, true, 1.0),
        ("frozen bwd dy·W 1536→576", n, 576, 1536, false, false, 1.0),
        ("frozen fwd 576→576", n, 576, 576, false, true, 1.0),
        ("lora t = x·Aᵀ (in 576)", n, 16, 576, false, true, 0.0),
        ("lora t = x·Aᵀ (in 1536)", n, 16, 1536, false, true, 0.0),
        ("lora y = t·Bᵀ (out 576)", n, 576, 16, false, true, 0.0),
        ("lora y = t·Bᵀ (out 1536)", n, 1536, 16, false, true, 1.0),
        ("lora dB = dyᵀ·t (out 576)", 576, 16, n, true, false, 1.0),
        ("lora dB = dyᵀ·t (out 1536)", 1536, 16, n, true, false, 1.0),
        ("lora u = dy·B (out 576)", n, 16, 576, false, false, 0.0),
        ("lora u = dy·B (out 1536)", n, 16, 1536, false, false, 0.0),
        ("lora dA = uᵀ·x (in 576)", 16, 576, n, true, false, 1.0),
        ("lora dA = uᵀ·x (in 1536)", 16, 1536, n, true, false, 1.0),
        ("lora dx = u·A (in 576)", n, 576, 16, false, false, 1.0),
        ("lm head logits chunk", 85, 49152, 576, false, true, 0.0),
        ("lm head dx chunk", 85, 576, 49152, false, false, 0.0),
    ];
    for &(label, m, nn, k, ta, tb, beta) in shapes {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 17) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * nn).map(|i| (i % 13) as f32 * 0.01).collect();
        let mut c = vec![0.0f32; m * nn];
        let flops = 2.0 * (m * nn * k) as f64;
        let reps = ((2e9 / flops) as usize).clamp(3, 200);
        let (mut best_cpu, mut best_wall) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            let (c0, t0) = (cpu_seconds(), Instant::now());
            for _ in 0..reps {
                gemm_f32(m, nn, k, 1.0, &a, ta, &b, tb, beta, &mut c);
            }
            best_wall = best_wall.min(t0.elapsed().as_secs_f64() / reps as f64);
            best_cpu = best_cpu.min((cpu_seconds() - c0) / reps as f64);
        }
        println!(
            "{label:30} {m:5}×{nn:5}×{k:5}  cpu {:7.3} ms {:6.1} GFLOP/s  wall {:7.3} ms",
            best_cpu * 1e3,
            flops / best_cpu / 1e9,
            best_wall * 1e3
        );
    }
}
