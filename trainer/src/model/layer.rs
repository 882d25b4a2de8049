//! One decoder layer (transformers' `LlamaDecoderLayer`), forward and backward:
//! `h = x + o_proj(attn(rope(q), rope(k), v))` with q/k/v projected from `rms1(x)`, then
//! `y = h + down_proj(silu(gate_proj(m)) ⊙ up_proj(m))` with `m = rms2(h)`.

use super::decoder::{Batch, Shapes};
use super::linear::{self, Dims};
use super::proj_weight::ProjWeight;
use super::Projection;
use crate::lora::LoraParams;
use anyhow::Result;
use kernels::{Backend, DType};

/// A layer's frozen weights, projections `[out, in]`.
pub struct LayerWeights<B: Backend> {
    pub input_norm: B::Tensor,
    pub post_attention_norm: B::Tensor,
    /// In [`Projection::ALL`] order.
    pub proj: [ProjWeight<B>; 7],
}

/// Everything the layer's backward needs from its forward.
pub struct LayerSaved<B: Backend> {
    /// The layer input `x [N, hidden]`.
    pub x: B::Tensor,
    rstd1: B::Tensor,
    norm1: B::Tensor,
    /// q after RoPE `[N, hq·d]`, k after RoPE and v `[N, hkv·d]`.
    q: B::Tensor,
    k: B::Tensor,
    v: B::Tensor,
    attn: B::Tensor,
    lse: B::Tensor,
    /// After the attention residual: `h [N, hidden]`.
    mid: B::Tensor,
    rstd2: B::Tensor,
    norm2: B::Tensor,
    gate: B::Tensor,
    up: B::Tensor,
    act: B::Tensor,
    /// `x Aᵀ` of each adapted projection, in [`Projection::ALL`] order.
    lora_t: [Option<B::Tensor>; 7],
}

pub(super) fn dims(s: &Shapes, proj: Projection, n: usize) -> Dims {
    let (out_f, in_f) = match proj {
        Projection::Q => (s.q_dim, s.hidden),
        Projection::K | Projection::V => (s.kv_dim, s.hidden),
        Projection::O => (s.hidden, s.q_dim),
        Projection::Gate | Projection::Up => (s.inter, s.hidden),
        Projection::Down => (s.hidden, s.inter),
    };
    Dims { n, in_f, out_f }
}

impl<B: Backend> LayerWeights<B> {
    /// Runs the layer on `x`; returns the output and what backward needs.
    pub fn forward(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        lora: Option<&LoraParams<B>>,
        batch: &Batch<B>,
        x: B::Tensor,
    ) -> Result<(B::Tensor, LayerSaved<B>)> {
        let n = batch.layout.tokens();
        let dt = be.compute_dtype();
        let slot = |p: Projection| lora.and_then(|l| l.slot(layer, p).map(|sl| (l, sl)));
        let mut lora_t: [Option<B::Tensor>; 7] = Default::default();
        let mut project = |p: Projection, input: &B::Tensor, out: &mut B::Tensor| -> Result<()> {
            lora_t[p.index()] = linear::forward(
                be,
                dims(s, p, n),
                input,
                &self.proj[p.index()],
                slot(p),
                out,
            )?;
            Ok(())
        };

        let mut rstd1 = be.empty(n, DType::F32)?;
        let mut norm1 = be.empty(n * s.hidden, dt)?;
        be.rms_norm(
            &x,
            &self.input_norm,
            s.hidden,
            s.eps,
            &mut norm1,
            &mut rstd1,
        )?;
        let mut q = be.empty(n * s.q_dim, dt)?;
        let mut k = be.empty(n * s.kv_dim, dt)?;
        let mut v = be.empty(n * s.kv_dim, dt)?;
        project(Projection::Q, &norm1, &mut q)?;
        project(Projection::K, &norm1, &mut k)?;
        project(Projection::V, &norm1, &mut v)?;
        be.rope(
            &mut q,
            &batch.positions,
            &batch.cos,
            &batch.sin,
            s.heads,
            s.head_dim,
            false,
        )?;
        be.rope(
            &mut k,
            &batch.positions,
            &batch.cos,
            &batch.sin,
            s.kv_heads,
            s.head_dim,
            false,
        )?;
        let mut attn = be.empty(n * s.q_dim, dt)?;
        let mut lse = be.empty(n * s.heads, DType::F32)?;
        be.attention(
            &q,
            &k,
            &v,
            &batch.layout,
            &batch.doc_start,
            s.heads,
            s.kv_heads,
            s.head_dim,
            &mut attn,
            &mut lse,
        )?;
        let mut mid = be.empty(n * s.hidden, dt)?;
        project(Projection::O, &attn, &mut mid)?;
        be.axpy(1.0, &x, &mut mid)?;

        let mut rstd2 = be.empty(n, DType::F32)?;
        let mut norm2 = be.empty(n * s.hidden, dt)?;
        be.rms_norm(
            &mid,
            &self.post_attention_norm,
            s.hidden,
            s.eps,
            &mut norm2,
            &mut rstd2,
        )?;
        let mut gate = be.empty(n * s.inter, dt)?;
        let mut up = be.empty(n * s.inter, dt)?;
        project(Projection::Gate, &norm2, &mut gate)?;
        project(Projection::Up, &norm2, &mut up)?;
        let mut act = be.empty(n * s.inter, dt)?;
        be.swiglu(&gate, &up, &mut act)?;
        let mut out = be.empty(n * s.hidden, dt)?;
        project(Projection::Down, &act, &mut out)?;
        be.axpy(1.0, &mid, &mut out)?;

        let saved = LayerSaved {
            x,
            rstd1,
            norm1,
            q,
            k,
            v,
            attn,
            lse,
            mid,
            rstd2,
            norm2,
            gate,
            up,
            act,
            lora_t,
        };
        Ok((out, saved))
    }

