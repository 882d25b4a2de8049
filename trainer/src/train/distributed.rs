//! This rank's view of a data-parallel run: who it is, the communicator, and the few collectives
//! the training loop needs — the gradient sum of each optimizer step and exact global counts.
//!
//! A failing rank must stop the job rather than leave the others waiting in a collective: when a
//! [`Distributed`] is dropped without [`Distributed::finish`] (an error unwound the loop), MPI is
//! not finalised, so the process exits at once and mpirun (or `fuselora launch`) tears the job down.

use super::grad_reduce::GradReducer;
use crate::lora::LoraParams;
use crate::model::LayerHooks;
use anyhow::{bail, Context, Result};
use comms::{Comms, Communicator, RankInfo, ReduceOp, SingleProcess};
use std::cell::Cell;
use std::mem::ManuallyDrop;

/// Test hook: `FUSELORA_FAIL_AT_STEP=S` makes rank `FUSELORA_FAIL_RANK` (default 0) fail at step S.
pub const FAIL_AT_STEP_ENV: &str = "FUSELORA_FAIL_AT_STEP";
/// The rank [`FAIL_AT_STEP_ENV`] applies to.
pub const FAIL_RANK_ENV: &str = "FUSELORA_FAIL_RANK";

/// The rank, the world, and the communicator between them.
pub struct Distributed {
    pub info: RankInfo,
    comms: ManuallyDrop<Comms>,
    fail_at_step: Option<u64>,
    /// Layers per gradient bucket during backward ([`BUCKET_LAYERS_ENV`]); 0 = one bucket after backward.
    bucket_layers: usize,
    /// The highest layer whose gradients are final but not yet being summed.
    pending_top: Cell<Option<usize>>,
}

/// Tuning knob: how many layers' LoRA gradients go into one all-reduce during backward
/// (default [`DEFAULT_BUCKET_LAYERS`]; 0 sums everything once backward has finished).
pub const BUCKET_LAYERS_ENV: &str = "FUSELORA_REDUCE_BUCKET_LAYERS";
/// One bucket after backward: on 2×H200 at 7B, NCCL kernels running beside backward slowed it more
/// than they saved (docs/benchmarks.md: 0.997 efficiency with 0, 0.981–0.996 with 1–16 layers).
pub const DEFAULT_BUCKET_LAYERS: usize = 0;

impl Distributed {
    /// One process: every collective is the identity.
    pub fn single() -> Distributed {
        Self::new(RankInfo::single(), Comms::Single(SingleProcess))
    }

    /// Joins the job that started this process through the communicator `be` exchanges
    /// gradients with (host memory for CPU ranks, NCCL on its own stream for GPU ranks).
    pub fn join<B: GradReducer>(be: &B) -> Result<Distributed> {
        let (info, comms) = be.join_ranks()?;
        Ok(Self::new(info, comms))
    }

    /// Wraps a communicator the caller connected.
    pub fn new(info: RankInfo, comms: Comms) -> Distributed {
        let fail_at_step = std::env::var(FAIL_AT_STEP_ENV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .filter(|_| {
                std::env::var(FAIL_RANK_ENV)
                    .ok()
                    .and_then(|r| r.trim().parse::<usize>().ok())
                    .unwrap_or(0)
                    == info.rank
            });
        let bucket_layers = std::env::var(BUCKET_LAYERS_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_BUCKET_LAYERS);
        Distributed {
            info,
            comms: ManuallyDrop::new(comms),
            fail_at_step,
            bucket_layers,
            pending_top: Cell::new(None),
        }
    }

    pub fn rank(&self) -> usize {
        self.info.rank
    }

    pub fn world_size(&self) -> usize {
        self.info.world_size
    }

    /// Rank 0 alone prints, logs and writes files.
    pub fn is_main(&self) -> bool {
        self.info.rank == 0
    }

    /// The communicator, e.g. `mpi (3 ranks)`.
    pub fn describe(&self) -> String {
        self.comms.describe()
    }

    /// Marks layer `layer`'s LoRA gradients final (backward visits layers from the last to the
    /// first) and starts summing a bucket of layers over the ranks once it is full — or at layer 0;
    /// [`Distributed::wait_for_sums`] completes every started sum.
    pub fn layer_done<B: GradReducer>(
        &self,
        be: &B,
        lora: &mut LoraParams<B>,
        layer: usize,
    ) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        let top = self.pending_top.get().unwrap_or(layer);
        let full = self.bucket_layers > 0 && top + 1 - layer >= self.bucket_layers;
        if !full && layer > 0 {
            self.pending_top.set(Some(top));
            return Ok(());
        }
        self.pending_top.set(None);
        let range = lora.layer_range(layer).start..lora.layer_range(top).end;
        be.start_sum_over_ranks(&mut lora.grads[range], &self.comms)
            .with_context(|| format!("all-reduce of the LoRA gradients of layers {layer}..={top}"))
    }

    /// Waits (on the device's queue, not the host) for every started gradient sum.
    pub fn wait_for_sums<B: GradReducer>(&self, be: &B) -> Result<()> {
        if self.world_size() == 1 {
            return Ok(());
        }
        be.wait_for_sums(&self.comms)
            .context("waiting for the LoRA gradient all-reduce")
    }

