//! The layer's backward (the forward and the saved state are in the parent module): from a full
//! forward's saved state, or from a checkpoint by recomputing first. Each saved tensor and each
//! gradient is dropped as soon as nothing later reads it, so the pool can hand its memory on.

use super::{
    group_adapter, Attend, AttentionKept, AttentionSaved, HeadNormed, LayerCheckpoint, LayerSaved,
    LayerWeights, LoraInputs, MlpSaved, Shapes,
};
use crate::arch::InputGroup;
use crate::lora::LoraParams;
use crate::model::batch::Batch;
use crate::model::linear::{self, GroupGrad, MemberGrad};
use crate::model::proj_weight::Dequantized;
use anyhow::{anyhow, Result};
use kernels::{Backend, DType, QkvGrads, Rotation};

/// Whether a layer's backward makes `dL/dx`: every layer's does but the bottom one's, whose input
/// (the embedding's rows) has nothing trainable below it. Without it the bottom layer runs only
/// what its LoRA gradients read: not q's, k's and v's `dx` products nor the input norm's backward,
/// and no attention backward where q, k and v are not adapted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputGradient {
    Wanted,
    NotWanted,
}

impl InputGradient {
    /// Layer `layer`'s: not wanted for the bottom layer.
    pub fn of_layer(layer: usize) -> Self {
        match layer {
            0 => InputGradient::NotWanted,
            _ => InputGradient::Wanted,
        }
    }

    /// Wanted where `self` is, or where `read` (another gradient is computed from it).
    fn or_read(self, read: bool) -> Self {
        match self == InputGradient::Wanted || read {
            true => InputGradient::Wanted,
            false => InputGradient::NotWanted,
        }
    }

    /// What a recomputation does with its products' NF4 dense copies when the backward that
    /// follows it at once makes this gradient: keeps them for the backward's `dx` products, or,
    /// where those do not run, frees them.
    fn dense_copies(self) -> Dequantized {
        match self {
            InputGradient::Wanted => Dequantized::KeptForNext,
            InputGradient::NotWanted => Dequantized::Dropped,
        }
    }

    /// A buffer of `len` values for the gradient, where it is wanted.
    fn buffer<B: Backend>(self, be: &B, len: usize) -> Result<Option<B::Tensor>> {
        Ok(match self {
            InputGradient::Wanted => Some(be.empty(len, be.compute_dtype())?),
            InputGradient::NotWanted => None,
        })
    }
}

/// Whether the MLP half's backward must make `dL/d mid`: where the layer's `dL/dx` is `wanted`,
/// or the attention half's LoRA gradients (o's, or q's, k's and v's) read it.
fn mid_gradient<B: Backend>(
    lora: Option<&LoraParams<B>>,
    layer: usize,
    wanted: InputGradient,
) -> InputGradient {
    let adapted = |g| group_adapter(lora, layer, g).is_some();
    wanted.or_read(adapted(InputGroup::O) || adapted(InputGroup::Qkv))
}

/// `dL/dx` of [`super::head_norm`] from `dy`.
fn head_norm_backward<B: Backend>(
    be: &B,
    s: &Shapes,
    w: &B::Tensor,
    saved: &HeadNormed<B>,
    dy: &B::Tensor,
) -> Result<B::Tensor> {
    let mut dx = be.zeros(be.len(dy), be.compute_dtype())?;
    be.rms_norm_backward(dy, &saved.raw, w, &saved.rstd, s.head_dim, &mut dx)?;
    Ok(dx)
}

/// Each adapted input group's f32 `[n, width]` for its `u` sums ([`linear::backward_to_input`]),
/// by [`InputGroup::index`]: zeroed together at the start of the layer's backward, one launch
/// where each group's own zeroing was one (4 a layer), and taken by the groups' backwards in turn.
type USums<B> = [Option<<B as Backend>::Tensor>; 4];