    /// Given `dy = dL/d(output)`, returns `dL/dx` and adds the LoRA gradients into `lora`.
    pub fn backward(
        &self,
        be: &B,
        s: &Shapes,
        layer: usize,
        mut lora: Option<&mut LoraParams<B>>,
        batch: &Batch<B>,
        sv: &LayerSaved<B>,
        dy: B::Tensor,
    ) -> Result<B::Tensor> {
        let n = batch.layout.tokens();
        let dt = be.compute_dtype();
        let mut project_back = |p: Projection,
                                dout: &B::Tensor,
                                input: &B::Tensor,
                                dinput: &mut B::Tensor,
                                accumulate: bool|
         -> Result<()> {
            let lp = lora
                .as_deref_mut()
                .and_then(|l| l.slot(layer, p).map(|sl| (l, sl)));
            linear::backward(
                be,
                dims(s, p, n),
                dout,
                input,
                &self.proj[p.index()],
                lp,
                sv.lora_t[p.index()].as_ref(),
                dinput,
                accumulate,
            )
        };

        // MLP block: y = h + down(act); dh starts as dy (residual).
        let mut dact = be.empty(n * s.inter, dt)?;
        project_back(Projection::Down, &dy, &sv.act, &mut dact, false)?;
        let mut dgate = be.empty(n * s.inter, dt)?;
        let mut dup = be.empty(n * s.inter, dt)?;
        be.swiglu_backward(&dact, &sv.gate, &sv.up, &mut dgate, &mut dup)?;
        let mut dnorm2 = be.empty(n * s.hidden, dt)?;
        project_back(Projection::Gate, &dgate, &sv.norm2, &mut dnorm2, false)?;
        project_back(Projection::Up, &dup, &sv.norm2, &mut dnorm2, true)?;
        let mut dmid = dy;
        be.rms_norm_backward(
            &dnorm2,
            &sv.mid,
            &self.post_attention_norm,
            &sv.rstd2,
            s.hidden,
            &mut dmid,
        )?;

        // Attention block: h = x + o(attn); dx starts as dh.
        let mut dattn = be.empty(n * s.q_dim, dt)?;
        project_back(Projection::O, &dmid, &sv.attn, &mut dattn, false)?;
        let mut dq = be.empty(n * s.q_dim, dt)?;
        let mut dk = be.empty(n * s.kv_dim, dt)?;
        let mut dv = be.empty(n * s.kv_dim, dt)?;
        be.attention_backward(
            &sv.q,
            &sv.k,
            &sv.v,
            &sv.attn,
            &sv.lse,
            &dattn,
            &batch.layout,
            &batch.doc_start,
            s.heads,
            s.kv_heads,
            s.head_dim,
            &mut dq,
            &mut dk,
            &mut dv,
        )?;
        be.rope(
            &mut dq,
            &batch.positions,
            &batch.cos,
            &batch.sin,
            s.heads,
            s.head_dim,
            true,
        )?;
        be.rope(
            &mut dk,
            &batch.positions,
            &batch.cos,
            &batch.sin,
            s.kv_heads,
            s.head_dim,
            true,
        )?;
        let mut dnorm1 = be.empty(n * s.hidden, dt)?;
        project_back(Projection::Q, &dq, &sv.norm1, &mut dnorm1, false)?;
        project_back(Projection::K, &dk, &sv.norm1, &mut dnorm1, true)?;
        project_back(Projection::V, &dv, &sv.norm1, &mut dnorm1, true)?;
        let mut dx = dmid;
        be.rms_norm_backward(
            &dnorm1,
            &sv.x,
            &self.input_norm,
            &sv.rstd1,
            s.hidden,
            &mut dx,
        )?;
        Ok(dx)
    }
}
