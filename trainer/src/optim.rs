//! The optimizer step: clip all LoRA gradients together by their global L2 norm
//! (`torch.nn.utils.clip_grad_norm_`), then `torch.optim.AdamW` on every LoRA tensor.
//!
//! With `train.optimizer_state = "host"` ([`Residence::Host`]) the f32 masters and both moments
//! (12 bytes per trainable value: 0.45 GiB at 7B, r = 16 on all seven projections) wait in pinned
//! host memory between steps, one group per layer; updating a group brings it to the device,
//! applies AdamW and sends it back while the next group is on its way in ([`Backend::park`]), so
//! the device holds three layers' worth. The arithmetic is the same kernel on the same values: the
//! results are bit for bit those of [`Residence::Device`].
//!
//! Those copies take ~10 ms a step at 7B (0.45 GiB each way), with nothing for the device to do
//! meanwhile if the update is made at once. [`UpdateTiming::InNextForward`] defers it: the step
//! computes the norm and the clip coefficient, and the next forward updates each layer's group
//! right before the layer runs ([`AdamW::update_layer`], called by the forward's hook), so the
//! copies cross the link while the layers below compute. A layer's gradients are read by its
//! update and zeroed after it, instead of at the start of the step ([`LoraParams::zero_grads`]).

use crate::lora::LoraParams;
use crate::residence::Residence;
use anyhow::Result;
use kernels::{AdamWParams, Backend, DType, ParkLane};
use std::collections::VecDeque;
use std::ops::Range;

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
    /// The moments on the device (empty while they are on the host).
    pub m: Vec<B::Tensor>,
    pub v: Vec<B::Tensor>,
    /// Steps taken so far (the next step is `step + 1`).
    pub step: u64,
    /// With [`Residence::Host`]: the masters and moments, and the update still to apply.
    host: Option<HostState<B>>,
}

/// When a step's update reaches the weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpdateTiming {
    /// Before [`AdamW::step`] returns.
    Now,
    /// With the state on the host: layer by layer in the next forward with the adapter
    /// ([`AdamW::update_layer`]), or at [`AdamW::finish_update`]. The device-resident state is
    /// updated in one launch, at once either way.
    InNextForward,
}

/// The host-resident state: one group per adapted layer, in layer order but rotated as a step
/// updates them (an updated group goes to the back), and the step being applied.
struct HostState<B: Backend> {
    groups: VecDeque<HostGroup<B>>,
    pending: Option<PendingUpdate>,
}

/// A step whose update has reached only some groups: the first `left` groups still wait.
struct PendingUpdate {
    hp: AdamWParams,
    step: u64,
    clip_coef: f32,
    left: usize,
    /// Deferred: the waiting groups' gradients were not zeroed with the others, so the update zeroes them.
    zero_grads: bool,
}

