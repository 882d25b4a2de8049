//! One decoder layer, forward and backward, for every family; training, evaluation
//! ([`Attend::Batch`]) and cached generation ([`Attend::Cached`]) all run this one forward:
//!
//! `h = x + o_proj(attn(rope(qn(q)), rope(kn(k)), v))`, `q, k, v = {q,k,v}_proj(rms1(x))` (each
//! `b + x Wᵀ` where the family has biases), `qn`/`kn` the per-head RMSNorm of families that have
//! it (identity otherwise); then `y = h + down_proj(silu(gate_proj(m)) ⊙ up_proj(m))`, `m = rms2(h)`.
//! The forward runs as two halves, attention then MLP, each saving what its own backward needs
//! (`AttentionSaved`, `MlpSaved`); the backward is in [`backward`].

use super::batch::Batch;
use super::checkpointing::KeptKv;
use super::linear::{self, Dims, FrozenLinear, GroupAdapter, LoraTerm, Onto};
use super::proj_weight::{write_pads, Dequantized, FoldLayout, PadSource};
use crate::arch::{InputGroup, ModelConfig, Projection};
use crate::lora::{LoraConfig, LoraParams};
use anyhow::{anyhow, bail, Result};
use kernels::{Backend, DType, MatAt};

mod backward;

pub use backward::InputGradient;

/// The input groups whose LoRA can be folded into their frozen products
/// ([`crate::model::proj_weight`]): their input is an RMSNorm output, which the norm writes
/// into rows with room for `t` beside it.
const FOLDABLE: [InputGroup; 2] = [InputGroup::Qkv, InputGroup::GateUp];

/// The width of group `g`'s pad (`members · r`) when an adapter of `lora` is folded into it
/// ([`LayerWeights::fold_lora`]): a foldable group whose members are all targets.
pub fn fold_width(g: InputGroup, lora: &LoraConfig) -> Option<usize> {
    let all = g.members().iter().all(|p| lora.targets.contains(p));
    (FOLDABLE.contains(&g) && all).then(|| g.members().len() * lora.r)
}

/// Sizes every layer needs, copied out of the config.
pub struct Shapes {
    pub hidden: usize,
    pub inter: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub q_dim: usize,
    pub kv_dim: usize,
    pub eps: f32,
}

impl Shapes {
    pub fn of(c: &ModelConfig) -> Self {
        Shapes {
            hidden: c.hidden_size,
            inter: c.intermediate_size,
            heads: c.num_heads,
            kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
            q_dim: c.q_dim(),
            kv_dim: c.kv_dim(),
            eps: c.rms_norm_eps,
        }
    }

    /// Projection `proj`'s padded layout as member `member` of a folded group `width` wide.
    fn fold_layout(
        &self,
        proj: Projection,
        width: usize,
        member: usize,
        rank: usize,
    ) -> FoldLayout {
        let d = self.dims(proj, 1);
        FoldLayout {
            out_f: d.out_f,
            in_f: d.in_f,
            width,
            block: member * rank,
            rank,
        }
    }

    fn dims(&self, proj: Projection, n: usize) -> Dims {
        let (out_f, in_f) = match proj {
            Projection::Q => (self.q_dim, self.hidden),
            Projection::K | Projection::V => (self.kv_dim, self.hidden),
            Projection::O => (self.hidden, self.q_dim),
            Projection::Gate | Projection::Up => (self.inter, self.hidden),
            Projection::Down => (self.hidden, self.inter),
        };
        Dims { n, in_f, out_f }
    }
}

/// A layer's frozen weights.
pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Tensor,
    pub post_attention_norm: B::Tensor,
    /// In [`Projection::ALL`] order.
    pub proj: [FrozenLinear<B>; 7],
    /// The per-head RMSNorm weights of q and k, `[head_dim]` each (Qwen3).
    pub qk_norm: Option<[B::Tensor; 2]>,
}