    /// The passes of one optimizer step: zeroes the LoRA gradients (those of layers still
    /// waiting for the previous step's deferred update are zeroed by it), runs `micro_step` on
    /// each micro-batch with the step's [`LayerHooks`] — `before_forward(layer, lora)` before
    /// each layer's forward (where that update reaches it), and the last micro-batch's layers
    /// summed over the ranks as its backward finishes them — and waits for the sums. Every rank has
    /// the same number of micro-batches, so the collectives line up. Returns each micro-batch's
    /// result.
    pub fn accumulate<B: GradReducer, T, R>(
        &self,
        be: &B,
        lora: &mut LoraParams<B>,
        micro: &[T],
        before_forward: &mut dyn FnMut(usize, &mut LoraParams<B>) -> Result<()>,
        mut micro_step: impl FnMut(&T, &mut LoraParams<B>, &mut dyn LayerHooks<B>) -> Result<R>,
    ) -> Result<Vec<R>> {
        lora.zero_grads(be)?;
        let mut results = Vec::with_capacity(micro.len());
        for (i, batch) in micro.iter().enumerate() {
            let mut hooks = StepHooks {
                dist: self,
                be,
                before_forward: &mut *before_forward,
                reduce: i + 1 == micro.len(),
            };
            results.push(micro_step(batch, lora, &mut hooks)?);
        }
        self.wait_for_sums(be)?;
        Ok(results)
    }

    /// Exact sums of whole numbers over the ranks. f32 collectives carry them as 16-bit limbs,
    /// whose sums stay exact (below 2^24) for up to 256 ranks.
    pub fn global_sum_u64(&self, values: &[u64]) -> Result<Vec<u64>> {
        if self.world_size() == 1 {
            return Ok(values.to_vec());
        }
        let mut limbs: Vec<f32> = values
            .iter()
            .flat_map(|&v| (0..4).map(move |k| ((v >> (16 * k)) & 0xFFFF) as f32))
            .collect();
        self.comms
            .all_reduce_f32(&mut limbs, ReduceOp::Sum)
            .context("all-reduce of the step's token counts")?;
        Ok(limbs
            .chunks(4)
            .map(|l| (0..4).map(|k| (l[k] as u64) << (16 * k)).sum())
            .collect())
    }

    /// Sums of reals over the ranks, each carried as an f32 pair `hi + lo` (about 48 bits).
    pub fn global_sum_f64(&self, values: &[f64]) -> Result<Vec<f64>> {
        if self.world_size() == 1 {
            return Ok(values.to_vec());
        }
        let mut parts: Vec<f32> = values
            .iter()
            .flat_map(|&v| {
                let hi = v as f32;
                [hi, (v - hi as f64) as f32]
            })
            .collect();
        self.comms
            .all_reduce_f32(&mut parts, ReduceOp::Sum)
            .context("all-reduce of the step's loss")?;
        Ok(parts.chunks(2).map(|p| p[0] as f64 + p[1] as f64).collect())
    }

    /// Fails when the test hook names this rank and `step`.
    pub fn fail_if_asked(&self, step: u64) -> Result<()> {
        if self.fail_at_step == Some(step) {
            bail!(
                "rank {} stops at step {step} because {FAIL_AT_STEP_ENV}={step}",
                self.rank()
            );
        }
        Ok(())
    }

    /// Waits for every rank, then closes the communicator (MPI_Finalize): the end of a good run.
    pub fn finish(mut self) -> Result<()> {
        self.comms
            .barrier()
            .context("waiting for the other ranks to finish")?;
        // SAFETY: `self` is consumed and its `comms` is never touched again.
        unsafe { ManuallyDrop::drop(&mut self.comms) };
        Ok(())
    }
}

/// One micro-batch's [`LayerHooks`]: the caller's `before_forward`, and with `reduce` (the
/// step's last micro-batch) each layer's gradients summed over the ranks once final.
struct StepHooks<'a, B: GradReducer> {
    dist: &'a Distributed,
    be: &'a B,
    before_forward: &'a mut dyn FnMut(usize, &mut LoraParams<B>) -> Result<()>,
    reduce: bool,
}

impl<B: GradReducer> LayerHooks<B> for StepHooks<'_, B> {
    fn before_forward(&mut self, layer: usize, lora: &mut LoraParams<B>) -> Result<()> {
        (self.before_forward)(layer, lora)
    }

    fn after_backward(&mut self, layer: usize, lora: &mut LoraParams<B>) -> Result<()> {
        if self.reduce {
            self.dist.layer_done(self.be, lora, layer)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_process_sums_are_its_own_values() {
        let d = Distributed::single();
        assert!(d.is_main());
        assert_eq!(
            d.global_sum_u64(&[0, 70_000, u64::MAX >> 1]).unwrap(),
            vec![0, 70_000, u64::MAX >> 1]
        );
        assert_eq!(d.global_sum_f64(&[1.0 / 3.0]).unwrap(), vec![1.0 / 3.0]);
        d.finish().unwrap();
    }
}
