//! A frozen projection (weight, optional bias) with an optional LoRA adapter, forward and backward.
//!
//! Forward:  `y = b + x Wᵀ + s · t Bᵀ` with `t = x Aᵀ` (saved for backward); the bias and the
//! LoRA term are laid down first and the frozen GEMM accumulates onto them (`beta = 1`), as torch's
//! `addmm`: cuBLAS reads `y` inside its epilogue, so the wide `[n, out]` output makes one trip
//! through memory.
//! Backward: `dx (+)= dy W + s · u A` with `u = dy B`;  `dB += s · dyᵀ t`;  `dA += s · uᵀ x`
//! (the bias is frozen and `dx` does not depend on it).
//! An NF4 `W` is dequantized right before each of its two GEMMs and dropped after (QLoRA).

use super::proj_weight::ProjWeight;
use crate::lora::{LoraParams, LoraSlot};
use anyhow::Result;
use kernels::Backend;

/// A frozen projection: `W [out, in]` and, in families that have one, the bias `b [out]`.
pub struct FrozenLinear<B: Backend> {
    pub weight: ProjWeight<B>,
    pub bias: Option<B::Tensor>,
}

/// Shapes of one projection call: `n` tokens, `in_f` → `out_f` features.
#[derive(Clone, Copy)]
pub struct Dims {
    pub n: usize,
    pub in_f: usize,
    pub out_f: usize,
}

/// `y ← b + x Wᵀ (+ s · (x Aᵀ) Bᵀ)`; returns `t = x Aᵀ [n, r]` when the projection is adapted.
pub fn forward<B: Backend>(
    be: &B,
    d: Dims,
    x: &B::Tensor,
    frozen: &FrozenLinear<B>,
    lora: Option<(&LoraParams<B>, LoraSlot)>,
    y: &mut B::Tensor,
) -> Result<Option<B::Tensor>> {
    let mut beta = match &frozen.bias {
        Some(b) => {
            be.broadcast_rows(b, y)?;
            1.0
        }
        None => 0.0,
    };
    let t = lora_input(be, d, x, lora)?;
    if let (Some((lp, slot)), Some(t)) = (lora, &t) {
        let b = &lp.compute[slot.a + 1];
        be.gemm(
            d.n,
            d.out_f,
            slot.rank,
            slot.scaling,
            t,
            false,
            b,
            true,
            beta,
            y,
        )?;
        beta = 1.0;
    }
    frozen.weight.with_dense(be, |w| {
        Ok(be.gemm(d.n, d.out_f, d.in_f, 1.0, x, false, w, true, beta, y)?)
    })?;
    Ok(t)
}

/// `t = x Aᵀ [n, r]` of an adapted projection (what its backward needs); `None` when not adapted.
pub fn lora_input<B: Backend>(
    be: &B,
    d: Dims,
    x: &B::Tensor,
    lora: Option<(&LoraParams<B>, LoraSlot)>,
) -> Result<Option<B::Tensor>> {
    let Some((lp, slot)) = lora else {
        return Ok(None);
    };
    let mut t = be.empty(d.n * slot.rank, be.compute_dtype())?;
    be.gemm(
        d.n,
        slot.rank,
        d.in_f,
        1.0,
        x,
        false,
        &lp.compute[slot.a],
        true,
        0.0,
        &mut t,
    )?;
    Ok(Some(t))
}

/// Adds `dL/dx` into `dx` (or writes it when `accumulate` is false) and adds the LoRA gradients.
/// As in [`forward`], the LoRA term `s · u A` goes into `dx` first and the frozen GEMM adds onto it.
#[allow(clippy::too_many_arguments)]
pub fn backward<B: Backend>(
    be: &B,
    d: Dims,
    dy: &B::Tensor,
    x: &B::Tensor,
    w: &ProjWeight<B>,
    lora: Option<(&mut LoraParams<B>, LoraSlot)>,
    t: Option<&B::Tensor>,
    dx: &mut B::Tensor,
    accumulate: bool,
) -> Result<()> {
    let mut beta = if accumulate { 1.0 } else { 0.0 };
    if let (Some((lp, slot)), Some(t)) = (lora, t) {
        let r = slot.rank;
        let s = slot.scaling;
        // dB [out, r] += s · dyᵀ [out, n] · t [n, r]
        be.gemm(
            d.out_f,
            r,
            d.n,
            s,
            dy,
            true,
            t,
            false,
            1.0,
            &mut lp.grads[slot.a + 1],
        )?;
        // u [n, r] = dy [n, out] · B [out, r]
        let mut u = be.empty(d.n * r, be.compute_dtype())?;
        be.gemm(
            d.n,
            r,
            d.out_f,
            1.0,
            dy,
            false,
            &lp.compute[slot.a + 1],
            false,
            0.0,
            &mut u,
        )?;
        // dA [r, in] += s · uᵀ [r, n] · x [n, in]
        be.gemm(
            r,
            d.in_f,
            d.n,
            s,
            &u,
            true,
            x,
            false,
            1.0,
            &mut lp.grads[slot.a],
        )?;
        // dx [n, in] (+)= s · u [n, r] · A [r, in]
        be.gemm(
            d.n,
            d.in_f,
            r,
            s,
            &u,
            false,
            &lp.compute[slot.a],
            false,
            beta,
            dx,
        )?;
        beta = 1.0;
    }
    w.with_dense(be, |w| {
        Ok(be.gemm(d.n, d.in_f, d.out_f, 1.0, dy, false, w, false, beta, dx)?)
    })?;
    Ok(())
}