/// Where the layer's attention finds its keys and values.
pub enum Attend<'a, B: Backend> {
    /// Training and evaluation: the batch attends to its own keys under its layout.
    Batch(&'a Batch<B>),
    /// Generation: the new tokens' keys and values are appended to the layer's cache, then the
    /// queries attend to everything cached. Forward only.
    Cached(CacheStep<'a, B>),
}

/// One generation step through one layer: that layer's KV cache and the step's positions.
pub struct CacheStep<'a, B: Backend> {
    /// This layer's caches `[rows, capacity, kv_dim]`.
    pub k: &'a mut B::Tensor,
    pub v: &'a mut B::Tensor,
    /// RoPE position of each new token, and the cache's tables.
    pub positions: &'a B::Indices,
    pub cos: &'a B::Tensor,
    pub sin: &'a B::Tensor,
    /// First real (not left-padding) column of each row.
    pub first_key: &'a B::Indices,
    pub rows: usize,
    /// New tokens per row in this step.
    pub new: usize,
    /// Columns filled before this step.
    pub start: usize,
    pub capacity: usize,
    pub window: Option<usize>,
}

impl<B: Backend> Attend<'_, B> {
    /// `(positions, cos, sin)` for RoPE.
    fn rope_tables(&self) -> (&B::Indices, &B::Tensor, &B::Tensor) {
        match self {
            Attend::Batch(b) => (&b.positions, &b.cos, &b.sin),
            Attend::Cached(c) => (c.positions, c.cos, c.sin),
        }
    }
}

/// What checkpointing keeps of a layer's forward for backward's recomputation: the layer input
/// and, when kept, the attention part ([`AttentionKept`]).
pub struct LayerCheckpoint<B: Backend> {
    x: B::Tensor,
    attention: Option<AttentionKept<B>>,
}

/// What an offloaded checkpoint keeps besides the input: the attention half's part (with it the
/// recomputation skips attention, the o projection and the kept k/v projections), the residual
/// after the o projection (the MLP half's input), and the LoRA inputs `t = s · input A_gᵀ` of every
/// adapted input group (`n × members · r` values each), which it then does not recompute.
struct AttentionKept<B: Backend> {
    reused: ReusedAttention<B>,
    mid: B::Tensor,
    lora_t: LoraInputs<B>,
}

/// Which of its optional tensors a checkpoint's list ([`LayerCheckpoint::into_tensors`]) holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckpointShape {
    attention: bool,
    k: bool,
    v: bool,
    lora_t: [bool; 4],
}

/// What a checkpoint keeps besides the layer input.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckpointKeeps {
    /// Nothing ([`Checkpointing::Full`](super::Checkpointing::Full)).
    Input,
    /// The attention part with `KeptKv`'s projections
    /// ([`Checkpointing::Offload`](super::Checkpointing::Offload)).
    Attention(KeptKv),
}

impl<B: Backend> LayerCheckpoint<B> {
    /// The tensors, `[x]` or `[x, attn, lse, mid, v?, k?, t…]` (the `t` in
    /// [`InputGroup::index`] order), and which optional ones are there, as
    /// [`LayerCheckpoint::from_tensors`] takes them.
    pub fn into_tensors(self) -> (Vec<B::Tensor>, CheckpointShape) {
        let mut ts = vec![self.x];
        let mut shape = CheckpointShape {
            attention: false,
            k: false,
            v: false,
            lora_t: [false; 4],
        };
        if let Some(kept) = self.attention {
            let ReusedAttention { attn, lse, v, k } = kept.reused;
            shape.attention = true;
            shape.k = k.is_some();
            shape.v = v.is_some();
            shape.lora_t = kept.lora_t.each_ref().map(Option::is_some);
            ts.extend([attn, lse, kept.mid]);
            ts.extend(v);
            ts.extend(k);
            ts.extend(kept.lora_t.into_iter().flatten());
        }
        (ts, shape)
    }

    pub fn from_tensors(ts: Vec<B::Tensor>, shape: CheckpointShape) -> Result<Self> {
        let count = 1
            + usize::from(shape.attention) * 3
            + usize::from(shape.v)
            + usize::from(shape.k)
            + shape.lora_t.iter().filter(|&&t| t).count();
        if ts.len() != count {
            bail!(
                "a layer checkpoint of {count} tensors came back with {}",
                ts.len()
            );
        }
        let mut it = ts.into_iter();
        let mut next = || it.next().expect("counted above");
        let x = next();
        let attention = shape.attention.then(|| {
            let (attn, lse, mid) = (next(), next(), next());
            AttentionKept {
                reused: ReusedAttention {
                    attn,
                    lse,
                    v: shape.v.then(&mut next),
                    k: shape.k.then(&mut next),
                },
                mid,
                lora_t: shape.lora_t.map(|kept| kept.then(&mut next)),
            }
        });
        Ok(LayerCheckpoint { x, attention })
    }
}