fn zeroed_u_sums<B: Backend>(
    be: &B,
    lora: Option<&LoraParams<B>>,
    layer: usize,
    n: usize,
) -> Result<USums<B>> {
    let mut sums: USums<B> = Default::default();
    let Some(lp) = lora else {
        return Ok(sums);
    };
    let mut groups = Vec::new();
    let mut tensors = Vec::new();
    for g in InputGroup::ALL {
        if let Some(group) = lp.group(layer, g) {
            groups.push(g.index());
            tensors.push(be.empty(n * group.width(), DType::F32)?);
        }
    }
    be.fill_zero_many(&mut tensors)?;
    for (i, t) in groups.into_iter().zip(tensors) {
        sums[i] = Some(t);
    }
    Ok(sums)
}

/// Input group `g`'s adapter for [`linear::backward`] when a member is adapted: the parameters,
/// the group's stacked A, its forward's `t`, and its zeroed `u` sums, taken out of `u_sums`.
fn group_lora<'a, B: Backend>(
    lora: Option<&'a mut LoraParams<B>>,
    lora_t: &'a LoraInputs<B>,
    u_sums: &mut USums<B>,
    layer: usize,
    g: InputGroup,
) -> Result<Option<GroupGrad<'a, B>>> {
    let (Some(params), Some(t)) = (lora, &lora_t[g.index()]) else {
        return Ok(None);
    };
    let Some(group) = params.group(layer, g) else {
        return Ok(None);
    };
    let u_sum = u_sums[g.index()]
        .take()
        .ok_or_else(|| anyhow!("layer {layer}: the {g:?} group's u sums were not made"))?;
    Ok(Some(GroupGrad {
        params,
        group,
        t,
        u_sum,
    }))
}

impl<B: Backend> LayerWeights<B> {
    /// Backward from a checkpoint: recomputes what backward needs and back-propagates `dy`,
    /// returning `dL/dx` and adding the LoRA gradients into `lora`. The recomputation skips the
    /// output (`mid + down_proj(act)` was given to the layer above in the forward: the down
    /// projection's frozen GEMM, LoRA `t Bᵀ` term and residual add; its `t = act Aᵀ` is
    /// recomputed). With the attention part kept (offload), attention, the o projection, the kept
    /// k/v projections and every LoRA input `t` are not recomputed either, and the halves run one
    /// after the other — the MLP's recomputation from the kept residual and its backward, then the
    /// attention's — so the device never holds both halves' activations at once. Bit for bit the
    /// gradients of [`LayerWeights::backward`]; `dL/dx` where `wanted`.
    #[allow(clippy::too_many_arguments)]
    pub fn recompute_backward(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        mut lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        checkpoint: LayerCheckpoint<B>,
        dy: B::Tensor,
        wanted: InputGradient,
    ) -> Result<Option<B::Tensor>> {
        let attend = Attend::Batch(batch);
        let LayerCheckpoint { x, attention } = checkpoint;
        match attention {
            None => {
                let none = &mut LoraInputs::<B>::default();
                let dense = Dequantized::Dropped;
                let (attention, mid) = self.attention_half(
                    be,
                    s,
                    layer,
                    lora.as_deref(),
                    attend,
                    x,
                    None,
                    none,
                    dense,
                )?;
                let mid = mid.expect("attention ran, so the residual is computed");
                let lp = lora.as_deref();
                let dense = mid_gradient(lp, layer, wanted).dense_copies();
                let (mlp, _) = self.mlp_half(be, s, layer, lp, mid, false, none, dense)?;
                let saved = LayerSaved { attention, mlp };
                self.backward(be, s, layer, lora, batch, saved, dy, wanted)
            }
            Some(AttentionKept {
                reused,
                mid,
                mut lora_t,
            }) => {
                let kept_t = &mut lora_t;
                let n = be.len(&x) / s.hidden;
                let u_sums = &mut zeroed_u_sums(be, lora.as_deref(), layer, n)?;
                let lp = lora.as_deref();
                let dmid_wanted = mid_gradient(lp, layer, wanted);
                let dense = dmid_wanted.dense_copies();
                let (mlp, _) = self.mlp_half(be, s, layer, lp, mid, false, kept_t, dense)?;
                let lp = lora.as_deref_mut();
                let dmid = self.backward_mlp(be, s, layer, lp, u_sums, mlp, dy, dmid_wanted)?;
                let Some(dmid) = dmid else {
                    return Ok(None);
                };
                let lp = lora.as_deref();
                let dense = wanted.dense_copies();
                let (attention, _) =
                    self.attention_half(be, s, layer, lp, attend, x, Some(reused), kept_t, dense)?;
                self.backward_attention(be, s, layer, lora, u_sums, batch, attention, dmid, wanted)
            }
        }
    }