/// One layer's LoRA tensors (`range` in [`LoraParams`]) in host memory: masters, then m, then v.
struct HostGroup<B: Backend> {
    layer: usize,
    range: Range<usize>,
    parked: B::Parked,
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
            host: None,
        })
    }

    /// Where the masters and moments are now.
    pub fn state(&self) -> Residence {
        match self.host {
            Some(_) => Residence::Host,
            None => Residence::Device,
        }
    }

    /// Moves the masters (out of `lora.params`) and the moments to `to`. On the host they are
    /// out of reach of anything but [`AdamW::step`]: [`AdamW::on_device`] brings them back for a
    /// save.
    pub fn place(&mut self, be: &B, lora: &mut LoraParams<B>, to: Residence) -> Result<()> {
        self.finish_update(be, lora)?;
        match (self.host.take(), to) {
            (None, Residence::Host) => {
                let mut params = std::mem::take(&mut lora.params).into_iter();
                let mut m = std::mem::take(&mut self.m).into_iter();
                let mut v = std::mem::take(&mut self.v).into_iter();
                let mut groups = VecDeque::new();
                for layer in 0..lora.num_layers() {
                    let range = lora.layer_range(layer);
                    let n = range.len();
                    let group: Vec<B::Tensor> = (params.by_ref().take(n))
                        .chain(m.by_ref().take(n))
                        .chain(v.by_ref().take(n))
                        .collect();
                    if n > 0 {
                        groups.push_back(HostGroup {
                            layer,
                            range,
                            parked: be.park(group, ParkLane::OptimizerState)?,
                        });
                    }
                }
                self.host = Some(HostState {
                    groups,
                    pending: None,
                });
                // Their device buffers, cached by size, would never be asked for again.
                be.release_cached()?;
            }
            (Some(host), Residence::Device) => {
                debug_assert!(host.pending.is_none(), "finish_update comes first");
                for g in host.groups {
                    let (p, m, v) = split_group(be.unpark(g.parked)?, g.range.len());
                    lora.params.extend(p);
                    self.m.extend(m);
                    self.v.extend(v);
                }
            }
            (host, _) => self.host = host,
        }
        Ok(())
    }

    /// Runs `f` with the masters and moments on the device (to save them), then puts them back.
    /// The backend's cached buffers are handed back first, so that a state coming from the host
    /// fits where the step's activations were.
    pub fn on_device<R>(
        &mut self,
        be: &B,
        lora: &mut LoraParams<B>,
        f: impl FnOnce(&LoraParams<B>, &Self) -> Result<R>,
    ) -> Result<R> {
        let was = self.state();
        if was == Residence::Host {
            be.release_cached()?;
        }
        self.place(be, lora, Residence::Device)?;
        let result = f(lora, self);
        self.place(be, lora, was)?;
        result
    }

    /// Clips and applies the accumulated gradients with learning rate `lr`, then refreshes the
    /// compute-dtype copies of the weights — now, or with the state on the host deferred into the
    /// next forward (`timing`). Gradients are left as they were (the caller zeroes them; a
    /// deferred update zeroes its layer's after reading them). A step whose gradient norm is not
    /// finite changes nothing (`StepOutcome::SkippedNonFinite`).
    pub fn step(
        &mut self,
        be: &B,
        lora: &mut LoraParams<B>,
        lr: f64,
        timing: UpdateTiming,
    ) -> Result<StepStats> {
        self.finish_update(be, lora)?;
        let grad_norm = be.sum_of_squares(&lora.grads)?.sqrt() as f32;
        if !grad_norm.is_finite() {
            return Ok(StepStats::skipped(grad_norm, StepOutcome::SkippedNonFinite));
        }
        let clip_coef = self
            .max_grad_norm
            .map_or(1.0, |max| clip_coefficient(grad_norm, max));
        self.step += 1;
        let hp = AdamWParams { lr, ..self.hp };
        let Some(host) = self.host.as_mut() else {
            let target = lora.update_target();
            be.adamw(
                target.params,
                target.grads,
                &mut self.m,
                &mut self.v,
                &hp,
                self.step,
                clip_coef,
                target.after,
            )?;
            return Ok(StepStats {
                grad_norm,
                clip_coef,
                outcome: StepOutcome::Applied,
            });
        };
        host.pending = Some(PendingUpdate {
            hp,
            step: self.step,
            clip_coef,
            left: host.groups.len(),
            zero_grads: timing == UpdateTiming::InNextForward,
        });
        match timing {
            UpdateTiming::Now => self.finish_update(be, lora)?,
            UpdateTiming::InNextForward => {
                // The first layer's group crosses the link while the host prepares the next step.
                if let Some(first) = host.groups.front_mut() {
                    be.prefetch(&mut first.parked)?;
                }
                lora.await_update();
            }
        }
        Ok(StepStats {
            grad_norm,
            clip_coef,
            outcome: StepOutcome::Applied,
        })
    }
}

impl<B: Backend> AdamW<B> {
    /// Right before layer `layer`'s forward: applies the pending update to the groups up to that
    /// layer, and marks it current. Called for the layers in order, as the forward runs them.
    pub fn update_layer(&mut self, be: &B, lora: &mut LoraParams<B>, layer: usize) -> Result<()> {
        while self.next_waiting_layer().is_some_and(|l| l <= layer) {
            self.update_next_group(be, lora)?;
        }
        if self.next_waiting_layer().is_none() {
            lora.updated_through(lora.num_layers());
        } else {
            lora.updated_through(layer);
        }
        Ok(())
    }

    /// Applies what is left of a deferred update (nothing when there is none).
    pub fn finish_update(&mut self, be: &B, lora: &mut LoraParams<B>) -> Result<()> {
        while self.next_waiting_layer().is_some() {
            self.update_next_group(be, lora)?;
        }
        lora.updated_through(lora.num_layers());
        Ok(())
    }

    /// The layer of the first group still waiting for the pending update.
    fn next_waiting_layer(&self) -> Option<usize> {
        let host = self.host.as_ref()?;
        host.pending.as_ref()?;
        host.groups.front().map(|g| g.layer)
    }