/// What an offloaded checkpoint gives the attention half's recomputation: the attention output,
/// its log-sum-exp, and the kept k (after RoPE) and v ([`KeptKv`]).
struct ReusedAttention<B: Backend> {
    attn: B::Tensor,
    lse: B::Tensor,
    v: Option<B::Tensor>,
    k: Option<B::Tensor>,
}

/// q or k before its per-head RMSNorm, and the norm's `1/rms` per head: what its backward needs.
struct HeadNormed<B: Backend> {
    raw: B::Tensor,
    rstd: B::Tensor,
}

/// What the attention half of the layer's backward needs from its forward.
struct AttentionSaved<B: Backend> {
    /// The layer input `x [N, hidden]`.
    x: B::Tensor,
    rstd1: B::Tensor,
    norm1: B::Tensor,
    /// q and k before their per-head norms (families with `qk_norm`).
    qk_raw: Option<[HeadNormed<B>; 2]>,
    /// q after RoPE `[N, hq·d]`, k after RoPE and v `[N, hkv·d]`.
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    attn: B::Tensor,
    /// Log-sum-exp of each query's scores `[N, hq]`; `None` after a cached (generation) forward.
    lse: Option<B::Tensor>,
    /// `s · x A_gᵀ` of the adapted q, k, v group and o.
    lora_t: LoraInputs<B>,
}

/// What the MLP half of the layer's backward needs from its forward.
struct MlpSaved<B: Backend> {
    /// After the attention residual: `h [N, hidden]`.
    mid: B::Tensor,
    rstd2: B::Tensor,
    norm2: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    /// `s · x A_gᵀ` of the adapted gate, up group and down (the SwiGLU output `act` that down reads
    /// is not kept: its backward makes it again, [`Backend::swiglu_backward`]).
    lora_t: LoraInputs<B>,
}

/// `t = s · input A_gᵀ` per input group with an adapted member, indexed by [`InputGroup::index`].
type LoraInputs<B> = [Option<<B as Backend>::Tensor>; 4];

/// Everything the layer's backward needs from its forward.
pub struct LayerSaved<B: Backend> {
    attention: AttentionSaved<B>,
    mlp: MlpSaved<B>,
}

impl<B: Backend> LayerSaved<B> {
    /// What checkpointing keeps of this forward (the rest is dropped here).
    pub fn checkpoint(self, keeps: CheckpointKeeps) -> Result<LayerCheckpoint<B>> {
        let LayerSaved { attention, mlp } = self;
        let kept = match keeps {
            CheckpointKeeps::Input => None,
            CheckpointKeeps::Attention(kv) => {
                let lse = attention
                    .lse
                    .ok_or_else(|| anyhow!("a cached (generation) forward keeps no checkpoint"))?;
                if kv.keeps_k() && attention.qk_raw.is_some() {
                    // KeptKv::of never asks for it: k's norm backward needs k before its norm.
                    bail!("a checkpoint keeps k only in families without a per-head k norm");
                }
                // Each half filled its own groups' entries (q/k/v and o; gate/up and down).
                let mut lora_t = attention.lora_t;
                for (t, mlp_t) in lora_t.iter_mut().zip(mlp.lora_t) {
                    *t = t.take().or(mlp_t);
                }
                Some(AttentionKept {
                    reused: ReusedAttention {
                        attn: attention.attn,
                        lse,
                        v: kv.keeps_v().then_some(attention.v),
                        k: kv.keeps_k().then_some(attention.k),
                    },
                    mid: mlp.mid,
                    lora_t,
                })
            }
        };
        Ok(LayerCheckpoint {
            x: attention.x,
            attention: kept,
        })
    }
}