    /// Given `dy = dL/d(output)`, returns `dL/dx` where `wanted` and adds the LoRA gradients into
    /// `lora`. Each saved tensor and each gradient is dropped as soon as nothing later reads it, so
    /// the pool can hand its memory to the next.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        mut lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        saved: LayerSaved<B>,
        dy: B::Tensor,
        wanted: InputGradient,
    ) -> Result<Option<B::Tensor>> {
        let LayerSaved { attention, mlp } = saved;
        let n = be.len(&attention.x) / s.hidden;
        let u_sums = &mut zeroed_u_sums(be, lora.as_deref(), layer, n)?;
        let dmid_wanted = mid_gradient(lora.as_deref(), layer, wanted);
        let lp = lora.as_deref_mut();
        match self.backward_mlp(be, s, layer, lp, u_sums, mlp, dy, dmid_wanted)? {
            Some(dmid) => {
                self.backward_attention(be, s, layer, lora, u_sums, batch, attention, dmid, wanted)
            }
            None => Ok(None),
        }
    }

    /// The members of input group `g` for [`linear::backward`], given their output gradients.
    fn member_grads<'a>(
        &'a self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        g: InputGroup,
        douts: &[&'a B::Tensor],
    ) -> Vec<MemberGrad<'a, B>> {
        g.members()
            .iter()
            .zip(douts)
            .map(|(&p, &dy)| MemberGrad {
                d: s.dims(p, be.len(dy) / s.dims(p, 1).out_f),
                dy,
                w: &self.proj[p.index()].weight,
                slot: lora.and_then(|l| l.slot(layer, p)),
            })
            .collect()
    }

    /// Writes `dL/d input` of input group `g` (its members' output gradients `douts`) into
    /// `dinput` where one is wanted, and adds their LoRA gradients into `lora` (see
    /// [`linear::backward`]).
    #[allow(clippy::too_many_arguments)]
    fn group_back(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        (lora, lora_t, u_sums): (Option<&mut LoraParams<B>>, &LoraInputs<B>, &mut USums<B>),
        g: InputGroup,
        douts: &[&B::Tensor],
        input: &B::Tensor,
        dinput: Option<&mut B::Tensor>,
    ) -> Result<()> {
        let members = self.member_grads(be, s, layer, lora.as_deref(), g, douts);
        let adapter = group_lora(lora, lora_t, u_sums, layer, g)?;
        linear::backward(be, &members, input, adapter, dinput)
    }

    /// The MLP half's backward: `y = h + down(act)`, so `dL/dh` starts as `dy` (the residual);
    /// returns it where `wanted`. `act` is not saved: the SwiGLU backward writes it over
    /// `dL/dact`, and down's LoRA `dA`, the one reader, runs after it.
    #[allow(clippy::too_many_arguments)]
    fn backward_mlp(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        mut lora: Option<&mut LoraParams<B>>,
        u_sums: &mut USums<B>,
        saved: MlpSaved<B>,
        dy: B::Tensor,
        wanted: InputGradient,
    ) -> Result<Option<B::Tensor>> {
        let MlpSaved {
            mid,
            rstd2,
            norm2,
            gate,
            up,
            lora_t,
        } = saved;
        let n = be.len(&mid) / s.hidden;
        let dt = be.compute_dtype();
        let down = InputGroup::Down;
        let members = self.member_grads(be, s, layer, lora.as_deref(), down, &[&dy]);
        let adapter = group_lora(lora.as_deref_mut(), &lora_t, u_sums, layer, down)?;
        let mut dact = be.empty(n * s.inter, dt)?;
        let pending = linear::backward_to_input(be, &members, adapter, Some(&mut dact))?;
        // gate and up become their gradients in place, dact the forward's act.
        let (mut dgate, mut dup) = (gate, up);
        be.swiglu_backward(&mut dact, &mut dgate, &mut dup)?;
        let act = dact;
        if let Some(pending) = pending {
            pending.add(be, &members, &act)?;
        }
        drop((act, members));
        let mut dnorm2 = wanted.buffer(be, n * s.hidden)?;
        self.group_back(
            be,
            s,
            layer,
            (lora, &lora_t, u_sums),
            InputGroup::GateUp,
            &[&dgate, &dup],
            &norm2,
            dnorm2.as_mut(),
        )?;
        drop((dgate, dup, norm2));
        let Some(dnorm2) = dnorm2 else {
            return Ok(None);
        };
        let mut dmid = dy;
        be.rms_norm_backward(
            &dnorm2,
            &mid,
            &self.post_attention_norm,
            &rstd2,
            s.hidden,
            &mut dmid,
        )?;
        Ok(Some(dmid))
    }

    /// The attention half's backward: `h = x + o(attn)`, so `dL/dx` starts as `dmid`; returns it
    /// where `wanted`. The attention backward runs where `dL/dx` is wanted or q, k, v are adapted.
    #[allow(clippy::too_many_arguments)]
    fn backward_attention(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        mut lora: Option<&mut LoraParams<B>>,
        u_sums: &mut USums<B>,
        batch: &Batch<B>,
        saved: AttentionSaved<B>,
        dmid: B::Tensor,
        wanted: InputGradient,
    ) -> Result<Option<B::Tensor>> {
        let AttentionSaved {
            x,
            rstd1,
            norm1,
            qk_raw,
            q,
            k,
            v,
            attn,
            lse,
            lora_t,
        } = saved;
        let lse = lse.ok_or_else(|| {
            anyhow!("layer {layer}: backward after a cached (generation) forward, which keeps no log-sum-exp")
        })?;
        let n = be.len(&x) / s.hidden;
        let qkv_adapted = group_adapter(lora.as_deref(), layer, InputGroup::Qkv).is_some();
        let mut back =
            |g, douts: &[&B::Tensor], input: &B::Tensor, dinput: Option<&mut B::Tensor>| {
                let adapter = (lora.as_deref_mut(), &lora_t, &mut *u_sums);
                self.group_back(be, s, layer, adapter, g, douts, input, dinput)
            };
        let mut dattn = wanted.or_read(qkv_adapted).buffer(be, n * s.q_dim)?;
        back(InputGroup::O, &[&dmid], &attn, dattn.as_mut())?;
        let Some(dattn) = dattn else {
            return Ok(None);
        };
        let (positions, cos, sin) = (&batch.positions, &batch.cos, &batch.sin);
        // o's dA above was attn's last reader but the backward's D_i: the backward takes it.
        let QkvGrads { dq, mut dk, dv } = be.attention_backward(
            &q,
            &k,
            &v,
            attn,
            &lse,
            &dattn,
            &batch.layout,
            &batch.doc_start,
            s.heads,
            s.kv_heads,
            s.head_dim,
            Some(Rotation {
                positions,
                cos,
                sin,
            }),
        )?;
        be.rope(&mut dk, positions, cos, sin, s.kv_heads, s.head_dim, true)?;
        drop((dattn, q, k, v, lse));
        let (dq, dk) = match (&self.qk_norm, &qk_raw) {
            (Some([wq, wk]), Some([q_raw, k_raw])) => (
                head_norm_backward(be, s, wq, q_raw, &dq)?,
                head_norm_backward(be, s, wk, k_raw, &dk)?,
            ),
            _ => (dq, dk),
        };
        drop(qk_raw);
        let mut dnorm1 = wanted.buffer(be, n * s.hidden)?;
        back(InputGroup::Qkv, &[&dq, &dk, &dv], &norm1, dnorm1.as_mut())?;
        drop((dq, dk, dv, norm1));
        let Some(dnorm1) = dnorm1 else {
            return Ok(None);
        };
        let mut dx = dmid;
        be.rms_norm_backward(&dnorm1, &x, &self.input_norm, &rstd1, s.hidden, &mut dx)?;
        Ok(Some(dx))
    }
}
