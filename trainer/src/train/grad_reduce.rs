//! Summing the LoRA gradients of all ranks, on whichever device the backend keeps them.
//!
//! Data parallel step: every rank r holds `g_r = Σ_{its micro-batches} w · ∇(Σ −log p)` with the
//! same global weight `w = 1 / (loss tokens of the step over all ranks)`, so the step's gradient
//! is `g = Σ_r g_r` — one all-reduce (sum) per optimizer step, after the last micro-batch.
//!
//! - CPU tensors are host `Vec<f32>`: gathered into buckets of up to [`BUCKET_VALUES`] values
//!   (one MPI call per bucket instead of one per tensor), reduced, and copied back.
//! - CUDA tensors (feature `cuda`): NCCL all-reduces f32 gradients in place on a stream of its
//!   own, a bucket of layers' tensors in one NCCL group once their backward is queued (by default
//!   one bucket, after the whole backward: see `distributed::DEFAULT_BUCKET_LAYERS`).

use anyhow::{Context, Result};
use comms::{Comms, Communicator, Placement, RankInfo, ReduceOp};
use kernels::cpu::CpuBackend;
use kernels::Backend;
use std::time::Duration;

/// How long ranks wait for each other to join.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Values per host bucket: 4 Mi f32 = 16 MiB, near torch DDP's 25 MB default.
pub const BUCKET_VALUES: usize = 4 << 20;

/// A backend whose gradient tensors can be summed over ranks.
pub trait GradReducer: Backend {
    /// Joins the job that started this process with a communicator that reaches this backend's
    /// tensors (host memory for the CPU, the device stream for CUDA): this rank's place and the
    /// communicator (`distributed::Distributed::join` wraps them).
    fn join_ranks(&self) -> Result<(RankInfo, Comms)>;
    /// Replaces every tensor of `grads` by its sum over all ranks of `comms`.
    fn sum_over_ranks(&self, grads: &mut [Self::Tensor], comms: &Comms) -> Result<()> {
        self.start_sum_over_ranks(grads, comms)?;
        self.wait_for_sums(comms)
    }
    /// Starts summing `grads` over the ranks, ordered after the work queued so far; the result is
    /// there once [`GradReducer::wait_for_sums`] returns (where reductions run on their own
    /// stream, backward goes on meanwhile).
    fn start_sum_over_ranks(&self, grads: &mut [Self::Tensor], comms: &Comms) -> Result<()>;
    /// Orders everything queued after this call behind every started sum.
    fn wait_for_sums(&self, comms: &Comms) -> Result<()>;
}

impl GradReducer for CpuBackend {
    /// MPI under mpirun or srun (or one process alone), exchanging host memory.
    fn join_ranks(&self) -> Result<(RankInfo, Comms)> {
        let info = comms::detect().context("reading this rank's place in the job")?;
        let comms = comms::connect(&info, Placement::Host, JOIN_TIMEOUT)
            .with_context(|| format!("connecting rank {} of {}", info.rank, info.world_size))?;
        Ok((info, comms))
    }

    /// Host buckets through MPI, synchronously: the sum is complete when this returns.
    fn start_sum_over_ranks(&self, grads: &mut [Vec<f32>], comms: &Comms) -> Result<()> {
        let mut start = 0;
        while start < grads.len() {
            let mut end = start + 1;
            let mut values = grads[start].len();
            while end < grads.len() && values + grads[end].len() <= BUCKET_VALUES {
                values += grads[end].len();
                end += 1;
            }
            if end == start + 1 {
                comms.all_reduce_f32(&mut grads[start], ReduceOp::Sum)?;
            } else {
                let mut bucket: Vec<f32> = Vec::with_capacity(values);
                for g in &grads[start..end] {
                    bucket.extend_from_slice(g);
                }
                comms.all_reduce_f32(&mut bucket, ReduceOp::Sum)?;
                let mut at = 0;
                for g in &mut grads[start..end] {
                    let n = g.len();
                    g.copy_from_slice(&bucket[at..at + n]);
                    at += n;
                }
            }
            start = end;
        }
        Ok(())
    }

    fn wait_for_sums(&self, _comms: &Comms) -> Result<()> {
        Ok(())
    }
}

#[cfg(feature = "cuda")]
impl GradReducer for kernels::cuda::CudaBackend {
    fn join_ranks(&self) -> Result<(RankInfo, Comms)> {
        let info = comms::detect().context("reading this rank's place in the job")?;
        if info.world_size == 1 {
            return Ok((RankInfo::single(), Comms::Single(comms::SingleProcess)));
        }
        // NCCL gets a stream of its own, so that gradient sums overlap the rest of backward.
        let placement = Placement::Cuda(self.stream().fork()?);
        let comms = comms::connect(&info, placement, JOIN_TIMEOUT)
            .with_context(|| format!("connecting GPU rank {} of {}", info.rank, info.world_size))?;
        Ok((info, comms))
    }

    /// NCCL runs on its own stream (see `join_ranks`): it first waits for the work queued on the
    /// compute stream so far (these gradients are final), then reduces while backward continues.
    fn start_sum_over_ranks(
        &self,
        grads: &mut [kernels::cuda::CudaTensor],
        comms: &Comms,
    ) -> Result<()> {
        let Some(nccl) = comms.nccl() else {
            anyhow::bail!(
                "{} GPU ranks need NCCL to exchange gradients, but this run connected over {}",
                comms.world_size(),
                comms.describe()
            );
        };
        let mut slices = Vec::with_capacity(grads.len());
        for g in grads {
            let Some(slice) = g.slice_f32_mut() else {
                anyhow::bail!("LoRA gradients must be f32 tensors to be reduced over ranks");
            };
            slices.push(slice);
        }
        nccl.stream().join(self.stream())?;
        nccl.all_reduce_device_group(slices.iter_mut(), ReduceOp::Sum)?;
        Ok(())
    }

    fn wait_for_sums(&self, comms: &Comms) -> Result<()> {
        if let Some(nccl) = comms.nccl() {
            self.stream().join(&nccl.stream())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use comms::SingleProcess;

    #[test]
    fn one_rank_keeps_its_gradients_through_the_buckets() {
        let be = CpuBackend::new();
        let mut grads = vec![
            vec![1.0, -2.0],
            vec![0.5; BUCKET_VALUES - 1],
            vec![3.0; BUCKET_VALUES + 5],
            vec![7.0],
        ];
        let before = grads.clone();
        be.sum_over_ranks(&mut grads, &Comms::Single(SingleProcess))
            .unwrap();
        assert_eq!(grads, before);
    }
}
