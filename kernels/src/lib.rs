//! Fused training ops behind one small interface.
//!
//! - [`Backend`]: the ops a Llama/Mistral/Qwen decoder needs, each with an explicit forward and backward.
//! - [`cpu::CpuBackend`]: f32, written to be read; the reference every other backend is tested against.
//! - `cuda::CudaBackend` (feature `cuda`): bf16/fp16 compute with fp32 accumulation, fused kernels.
//! - [`nf4`]: bitsandbytes' NF4 4-bit format (QLoRA base weights): quantize, pack, dequantize.
//! - [`rope`]: rotary-embedding frequency tables for every supported scaling kind (host-side math).
//! - [`OpTime`]: per-op device times of a profiled region (`Backend::profile_start`/`profile_stop`).
//! - [`AttentionLayout`]: which keys each query may see (causal, padding, packed documents, window).
//! - [`InFlight`], [`ParkLane`]: when parked groups' device buffers go back to the pool.

mod backend;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
mod error;
mod in_flight;
mod layout;
mod lora_dy;
pub mod nf4;
mod profile;
pub mod rope;
mod widen;

pub use backend::{
    lm_head_chunk_rows, AdamWParams, AfterUpdate, Backend, CeGrad, DType, LoraPad, MatAt,
    Nf4Absmax, Placement, QkvGrads, Rotation, IGNORE_INDEX, LM_HEAD_CHUNK_ELEMENTS,
};
pub use error::KernelError;
pub use in_flight::{InFlight, ParkLane};
pub use layout::AttentionLayout;
pub use profile::{idle_name, is_idle, summarise as summarise_op_times, OpTime};
pub use widen::{is_finite_16bit, widen_16bit, widen_one};

/// Result of a kernel call.
pub type Result<T> = std::result::Result<T, KernelError>;

/// The workspace of the matrix-product algorithms the CUDA backend picks by timing
/// ([`Backend::tune`]; split-k partial sums), held from the first tune on; `fuselora plan`'s
/// meter books it too.
pub const GEMM_WORKSPACE_BYTES: usize = 32 << 20;

/// The CUDA backend's caching pool serves a tensor from a free buffer of its storage kind up to
/// this many times its length (the smallest that fits); `fuselora plan`'s meter books the same.
/// 2 lowered every preset's predicted peak (by 0.07-0.29 GiB) and raised none; 4 raised some.
pub const POOL_REUSE_SLACK: usize = 2;

/// Whether a free pool buffer of `capacity` elements may serve a tensor of `len` elements: it
/// holds it and wastes at most [`POOL_REUSE_SLACK`] − 1 times its length. One rule for the CUDA
/// pool and the plan's meter.
pub fn pool_buffer_fits(len: usize, capacity: usize) -> bool {
    len <= capacity && capacity <= POOL_REUSE_SLACK * len.max(1)
}