/// `y[t, h, :] = w ⊙ x[t, h, :] · r[t, h]`: RMSNorm over each head vector of `x [N, heads·d]`
/// (the rows of the RMSNorm op are the heads).
fn head_norm<B: Backend>(
    be: &B,
    s: &Shapes,
    x: B::Tensor,
    w: &B::Tensor,
) -> Result<(B::Tensor, HeadNormed<B>)> {
    let mut y = be.empty(be.len(&x), be.compute_dtype())?;
    let mut rstd = be.empty(be.len(&x) / s.head_dim, DType::F32)?;
    be.rms_norm(&x, w, s.head_dim, s.eps, &mut y, s.head_dim, &mut rstd)?;
    Ok((y, HeadNormed { raw: x, rstd }))
}

/// The adapter of `layer`'s input group `g`, when one of its projections is adapted.
fn group_adapter<'a, B: Backend>(
    lora: Option<&'a LoraParams<B>>,
    layer: usize,
    g: InputGroup,
) -> Option<GroupAdapter<'a, B>> {
    let lp = lora?;
    let group = lp.group(layer, g)?;
    Some(GroupAdapter { params: lp, group })
}

impl<B: Backend> LayerWeights<B> {
    /// Runs the layer on `x`; returns the output and what backward needs.
    pub fn forward(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        attend: Attend<'_, B>,
        x: B::Tensor,
    ) -> Result<(B::Tensor, LayerSaved<B>)> {
        self.refresh_pads(be, s, layer, lora)?;
        let none = &mut LoraInputs::<B>::default();
        let dense = Dequantized::Dropped;
        let (attention, mid) =
            self.attention_half(be, s, layer, lora, attend, x, None, none, dense)?;
        let mid = mid.expect("attention ran, so the residual is computed");
        let (mlp, out) = self.mlp_half(be, s, layer, lora, mid, true, none, dense)?;
        let out = out.expect("the output was asked for");
        Ok((out, LayerSaved { attention, mlp }))
    }

    /// Lays out the frozen weights of the foldable input groups ([`FOLDABLE`]) that an adapter
    /// of `lora` fully adapts for folding its terms into their products ([`fold_width`]; each
    /// member's B in the block of its place in the group).
    pub fn fold_lora(&mut self, be: &B, s: &Shapes, lora: &LoraConfig) -> Result<()> {
        for g in FOLDABLE {
            let Some(width) = fold_width(g, lora) else {
                continue;
            };
            for (member, p) in g.members().iter().enumerate() {
                let layout = s.fold_layout(*p, width, member, lora.r);
                self.proj[p.index()].weight.fold(be, layout)?;
            }
        }
        Ok(())
    }

    /// Brings every folded dense weight's pad up to `lora`'s compute copies of this layer (after
    /// an optimizer update) in one [`Backend::place_blocks`], before the products that read them;
    /// each product would otherwise rewrite its own pad, a launch each.
    fn refresh_pads(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
    ) -> Result<()> {
        let Some(lp) = lora else {
            return Ok(());
        };
        let mut stale = Vec::new();
        for g in FOLDABLE {
            if self.folded_width(s, lora, layer, g).is_none() {
                continue;
            }
            for p in g.members() {
                if let Some(slot) = lp.slot(layer, *p) {
                    let src = PadSource::of(lp, layer, slot);
                    stale.extend(self.proj[p.index()].weight.stale_pad(src));
                }
            }
        }
        write_pads(be, &mut stale)
    }

    /// The width of group `g`'s `t` when its LoRA is folded into its products: every member
    /// adapted and its weight laid out for this adapter ([`LayerWeights::fold_lora`]); another
    /// adapter, or none, runs unfolded on the same weights.
    fn folded_width(
        &self,
        s: &Shapes,
        lora: Option<&LoraParams<B>>,
        layer: usize,
        g: InputGroup,
    ) -> Option<usize> {
        let lp = lora?;
        let width = lp.group(layer, g)?.width();
        let laid_out = |p: &Projection| {
            lp.slot(layer, *p).is_some_and(|slot| {
                let want = s.fold_layout(*p, width, slot.member, slot.rank);
                self.proj[p.index()].weight.fold_layout() == Some(want)
            })
        };
        g.members().iter().all(laid_out).then_some(width)
    }