    /// Updates the first waiting group: its copy to the device (prefetched by the previous call,
    /// or by the step), AdamW with its compute-dtype copies (and its gradients zeroed) in the
    /// same launch, and its copy back to the host, with the next waiting group's copy to the
    /// device started first.
    fn update_next_group(&mut self, be: &B, lora: &mut LoraParams<B>) -> Result<()> {
        let host = self.host.as_mut().expect("a group waits");
        let pending = host.pending.as_mut().expect("a group waits");
        let group = host.groups.pop_front().expect("a group waits");
        pending.left -= 1;
        if pending.left > 0 {
            let next = host.groups.front_mut().expect("left counts the groups");
            be.prefetch(&mut next.parked)?;
        }
        let range = group.range.clone();
        let (mut p, mut m, mut v) = split_group(be.unpark(group.parked)?, range.len());
        let (grads, after) = lora.layer_update_target(group.layer, pending.zero_grads);
        be.adamw(
            &mut p,
            grads,
            &mut m,
            &mut v,
            &pending.hp,
            pending.step,
            pending.clip_coef,
            after,
        )?;
        p.extend(m);
        p.extend(v);
        host.groups.push_back(HostGroup {
            layer: group.layer,
            range,
            parked: be.park(p, ParkLane::OptimizerState)?,
        });
        if pending.left == 0 {
            host.pending = None;
        }
        Ok(())
    }
}

/// A group's tensors as (masters, m, v), `n` each.
fn split_group<T>(mut tensors: Vec<T>, n: usize) -> (Vec<T>, Vec<T>, Vec<T>) {
    let v = tensors.split_off(2 * n);
    let m = tensors.split_off(n);
    (tensors, m, v)
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
        timing: UpdateTiming,
    ) -> Result<StepStats> {
        let scale = scaler.scale;
        if scaler.unscale(be, &mut lora.grads)? {
            self.step(be, lora, lr, timing)
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

    /// Three steps with the state on the host give the device state's bits, through the
    /// per-layer groups (masters, m, v in their own order), made at once or deferred into a
    /// (simulated) next forward layer by layer; and `on_device` hands back every tensor in place.
    #[test]
    fn the_state_on_the_host_steps_to_the_same_bits() {
        use crate::arch::{ModelConfig, Projection};
        use crate::lora::LoraConfig;
        let be = CpuBackend::new();
        let fixture = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-llama/model");
        let model = ModelConfig::load(&fixture).unwrap();
        let config = LoraConfig {
            r: 2,
            alpha: 4.0,
            targets: Projection::ALL.to_vec(),
            use_rslora: false,
            dropout: 0.0,
        };
        let hp = AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let run = |state: Residence, timing: UpdateTiming| {
            let mut k = 0u32;
            let mut lora = LoraParams::build(&be, &model, config.clone(), |_, [r, c]| {
                Ok((0..r * c)
                    .map(|i| ((i as f32) * 0.37).sin() * 0.1)
                    .collect())
            })
            .unwrap();
            let mut opt = AdamW::new(&be, &lora, hp, Some(0.5)).unwrap();
            opt.place(&be, &mut lora, state).unwrap();
            assert_eq!(opt.state(), state);
            let deferred = state == Residence::Host && timing == UpdateTiming::InNextForward;
            for step in 0..3 {
                // The next forward: each layer's deferred update right before the layer.
                for layer in 0..model.num_layers {
                    opt.update_layer(&be, &mut lora, layer).unwrap();
                    assert!(lora.is_current(layer));
                    let grads = &lora.grads[lora.layer_range(layer)];
                    if deferred && step > 0 {
                        let zeroed = grads.iter().flatten().all(|&g| g == 0.0);
                        assert!(zeroed, "a deferred update zeroes its layer's gradients");
                    }
                }
                lora.zero_grads(&be).unwrap();
                for g in lora.grads.iter_mut() {
                    k += 1;
                    g.iter_mut()
                        .enumerate()
                        .for_each(|(i, x)| *x = ((i as f32 + k as f32) * 0.11).cos());
                }
                let stats = opt.step(&be, &mut lora, 1e-2, timing).unwrap();
                assert_eq!(stats.outcome, StepOutcome::Applied);
                assert_eq!(!lora.is_current(0), deferred);
            }
            opt.finish_update(&be, &mut lora).unwrap();
            assert!(lora.is_current(model.num_layers - 1));
            let compute = lora.compute.clone();
            let (params, m, v) = opt
                .on_device(&be, &mut lora, |lora, opt| {
                    Ok((lora.params.clone(), opt.m.clone(), opt.v.clone()))
                })
                .unwrap();
            assert_eq!(opt.state(), state, "on_device puts the state back");
            (params, m, v, compute)
        };
        let device = run(Residence::Device, UpdateTiming::Now);
        assert_eq!(device.0.len(), 7 * 2 * model.num_layers);
        assert!(device.1.iter().flatten().any(|&x| x != 0.0));
        assert_eq!(device, run(Residence::Device, UpdateTiming::InNextForward));
        assert_eq!(device, run(Residence::Host, UpdateTiming::Now));
        assert_eq!(device, run(Residence::Host, UpdateTiming::InNextForward));
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
