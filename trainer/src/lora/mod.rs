//! LoRA (Hu et al. 2021): a frozen linear `y = x Wᵀ` becomes `y = x Wᵀ + s · (x Aᵀ) Bᵀ` with
//! `A [r, in]`, `B [out, r]` trainable and `s = lora_alpha / r` (or `lora_alpha / sqrt(r)` with rsLoRA).
//!
//! - [`LoraConfig`]: rank, alpha, targets (PEFT's `adapter_config.json` fields).
//! - [`LoraParams`]: every A and B of a model as f32 master tensors, with gradients, in PEFT's
//!   order, and each layer's compute-dtype copies in one tensor, the A of projections that read
//!   one input stacked ([`InputGroup`]).
//! - [`peft`]: reading and writing PEFT adapter folders.

pub mod peft;

use crate::arch::{InputGroup, ModelConfig, Projection};
use anyhow::{bail, Result};
use kernels::{AfterUpdate, Backend, DType};
use std::sync::atomic::{AtomicU64, Ordering};

/// What [`LoraParams::update_target`] hands [`Backend::adamw`].
pub struct UpdateTarget<'a, T> {
    pub params: &'a mut [T],
    pub grads: &'a mut [T],
    pub after: AfterUpdate<'a, T>,
}

/// The next compute-copy version ([`LoraParams::compute_version`]): process-wide, so no two
/// refreshes of any adapters' copies share a number.
static NEXT_COMPUTE_VERSION: AtomicU64 = AtomicU64::new(1);

/// The compute tensor and the places `at` of the weights about to be written into it, with the
/// layers' compute versions (`versions`) moved on to a new one; `None` without a compute tensor.
fn refreshed_compute<'a, T>(
    compute: &'a mut Option<T>,
    at: &'a [usize],
    versions: &mut [u64],
) -> Option<(&'a mut T, &'a [usize])> {
    let compute = compute.as_mut()?;
    versions.fill(new_compute_version());
    Some((compute, at))
}

fn new_compute_version() -> u64 {
    NEXT_COMPUTE_VERSION.fetch_add(1, Ordering::Relaxed)
}

/// Which projections get adapters, and how large they are.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    pub r: usize,
    pub alpha: f32,
    pub targets: Vec<Projection>,
    pub use_rslora: bool,
    pub dropout: f32,
}

impl LoraConfig {
    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA (Kalajdzievski 2023).
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.r as f32).sqrt()
        } else {
            self.alpha / self.r as f32
        }
    }
}

/// One LoRA parameter on the host: its PEFT name, `[rows, cols]` and values.
pub type HostParam = (String, [usize; 2], Vec<f32>);

/// Where one adapted projection's tensors live in [`LoraParams`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LoraSlot {
    /// Index of A in `params`; B is at `a + 1`.
    pub a: usize,
    pub rank: usize,
    pub scaling: f32,
    /// Position among its input group's adapted projections: its `t = x Aᵀ` is columns
    /// `member · rank ..` of the group's `x A_groupᵀ`.
    pub member: usize,
    /// Offset of B's compute copy `[out, r]` in the layer's compute tensor.
    pub b_at: usize,
}

/// Where an input group's stacked A lives: rows `[members · rank, in]` at `a_at` of the layer's
/// compute tensor (each member's A in turn, [`Projection::ALL`] order).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GroupSlot {
    pub a_at: usize,
    pub members: usize,
    pub rank: usize,
    pub scaling: f32,
}

impl GroupSlot {
    /// Columns of the group's `t = x A_groupᵀ` (and of `u = dy B` stacked alike).
    pub fn width(&self) -> usize {
        self.members * self.rank
    }
}

/// All LoRA tensors of a model: f32 masters, compute-dtype copies for the GEMMs, f32 gradients.
/// Order: layer by layer, projections in [`Projection::ALL`] order, A then B — a layer's tensors are
/// contiguous, so its gradients can be reduced as soon as its backward ends. The compute copies
/// are one tensor, layer by layer: per input group, the members' A stacked, then their B.
pub struct LoraParams<B: Backend> {
    pub config: LoraConfig,
    /// PEFT keys, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`.
    pub names: Vec<String>,
    /// `[rows, cols]` of each tensor.
    pub shapes: Vec<[usize; 2]>,
    pub params: Vec<B::Tensor>,
    /// `params` rounded to the backend's compute dtype, in one tensor (`None` without adapters);
    /// refreshed by [`LoraParams::sync_compute`].
    pub compute: Option<B::Tensor>,
    /// Offset of each tensor's copy in `compute`.
    compute_at: Vec<usize>,
    /// Per layer, the version its compute copies were last refreshed to.
    compute_versions: Vec<u64>,
    pub grads: Vec<B::Tensor>,
    /// `slots[layer][projection index]`
    slots: Vec<[Option<LoraSlot>; 7]>,
    /// `groups[layer][input group index]`
    groups: Vec<[Option<GroupSlot>; 4]>,
    /// Layers below this one hold the latest weights; the others wait for the last optimizer
    /// step's update, deferred into the next training forward (`crate::optim::UpdateTiming`).
    current_below: usize,
}