    /// `(rstd, norm, t_placed)`: the RMSNorm (weight `w`) of `x [n, hidden]` into rows with
    /// room for the group's `t` when it is folded (`folded`: its width); a `t` that a
    /// checkpoint kept (`kept_t`) goes beside the rows in the same launch
    /// ([`Backend::rms_norm_beside`]), and `t_placed` says so.
    fn norm_rows(
        &self,
        be: &B,
        s: &Shapes,
        w: &B::Tensor,
        x: &B::Tensor,
        folded: Option<usize>,
        kept_t: Option<&B::Tensor>,
    ) -> Result<(B::Tensor, B::Tensor, bool)> {
        let n = be.len(x) / s.hidden;
        let row = s.hidden + folded.unwrap_or(0);
        let mut rstd = be.empty(n, DType::F32)?;
        let mut norm = be.empty(n * row, be.compute_dtype())?;
        match (folded, kept_t) {
            (Some(_), Some(t)) => {
                be.rms_norm_beside(x, w, s.hidden, s.eps, (&mut norm, row), t, &mut rstd)?;
                Ok((rstd, norm, true))
            }
            _ => {
                be.rms_norm(x, w, s.hidden, s.eps, &mut norm, row, &mut rstd)?;
                Ok((rstd, norm, false))
            }
        }
    }

    /// `t = s · input A_gᵀ` of input group `g` ([`linear::lora_input`]) on `n` tokens, when a
    /// member is adapted: taken out of `kept` (a checkpoint's) when there, else computed.
    #[allow(clippy::too_many_arguments)]
    fn lora_input(
        &self,
        be: &B,
        s: &Shapes,
        g: InputGroup,
        adapter: Option<&GroupAdapter<'_, B>>,
        input: &B::Tensor,
        n: usize,
        kept: &mut LoraInputs<B>,
    ) -> Result<Option<B::Tensor>> {
        let Some(adapter) = adapter else {
            return Ok(None);
        };
        if let Some(t) = kept[g.index()].take() {
            return Ok(Some(t));
        }
        let in_f = s.dims(g.members()[0], 1).in_f;
        Ok(Some(linear::lora_input(be, n, in_f, input, adapter)?))
    }

