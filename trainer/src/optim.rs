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
    /// Whether the step changed the adapter, and if not, why.
    pub outcome: StepOutcome,
}

/// What became of an optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StepOutcome {
    Applied,
    /// The f16 loss scaler's scaled gradients overflowed while its scale was ≥ 1: the scale backs
    /// off and the next step is expected to fit (torch.amp.GradScaler's skipped step).
    SkippedScaleOverflow,
    /// The gradients (or, for the caller, the loss) were NaN or infinite: AdamW's update would
    /// write NaN into every weight, so nothing changed.
    SkippedNonFinite,
}

impl StepStats {
    fn skipped(grad_norm: f32, outcome: StepOutcome) -> Self {
        StepStats {
            grad_norm,
            clip_coef: 0.0,
            outcome,
        }
    }
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
    /// A step whose gradient norm is not finite changes nothing (`StepOutcome::SkippedNonFinite`).
    pub fn step(&mut self, be: &B, lora: &mut LoraParams<B>, lr: f64) -> Result<StepStats> {
        let grad_norm = be.sum_of_squares(&lora.grads)?.sqrt() as f32;
        if !grad_norm.is_finite() {
            return Ok(StepStats::skipped(grad_norm, StepOutcome::SkippedNonFinite));
        }
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
            outcome: StepOutcome::Applied,
        })
    }
}

/// fp16 dynamic loss scaling as `torch.amp.GradScaler` does it: the loss (here: every token's
/// gradient weight) is multiplied by `scale` so small fp16 activation gradients do not flush to
/// zero; before the optimizer step the gradients are divided by `scale` again. When any gradient
/// is not finite the step is skipped and `scale` halves; after `growth_interval` finite steps in a
/// row it doubles. Disabled (scale 1, never skips) for bf16 and f32, which have f32's range.
#[derive(Clone, Debug, PartialEq)]
pub struct LossScaler {
    pub enabled: bool,
    pub scale: f32,
    pub growth_factor: f32,
    pub backoff_factor: f32,
    pub growth_interval: u32,
    /// Finite steps since the last change of `scale`.
    pub good_steps: u32,
}

impl LossScaler {
    /// GradScaler's defaults (init 65536, growth 2 every 2000 steps, backoff 0.5), enabled when the
    /// backend computes in f16.
    pub fn for_dtype(dtype: DType) -> Self {
        LossScaler {
            enabled: dtype == DType::F16,
            scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
            good_steps: 0,
        }
    }

    /// The gradient weight to use for a token whose unscaled weight is `weight`.
    pub fn loss_weight(&self, weight: f32) -> f32 {
        if self.enabled {
            weight * self.scale
        } else {
            weight
        }
    }

    /// After backward: whether the gradients are finite. When they are, divides them by the scale;
    /// either way updates the scale for the next step.
    pub fn unscale<B: Backend>(&mut self, be: &B, grads: &mut [B::Tensor]) -> Result<bool> {
        if !self.enabled {
            return Ok(true);
        }
        let finite = be.all_finite(grads)?;
        if finite {
            for g in grads.iter_mut() {
                be.scale(1.0 / self.scale, g)?;
            }
        }
        self.update(finite);
        Ok(finite)
    }

    fn update(&mut self, finite: bool) {
        if !finite {
            self.scale *= self.backoff_factor;
            self.good_steps = 0;
        } else {
            self.good_steps += 1;
            if self.good_steps == self.growth_interval {
                self.scale *= self.growth_factor;
                self.good_steps = 0;
            }
        }
    }
}

impl<B: Backend> AdamW<B> {
    /// [`AdamW::step`] behind the loss scaler: skips the step (AdamW's state and the weights stay
    /// as they were, `grad_norm` is reported as infinite) when the scaled gradients overflowed.
    /// Below a scale of 1 the scaling no longer enlarges anything, so a non-finite gradient there
    /// is the model's own (`SkippedNonFinite`), not an overflow of the scale.
    pub fn step_scaled(
        &mut self,
        be: &B,
        lora: &mut LoraParams<B>,
        lr: f64,
        scaler: &mut LossScaler,
    ) -> Result<StepStats> {
        let scale = scaler.scale;
        if scaler.unscale(be, &mut lora.grads)? {
            self.step(be, lora, lr)
        } else if scale >= 1.0 {
            Ok(StepStats::skipped(
                f32::INFINITY,
                StepOutcome::SkippedScaleOverflow,
            ))
        } else {
            Ok(StepStats::skipped(
                f32::INFINITY,
                StepOutcome::SkippedNonFinite,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernels::cpu::CpuBackend;

    #[test]
    fn the_scaler_backs_off_on_overflow_and_grows_after_the_interval() {
        let be = CpuBackend::new();
        let mut s = LossScaler::for_dtype(DType::F16);
        s.growth_interval = 3;
        assert_eq!(s.loss_weight(0.5), 32768.0);
        let mut grads = vec![vec![65536.0, -131072.0], vec![f32::INFINITY]];
        assert!(!s.unscale(&be, &mut grads).unwrap());
        assert_eq!(s.scale, 32768.0);
        assert_eq!(
            grads[0],
            vec![65536.0, -131072.0],
            "skipped steps leave grads alone"
        );
        for expected_scale in [32768.0, 32768.0, 65536.0] {
            let mut g = vec![vec![32768.0, -65536.0]];
            assert!(s.unscale(&be, &mut g).unwrap());
            assert_eq!(
                g[0],
                vec![1.0, -2.0],
                "finite grads are divided by the scale"
            );
            assert_eq!(s.scale, expected_scale);
        }
    }

    #[test]
    fn bf16_and_f32_never_scale_or_skip() {
        let be = CpuBackend::new();
        let mut s = LossScaler::for_dtype(DType::BF16);
        assert_eq!(s.loss_weight(0.25), 0.25);
        let mut grads = vec![vec![f32::NAN]];
        assert!(s.unscale(&be, &mut grads).unwrap());
        assert_eq!(s.scale, 65536.0);
    }
}