/// The PEFT key of a projection's A or B tensor.
pub fn peft_key(layer: usize, proj: Projection, which: char) -> String {
    format!(
        "base_model.model.{}.lora_{which}.weight",
        proj.module_path(layer)
    )
}

impl<B: Backend> LoraParams<B> {
    /// Builds the adapter for `model` from host values: `values(name, shape)` returns each tensor.
    pub fn build(
        backend: &B,
        model: &ModelConfig,
        config: LoraConfig,
        mut values: impl FnMut(&str, [usize; 2]) -> Result<Vec<f32>>,
    ) -> Result<Self> {
        if config.r == 0 {
            bail!("LoRA rank r must be at least 1");
        }
        let mut lp = LoraParams {
            names: Vec::new(),
            shapes: Vec::new(),
            params: Vec::new(),
            compute: None,
            compute_at: Vec::new(),
            compute_versions: vec![0; model.num_layers],
            grads: Vec::new(),
            slots: vec![[None; 7]; model.num_layers],
            groups: vec![[None; 4]; model.num_layers],
            current_below: model.num_layers,
            config,
        };
        let (r, scaling) = (lp.config.r, lp.config.scaling());
        let mut compute_len = 0;
        for layer in 0..model.num_layers {
            for (pi, proj) in Projection::ALL.iter().enumerate() {
                if !lp.config.targets.contains(proj) {
                    continue;
                }
                let (out_f, in_f) = proj.shape(model);
                lp.slots[layer][pi] = Some(LoraSlot {
                    a: lp.params.len(),
                    rank: r,
                    scaling,
                    member: 0,
                    b_at: 0,
                });
                for (which, shape) in [('A', [r, in_f]), ('B', [out_f, r])] {
                    let name = peft_key(layer, *proj, which);
                    let data = values(&name, shape)?;
                    if data.len() != shape[0] * shape[1] {
                        bail!(
                            "LoRA tensor `{name}` has {} values, expected {:?}",
                            data.len(),
                            shape
                        );
                    }
                    lp.params.push(backend.upload(&data, DType::F32)?);
                    lp.grads.push(backend.zeros(data.len(), DType::F32)?);
                    lp.names.push(name);
                    lp.shapes.push(shape);
                }
            }
            compute_len = lp.place_compute_copies(layer, compute_len);
        }
        if compute_len > 0 {
            lp.compute = Some(backend.zeros(compute_len, backend.compute_dtype())?);
            lp.sync_compute(backend)?;
        }
        Ok(lp)
    }

    /// Lays out `layer`'s part of the compute tensor from offset `next`: per input group, the
    /// members' A one after another (a stacked `[members · r, in]`), then their B. Returns where
    /// the next layer's part starts.
    fn place_compute_copies(&mut self, layer: usize, mut next: usize) -> usize {
        self.compute_at.resize(self.params.len(), 0);
        for group in InputGroup::ALL {
            let adapted: Vec<Projection> = group
                .members()
                .iter()
                .copied()
                .filter(|p| self.slots[layer][p.index()].is_some())
                .collect();
            let Some(first_member) = adapted.first() else {
                continue;
            };
            let lead = self.slots[layer][first_member.index()].expect("adapted");
            self.groups[layer][group.index()] = Some(GroupSlot {
                a_at: next,
                members: adapted.len(),
                rank: lead.rank,
                scaling: lead.scaling,
            });
            for (member, p) in adapted.iter().enumerate() {
                let slot = self.slots[layer][p.index()].as_mut().expect("adapted");
                slot.member = member;
                self.compute_at[slot.a] = next;
                next += self.shapes[slot.a][0] * self.shapes[slot.a][1];
            }
            for p in &adapted {
                let slot = self.slots[layer][p.index()].as_mut().expect("adapted");
                slot.b_at = next;
                self.compute_at[slot.a + 1] = next;
                next += self.shapes[slot.a + 1][0] * self.shapes[slot.a + 1][1];
            }
        }
        next
    }

    /// The slot of a layer's projection, if it is adapted.
    pub fn slot(&self, layer: usize, proj: Projection) -> Option<LoraSlot> {
        self.slots[layer][proj.index()]
    }

    /// The stacked A of a layer's input group, if any member is adapted.
    pub fn group(&self, layer: usize, group: InputGroup) -> Option<GroupSlot> {
        self.groups[layer][group.index()]
    }

    /// The compute tensor (every A and B in the compute dtype, at the offsets the slots give).
    pub fn compute(&self) -> &B::Tensor {
        self.compute
            .as_ref()
            .expect("an adapter with a slot has a compute tensor")
    }