    /// `outs[i] ← input Wᵀ (+ LoRA)` of each projection of input group `g` whose output is asked
    /// for (`None`: kept by a checkpoint, not run again), an NF4 weight's dense copy dropped or
    /// kept after (`after`); returns the group's `t = s · input A_gᵀ`
    /// ([`LayerWeights::lora_input`]) when a member is adapted. When the group is folded
    /// (`folded`: [`LayerWeights::folded_width`]), `input` is `[x | room for t]` and `t` goes
    /// into it, unless the norm that made `input` placed it already (`t_placed`:
    /// [`LayerWeights::norm_rows`]).
    #[allow(clippy::too_many_arguments)]
    fn project_group(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        g: InputGroup,
        (input, folded, t_placed): (&mut B::Tensor, Option<usize>, bool),
        n: usize,
        outs: &mut [Option<&mut B::Tensor>],
        kept_t: &mut LoraInputs<B>,
        (after, onto): (Dequantized, Onto<'_, B>),
    ) -> Result<Option<B::Tensor>> {
        assert_eq!(outs.len(), g.members().len(), "one output per member");
        if let Onto::Residual(_) = onto {
            assert_eq!(
                outs.len(),
                1,
                "a residual stream under a one-member group only"
            );
        }
        let adapter = group_adapter(lora, layer, g);
        let t = self.lora_input(be, s, g, adapter.as_ref(), input, n, kept_t)?;
        if let (Some(width), Some(t), false) = (folded, &t, t_placed) {
            let in_f = s.dims(g.members()[0], 1).in_f;
            be.place_block(
                n,
                width,
                0..width,
                (t, MatAt::dense(width)),
                (input, MatAt::at(in_f, in_f + width)),
            )?;
        }
        for (&p, out) in g.members().iter().zip(outs.iter_mut()) {
            let Some(out) = out else { continue };
            let d = s.dims(p, n);
            let term = match (&adapter, &t) {
                (Some(a), Some(t)) => a.params.slot(layer, p).map(|slot| match folded {
                    Some(_) => LoraTerm::Folded(PadSource::of(a.params, layer, slot)),
                    None => LoraTerm::Product {
                        adapter: a,
                        slot,
                        t,
                    },
                }),
                _ => None,
            };
            linear::forward(be, d, input, &self.proj[p.index()], term, after, onto, out)?;
        }
        Ok(t)
    }

    /// The attention half of the forward: `h = x + o_proj(attn(rope(q), rope(k), v))`. Returns
    /// what its backward needs and the residual `h`; given what an offloaded checkpoint kept
    /// (`reused`: the attention output, its log-sum-exp, v and perhaps k), attention, the o
    /// projection and the kept projections are not run again and `h` is not returned; the LoRA
    /// inputs in `kept_t` are taken instead of recomputed. `dense`: what becomes of the q/k/v
    /// products' NF4 dense copies (kept where a backward's `dx` products follow at once).
    #[allow(clippy::too_many_arguments)]
    fn attention_half(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        attend: Attend<'_, B>,
        x: B::Tensor,
        reused: Option<ReusedAttention<B>>,
        kept_t: &mut LoraInputs<B>,
        dense: Dequantized,
    ) -> Result<(AttentionSaved<B>, Option<B::Tensor>)> {
        let n = be.len(&x) / s.hidden;
        let dt = be.compute_dtype();
        let mut lora_t: LoraInputs<B> = Default::default();
        let qkv = InputGroup::Qkv;
        let fold1 = self.folded_width(s, lora, layer, qkv);
        let (rstd1, mut norm1, t1_placed) = self.norm_rows(
            be,
            s,
            &self.input_norm,
            &x,
            fold1,
            kept_t[qkv.index()].as_ref(),
        )?;
        let (kept_attention, kept_k, kept_v) = match reused {
            Some(r) => (Some((r.attn, r.lse)), r.k, r.v),
            None => (None, None, None),
        };
        let (project_k, project_v) = (kept_k.is_none(), kept_v.is_none());
        let mut q = be.empty(n * s.q_dim, dt)?;
        let mut k = kept_k.map_or_else(|| be.empty(n * s.kv_dim, dt), Ok)?;
        let mut v = kept_v.map_or_else(|| be.empty(n * s.kv_dim, dt), Ok)?;
        lora_t[qkv.index()] = self.project_group(
            be,
            s,
            layer,
            lora,
            qkv,
            (&mut norm1, fold1, t1_placed),
            n,
            &mut [
                Some(&mut q),
                project_k.then_some(&mut k),
                project_v.then_some(&mut v),
            ],
            kept_t,
            (dense, Onto::Nothing),
        )?;
        let (mut q, mut k, qk_raw) = match &self.qk_norm {
            Some([wq, wk]) => {
                if !project_k {
                    bail!("a kept k is after its per-head norm, whose backward needs it before");
                }
                let (q, q_raw) = head_norm(be, s, q, wq)?;
                let (k, k_raw) = head_norm(be, s, k, wk)?;
                (q, k, Some([q_raw, k_raw]))
            }
            None => (q, k, None),
        };
        let (positions, cos, sin) = attend.rope_tables();
        be.rope(&mut q, positions, cos, sin, s.heads, s.head_dim, false)?;
        if project_k {
            be.rope(&mut k, positions, cos, sin, s.kv_heads, s.head_dim, false)?;
        }
        let o = InputGroup::O;
        let (attn, lse, mid) = match kept_attention {
            Some((attn, lse)) => {
                let adapter = group_adapter(lora, layer, o);
                lora_t[o.index()] =
                    self.lora_input(be, s, o, adapter.as_ref(), &attn, n, kept_t)?;
                (attn, Some(lse), None)
            }
            None => {
                let mut attn = be.empty(n * s.q_dim, dt)?;
                let lse = self.attend(be, s, attend, &q, &k, &v, &mut attn)?;
                let mut mid = be.empty(n * s.hidden, dt)?;
                lora_t[o.index()] = self.project_group(
                    be,
                    s,
                    layer,
                    lora,
                    o,
                    (&mut attn, None, false),
                    n,
                    &mut [Some(&mut mid)],
                    kept_t,
                    (Dequantized::Dropped, Onto::Residual(&x)),
                )?;
                (attn, lse, Some(mid))
            }
        };
        let saved = AttentionSaved {
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
        };
        Ok((saved, mid))
    }

    /// The MLP half of the forward: `y = h + down_proj(silu(gate_proj(m)) ⊙ up_proj(m))`,
    /// `m = rms2(h)`. Returns what its backward needs and, when `output`, `y`; the LoRA inputs
    /// in `kept_t` are taken instead of recomputed. The SwiGLU output is made only for what
    /// reads it here: the down projection, or its LoRA input when that is not kept. `dense`: what
    /// becomes of the gate/up products' NF4 dense copies (kept where a backward's `dx` products
    /// follow at once).
    #[allow(clippy::too_many_arguments)]
    fn mlp_half(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        mid: B::Tensor,
        output: bool,
        kept_t: &mut LoraInputs<B>,
        dense: Dequantized,
    ) -> Result<(MlpSaved<B>, Option<B::Tensor>)> {
        let n = be.len(&mid) / s.hidden;
        let dt = be.compute_dtype();
        let mut lora_t: LoraInputs<B> = Default::default();
        let gate_up = InputGroup::GateUp;
        let fold2 = self.folded_width(s, lora, layer, gate_up);
        let (rstd2, mut norm2, t2_placed) = self.norm_rows(
            be,
            s,
            &self.post_attention_norm,
            &mid,
            fold2,
            kept_t[gate_up.index()].as_ref(),
        )?;
        let mut gate = be.empty(n * s.inter, dt)?;
        let mut up = be.empty(n * s.inter, dt)?;
        lora_t[gate_up.index()] = self.project_group(
            be,
            s,
            layer,
            lora,
            gate_up,
            (&mut norm2, fold2, t2_placed),
            n,
            &mut [Some(&mut gate), Some(&mut up)],
            kept_t,
            (dense, Onto::Nothing),
        )?;
        let down = InputGroup::Down;
        let down_adapter = group_adapter(lora, layer, down);
        let needs_t = down_adapter.is_some() && kept_t[down.index()].is_none();
        let mut act = if output || needs_t {
            let mut act = be.empty(n * s.inter, dt)?;
            be.swiglu(&gate, &up, &mut act)?;
            Some(act)
        } else {
            None
        };
        let out = if let (true, Some(act)) = (output, &mut act) {
            let mut out = be.empty(n * s.hidden, dt)?;
            lora_t[down.index()] = self.project_group(
                be,
                s,
                layer,
                lora,
                down,
                (act, None, false),
                n,
                &mut [Some(&mut out)],
                kept_t,
                (Dequantized::Dropped, Onto::Residual(&mid)),
            )?;
            Some(out)
        } else {
            lora_t[down.index()] = match &act {
                Some(act) => self.lora_input(be, s, down, down_adapter.as_ref(), act, n, kept_t)?,
                None => kept_t[down.index()].take(),
            };
            None
        };
        drop(act);
        let saved = MlpSaved {
            mid,
            rstd2,
            norm2,
            gate,
            up,
            lora_t,
        };
        Ok((saved, out))
    }

    /// `attn = softmax(q kᵀ / √d) v` over the keys `attend` names; returns the log-sum-exp of each
    /// query's scores (training), or `None` for a cached (generation) step, which appends `k` and
    /// `v` to the layer's cache first.
    #[allow(clippy::too_many_arguments)]
    fn attend(
        &self,
        be: &B,
        s: &Shapes,
        attend: Attend<'_, B>,
        q: &B::Tensor,
        k: &B::Tensor,
        v: &B::Tensor,
        attn: &mut B::Tensor,
    ) -> Result<Option<B::Tensor>> {
        let n = be.len(q) / s.q_dim;
        match attend {
            Attend::Batch(batch) => {
                let mut lse = be.empty(n * s.heads, DType::F32)?;
                be.attention(
                    q,
                    k,
                    v,
                    &batch.layout,
                    &batch.doc_start,
                    s.heads,
                    s.kv_heads,
                    s.head_dim,
                    attn,
                    &mut lse,
                )?;
                Ok(Some(lse))
            }
            Attend::Cached(c) => {
                be.write_cache(k, c.k, c.rows, c.new, c.capacity, s.kv_dim, c.start)?;
                be.write_cache(v, c.v, c.rows, c.new, c.capacity, s.kv_dim, c.start)?;
                be.attention_cached(
                    q,
                    c.k,
                    c.v,
                    c.first_key,
                    c.rows,
                    c.new,
                    c.start + c.new,
                    c.capacity,
                    c.window,
                    s.heads,
                    s.kv_heads,
                    s.head_dim,
                    attn,
                )?;
                Ok(None)
            }
        }
    }
}
