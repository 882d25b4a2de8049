//! The optimizer step: clip all LoRA gradients together by their global L2 norm
//! (`torch.nn.utils.clip_grad_norm_`), then `torch.optim.AdamW` on every LoRA tensor.

use crate::lora::LoraParams;
use anyhow::Result;
use kernels::{AdamWParams, Backend, DType};

/// `clip_grad_norm_`'s coefficient: `min(1, max_norm / (norm + 1e-6))`, in f32 as torch computes it.
pub fn clip_coefficient(total_norm: f32, max_norm: f32) -> f32 {
    (max_norm / (total_norm + 1e-6)).min(1.0)
}

/// What one optimizer step saw.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f32,
    /// The factor the gradients were multiplied by (1 when no clipping happened).
    pub clip_coef: f32,
}

/// AdamW state (first and second moments, step count) for every LoRA tensor.
pub struct AdamW<B: Backend> {
    pub hp: AdamWParams,
    /// `None` disables clipping.
    pub max_grad_norm: Option<f32>,
    pub m: Vec<B::Tensor>,
    pub v: Vec<B::Tensor>,
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
}

impl<B: Backend> AdamW<B> {
    /// Fresh state (zero moments) for `lora`'s tensors.
    pub fn new(
        be: &B,
        lora: &LoraParams<B>,
        hp: AdamWParams,
        max_grad_norm: Option<f32>,
    ) -> Result<Self> {
        let m = lora
            .params
            .iter()
            .map(|p| be.zeros(be.len(p), DType::F32))
            .collect::<Result<Vec<_>, _>>()?;
        let v = lora
            .params
            .iter()
            .map(|p| be.zeros(be.len(p), DType::F32))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(AdamW {
            hp,
            max_grad_norm,
            m,
            v,
            step: 0,
        })
    }

    /// Clips and applies the accumulated gradients with learning rate `lr`, then refreshes the
    /// compute-dtype copies of the weights. Gradients are left as they were (the caller zeroes them).
    pub fn step(&mut self, be: &B, lora: &mut LoraParams<B>, lr: f64) -> Result<StepStats> {
        let grad_norm = be.sum_of_squares(&lora.grads)?.sqrt() as f32;
        let clip_coef = self
            .max_grad_norm
            .map_or(1.0, |max| clip_coefficient(grad_norm, max));
        self.step += 1;
        let hp = AdamWParams { lr, ..self.hp };
        be.adamw(
            &mut lora.params,
            &lora.grads,
            &mut self.m,
            &mut self.v,
            &hp,
            self.step,
            clip_coef,
        )?;
        lora.sync_compute(be)?;
        Ok(StepStats {
            grad_norm,
            clip_coef,
        })
    }
}