    /// [`LoraParams::compute`] and the gradients together: a backward product reads the one
    /// and adds into the other.
    pub fn compute_and_grads(&mut self) -> (&B::Tensor, &mut [B::Tensor]) {
        let compute = self
            .compute
            .as_ref()
            .expect("an adapter with a slot has a compute tensor");
        (compute, &mut self.grads)
    }

    /// Number of model layers (adapted or not).
    pub fn num_layers(&self) -> usize {
        self.slots.len()
    }

    /// Indices of `layer`'s tensors in `params`/`grads` (contiguous: tensors are stored layer by layer).
    pub fn layer_range(&self, layer: usize) -> std::ops::Range<usize> {
        let mut slots = self.slots[layer].iter().flatten();
        match slots.next() {
            None => 0..0,
            Some(first) => first.a..slots.last().unwrap_or(first).a + 2,
        }
    }

    /// Copies the f32 masters into the compute tensor (after each optimizer step; one launch).
    pub fn sync_compute(&mut self, backend: &B) -> Result<()> {
        let refreshed = refreshed_compute(
            &mut self.compute,
            &self.compute_at,
            &mut self.compute_versions,
        );
        if let Some((compute, at)) = refreshed {
            backend.copy_many_into(&self.params, compute, at)?;
        }
        Ok(())
    }

    /// The masters, their gradients and what an optimizer update of them all writes besides
    /// ([`AfterUpdate`]): the compute tensor, refreshed in the same launch (what
    /// [`LoraParams::sync_compute`] copies). The compute copies count as refreshed from here.
    pub fn update_target(&mut self) -> UpdateTarget<'_, B::Tensor> {
        let compute = refreshed_compute(
            &mut self.compute,
            &self.compute_at,
            &mut self.compute_versions,
        );
        UpdateTarget {
            params: &mut self.params,
            grads: &mut self.grads,
            after: AfterUpdate {
                compute,
                zero_grads: false,
            },
        }
    }

    /// `layer`'s gradients, and what an optimizer update of its f32 masters (fetched from host
    /// memory by the optimizer) writes besides them ([`AfterUpdate`]): its part of the compute
    /// tensor, refreshed in the same launch, and the gradients zeroed when `zero_grads`. The
    /// compute copies count as refreshed from here.
    pub fn layer_update_target(
        &mut self,
        layer: usize,
        zero_grads: bool,
    ) -> (&mut [B::Tensor], AfterUpdate<'_, B::Tensor>) {
        let range = self.layer_range(layer);
        let compute = refreshed_compute(
            &mut self.compute,
            &self.compute_at[range.clone()],
            &mut self.compute_versions[layer..=layer],
        );
        let after = AfterUpdate {
            compute,
            zero_grads,
        };
        (&mut self.grads[range], after)
    }

    /// Which refresh `layer`'s compute copies hold: a number no other refresh of any adapter
    /// took, so a copy made from them (a folded weight's pad, `crate::model::proj_weight`) can
    /// tell whether it is current.
    pub fn compute_version(&self, layer: usize) -> u64 {
        self.compute_versions[layer]
    }

    /// Whether `layer`'s weights (masters and compute copies) are the latest: not waiting for a
    /// deferred optimizer update.
    pub fn is_current(&self, layer: usize) -> bool {
        layer < self.current_below
    }

    /// Marks every layer as waiting for an optimizer update deferred into the next forward.
    pub fn await_update(&mut self) {
        self.current_below = 0;
    }

    /// Marks layers up to `layer` as updated.
    pub fn updated_through(&mut self, layer: usize) {
        self.current_below = self.current_below.max(layer + 1);
    }

    /// Index in `grads` of the first tensor of `layer` or a layer above it (`grads.len()` when
    /// there is none).
    fn first_tensor_from(&self, layer: usize) -> usize {
        self.slots
            .iter()
            .skip(layer)
            .flat_map(|s| s.iter().flatten())
            .map(|slot| slot.a)
            .next()
            .unwrap_or(self.grads.len())
    }

    /// Sets the gradients to zero (start of an optimizer step): all of them, but those of layers
    /// whose deferred update is still to come, which read them first and zero them then.
    pub fn zero_grads(&mut self, backend: &B) -> Result<()> {
        let current = self.first_tensor_from(self.current_below);
        Ok(backend.fill_zero_many(&mut self.grads[..current])?)
    }

    /// Downloads every parameter (name, shape, values) — for saving adapters.
    pub fn download_params(&self, backend: &B) -> Result<Vec<HostParam>> {
        self.names
            .iter()
            .zip(&self.shapes)
            .zip(&self.params)
            .map(|((n, s), p)| Ok((n.clone(), *s, backend.download(p)?)))
            .collect()
    }

    /// Number of trainable values.
    pub fn num_values(&self) -> usize {
        self.shapes.iter().map(|s| s[0] * s[1]).sum()
    }
}
