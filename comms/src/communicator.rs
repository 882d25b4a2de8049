//! The `Communicator` trait: collectives over host buffers that every engine (single process,
//! MPI, NCCL) provides. The engines do the reducing; nothing here adds numbers itself.
//!
//! Data parallel training calls `all_reduce_f32(grads, ReduceOp::Average)` once per optimizer
//! step so every rank applies the same update: g ← (1/W) Σ_r g_r over the W ranks.

use crate::Result;
use half::bf16;

/// How an all-reduce combines the ranks' buffers element by element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    /// x ← Σ_r x_r
    Sum,
    /// x ← (1/W) Σ_r x_r, with W the world size.
    Average,
}

/// Collectives over host memory, called by every rank in the same order with same-length buffers.
pub trait Communicator {
    /// This process's rank, 0-based.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn world_size(&self) -> usize;
    /// A name for logs: `single process`, `mpi (3 ranks)`, `nccl (8 ranks)`.
    fn describe(&self) -> String;
    /// Combines `buf` over all ranks in place; every rank ends with the same values.
    fn all_reduce_f32(&self, buf: &mut [f32], op: ReduceOp) -> Result<()>;
    /// [`Communicator::all_reduce_f32`] on bf16 values.
    fn all_reduce_bf16(&self, buf: &mut [bf16], op: ReduceOp) -> Result<()>;
    /// Copies rank `root`'s `buf` into every other rank's `buf`.
    fn broadcast(&self, buf: &mut [u8], root: usize) -> Result<()>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
}
