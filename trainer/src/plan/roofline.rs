//! Step time from a metered op log: a roofline per op (Williams et al. 2009) on a small table of
//! GPU kinds. An op takes `max(FLOPs / achieved FLOP/s, bytes / achieved bandwidth)` plus a fixed
//! cost per kernel. The achieved fractions of the data-sheet peaks are fuselora's own on the H200
//! (docs/benchmarks.md): the flash-attention kernels ~114 of 989 TFLOP/s, elementwise kernels ~75 %
//! of the memory bandwidth; the GEMM fraction (0.75) and the per-kernel cost (7.6 µs: launch gaps
//! and tails) are the two values fitted to the four `bench` presets measured with checkpointing
//! (docs/benchmarks.md, "The standard set"), which they then match within 2 %.

use super::meter::{Op, OpKind};
use kernels::DType;

/// A GPU kind `plan` knows.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum GpuKind {
    H200,
    H100,
    #[value(name = "a100-80g")]
    A100_80g,
    #[value(name = "a100-40g")]
    A100_40g,
    L40s,
    L4,
    T4,
}

/// Data-sheet numbers of a GPU kind (dense, no sparsity).
#[derive(Clone, Copy, Debug)]
pub struct GpuSpec {
    pub name: &'static str,
    /// Device memory as `nvidia-smi` reports it.
    pub memory_mib: u64,
    /// Peak bf16 tensor-core TFLOP/s; `None` where the GPU has no bf16 (T4: use f16).
    pub bf16_tflops: Option<f64>,
    pub f16_tflops: f64,
    pub bandwidth_gb_s: f64,
    /// Pinned host ↔ device copies, one direction (PCIe): 55 GB/s measured on the H200 (PCIe 5),
    /// the nominal x16 rate less the same ~13% elsewhere.
    pub host_link_gb_s: f64,
    /// What the device's name contains (`NVIDIA H200`), to recognise it when `train` starts.
    pub device_name: &'static str,
}

impl GpuKind {
    pub const ALL: [GpuKind; 7] = [
        GpuKind::H200,
        GpuKind::H100,
        GpuKind::A100_80g,
        GpuKind::A100_40g,
        GpuKind::L40s,
        GpuKind::L4,
        GpuKind::T4,
    ];

    pub fn spec(self) -> GpuSpec {
        let g = |name, memory_mib, bf16_tflops, f16_tflops, bandwidth_gb_s, device_name| {
            let host_link_gb_s = match name {
                "H200 141 GB" | "H100 80 GB SXM" => 55.0,
                "T4 16 GB" => 13.8,
                _ => 27.5,
            };
            GpuSpec {
                name,
                memory_mib,
                bf16_tflops,
                f16_tflops,
                bandwidth_gb_s,
                host_link_gb_s,
                device_name,
            }
        };
        match self {
            GpuKind::H200 => g("H200 141 GB", 143_771, Some(989.0), 989.0, 4800.0, "H200"),
            GpuKind::H100 => g("H100 80 GB SXM", 81_559, Some(989.0), 989.0, 3350.0, "H100"),
            GpuKind::A100_80g => g(
                "A100 80 GB",
                81_920,
                Some(312.0),
                312.0,
                2039.0,
                "A100-SXM4-80GB",
            ),
            GpuKind::A100_40g => g(
                "A100 40 GB",
                40_960,
                Some(312.0),
                312.0,
                1555.0,
                "A100-SXM4-40GB",
            ),
            GpuKind::L40s => g("L40S 48 GB", 46_068, Some(362.0), 362.0, 864.0, "L40S"),
            GpuKind::L4 => g("L4 24 GB", 23_034, Some(121.0), 121.0, 300.0, "L4"),
            GpuKind::T4 => g("T4 16 GB", 15_360, None, 65.0, 320.0, "T4"),
        }
    }

    /// The kind whose device name appears in `describe` (e.g. `cuda:0 NVIDIA H200 (bf16)`).
    pub fn recognise(describe: &str) -> Option<GpuKind> {
        GpuKind::ALL
            .into_iter()
            .find(|k| describe.contains(k.spec().device_name))
    }
}

/// Fraction of the peak FLOP/s cuBLAS GEMMs reach in a training step (fitted, see above).
const GEMM_EFFICIENCY: f64 = 0.75;
/// Fraction of the peak the flash-attention kernels reach, forward and backward together as a
/// checkpointed step runs them (the forward twice per backward). Hopper's wgmma kernels (H200,
/// 2026-12-04, Mistral-7B min-memory step: forward 241, backward 224 of 989 TFLOP/s, 229 together);
/// the mma.sync kernels elsewhere (H200 with `FUSELORA_ATTENTION=mma-sync`: forward 179, backward
/// 124 in the kernel check's benchmark, ~0.14 together).
fn attention_efficiency(gpu: GpuKind) -> f64 {
    match gpu {
        GpuKind::H200 | GpuKind::H100 => 0.23,
        _ => 0.14,
    }
}
/// Fraction of the data-sheet bandwidth elementwise kernels and skinny GEMMs reach.
const BANDWIDTH_EFFICIENCY: f64 = 0.75;
/// Seconds every kernel costs however small (launch gap and tail; fitted, see above).
const LAUNCH_S: f64 = 7.6e-6;

/// Where a step's predicted time goes, in seconds.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct StepTime {
    pub gemm: f64,
    pub attention: f64,
    pub memory: f64,
    pub launches: f64,
    /// Host ↔ device copies nothing overlaps (AdamW's state streamed from the host).
    pub host_copies: f64,
}

impl StepTime {
    pub fn total(&self) -> f64 {
        self.gemm + self.attention + self.memory + self.launches + self.host_copies
    }
}

/// The predicted time of the ops on `gpu` in `dtype`; `None` when the GPU cannot run `dtype`'s
/// tensor-core math (bf16 on a T4).
pub fn step_time(ops: &[Op], gpu: GpuKind, dtype: DType) -> Option<StepTime> {
    let spec = gpu.spec();
    let peak = match dtype {
        DType::BF16 => spec.bf16_tflops?,
        DType::F16 => spec.f16_tflops,
        // f32 runs on CUDA cores without tensor cores: about a sixteenth of the 16-bit rate.
        DType::F32 => spec.f16_tflops / 16.0,
    } * 1e12;
    let bandwidth = spec.bandwidth_gb_s * 1e9 * BANDWIDTH_EFFICIENCY;
    let mut t = StepTime::default();
    for op in ops {
        let by_memory = op.bytes / bandwidth;
        match op.kind {
            OpKind::Gemm => t.gemm += (op.flops / (peak * GEMM_EFFICIENCY)).max(by_memory),
            OpKind::Attention => {
                t.attention += (op.flops / (peak * attention_efficiency(gpu))).max(by_memory)
            }
            OpKind::Memory => t.memory += by_memory,
        }
        t.launches += LAUNCH_S;
    }
    Some(t)
}
