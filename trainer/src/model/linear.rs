//! A frozen projection (weight, optional bias) with an optional LoRA adapter, forward and backward,
//! for the projections of an input group ([`crate::arch::InputGroup`]: q, k, v read one input,
//! gate and up another) together.
//!
//! Forward:  `t = s · x A_gᵀ` once for the group (`A_g = [A_q; A_k; A_v]` stacked, saved for
//! backward), then per projection `y = b + x Wᵀ + t_p Bᵀ` with `t_p` its columns of `t`: either
//! the LoRA term is its own product, laid down first with the bias so that the frozen GEMM
//! accumulates onto it (`beta = 1`), as torch's `addmm` (cuBLAS reads `y` inside its epilogue,
//! so the wide `[n, out]` output makes one trip through memory), or it is folded into the frozen
//! product (`[x | t] · [W | B]ᵀ`, [`LoraTerm::Folded`]; the caller lays `x` out with `t` beside it).
//! Backward: per projection `dB += dyᵀ t_p` and `u_p = dy B` (into its columns of `u`) from one
//! read of `dy` ([`Backend::lora_dy_products`]); then
//! where `dL/dx` is wanted (not below the bottom layer: the embedding is frozen) once for the group
//! `dx = s · u A_g`, per projection `dx += dy W` (the bias is frozen and `dx` does not depend on
//! it), and last, once for the group, `s · uᵀ x` (every member's
//! `dA_p += s · u_pᵀ x`): the only part that reads `x`, so it can wait for an `x` made later.
//! Stacking turns a group's skinny `x Aᵀ`, `uᵀ x` and `u A` products, which each stream all of
//! `x` or `dx` through memory for 16 columns, into one each.
//! An NF4 `W` is dequantized right before each of its two GEMMs and dropped after (QLoRA), or
//! kept from a recomputed forward's product for the backward's ([`Dequantized`]).
//! An input `x` may have wider rows than `in` (a folded group's `[x | t]`): its row length is
//! `len(x) / n`, and only the first `in` columns are `x`.

use super::proj_weight::{Dequantized, PadSource, ProjWeight};
use crate::lora::{GroupSlot, LoraParams, LoraSlot};
use anyhow::{bail, Result};
use kernels::{Backend, DType, MatAt};

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

/// An input group's adapter in one layer: the parameters and the group's stacked A.
pub struct GroupAdapter<'a, B: Backend> {
    pub params: &'a LoraParams<B>,
    pub group: GroupSlot,
}

/// `x [n, in]` inside `x`, whose rows may be wider ([`self`]).
fn input_at<B: Backend>(be: &B, n: usize, x: &B::Tensor) -> MatAt {
    MatAt::dense(be.len(x) / n.max(1))
}

/// `t = s · x A_gᵀ [n, members · r]`: the LoRA inputs of every adapted projection of the group on
/// `x [n, in]`, one product, scaled (so `t_p Bᵀ` is the LoRA term).
pub fn lora_input<B: Backend>(
    be: &B,
    n: usize,
    in_f: usize,
    x: &B::Tensor,
    adapter: &GroupAdapter<'_, B>,
) -> Result<B::Tensor> {
    let g = adapter.group;
    let mut t = be.empty(n * g.width(), be.compute_dtype())?;
    be.gemm_at(
        n,
        g.width(),
        in_f,
        g.scaling,
        (x, input_at(be, n, x)),
        false,
        (adapter.params.compute(), MatAt::at(g.a_at, in_f)),
        true,
        0.0,
        (&mut t, MatAt::dense(g.width())),
    )?;
    Ok(t)
}

/// A projection's LoRA term in [`forward`].
pub enum LoraTerm<'a, B: Backend> {
    /// `t_p Bᵀ` as its own product: the group's adapter, this projection's slot and the group's
    /// `t` ([`lora_input`]).
    Product {
        adapter: &'a GroupAdapter<'a, B>,
        slot: LoraSlot,
        t: &'a B::Tensor,
    },
    /// Folded into the frozen product: `x` is `[x | t]` and the weight's pad holds `B`
    /// ([`crate::model::proj_weight`]).
    Folded(PadSource<'a, B>),
}

/// What a projection's output starts from in [`forward`].
pub enum Onto<'a, B: Backend> {
    /// Nothing: `y = b + x Wᵀ (+ t_p Bᵀ)`.
    Nothing,
    /// A residual stream `r [n, out]`: `y = r + b + x Wᵀ (+ t_p Bᵀ)` (`h = x + o_proj(…)`), the
    /// first product reading `r` in its epilogue ([`Backend::gemm_residual`]) where there is no
    /// bias to lay down first.
    Residual(&'a B::Tensor),
}

// By hand: a derive would ask `B: Copy`, where only the reference is copied.
impl<B: Backend> Clone for Onto<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<B: Backend> Copy for Onto<'_, B> {}

/// How the next product of [`forward`] treats `y`.
enum Start<'a, B: Backend> {
    Write,
    Accumulate,
    Residual(&'a B::Tensor),
}

/// `y ← op(A) op(B)` started as `start` says, `y` a dense `[m, n]`.
fn product<B: Backend>(
    be: &B,
    start: &Start<'_, B>,
    (m, n, k): (usize, usize, usize),
    a: (&B::Tensor, MatAt),
    b: (&B::Tensor, MatAt),
    y: &mut B::Tensor,
) -> Result<()> {
    let y_at = MatAt::dense(n);
    match start {
        Start::Write => be.gemm_at(m, n, k, 1.0, a, false, b, true, 0.0, (y, y_at))?,
        Start::Accumulate => be.gemm_at(m, n, k, 1.0, a, false, b, true, 1.0, (y, y_at))?,
        Start::Residual(r) => be.gemm_residual(m, n, k, 1.0, a, false, b, true, r, y)?,
    }
    Ok(())
}

/// `y ← (r +) b + x Wᵀ (+ t_p Bᵀ)` (`onto`); an NF4 `W`'s dense copy is then dropped or kept
/// (`after`).
#[allow(clippy::too_many_arguments)]
pub fn forward<B: Backend>(
    be: &B,
    d: Dims,
    x: &B::Tensor,
    frozen: &FrozenLinear<B>,
    lora: Option<LoraTerm<'_, B>>,
    after: Dequantized,
    onto: Onto<'_, B>,
    y: &mut B::Tensor,
) -> Result<()> {
    let mut start = match (&frozen.bias, onto) {
        (Some(b), _) => {
            be.broadcast_rows(b, y)?;
            Start::Accumulate
        }
        (None, Onto::Residual(r)) => Start::Residual(r),
        (None, Onto::Nothing) => Start::Write,
    };
    let mut pad = None;
    match lora {
        Some(LoraTerm::Product { adapter, slot, t }) => {
            let (r, width) = (slot.rank, adapter.group.width());
            product(
                be,
                &start,
                (d.n, d.out_f, r),
                (t, MatAt::at(slot.member * r, width)),
                (adapter.params.compute(), MatAt::at(slot.b_at, r)),
                y,
            )?;
            start = Start::Accumulate;
        }
        Some(LoraTerm::Folded(src)) => pad = Some(src),
        None => {}
    }
    let x_at = input_at(be, d.n, x);
    let folded = pad.is_some();
    frozen.weight.with_dense(be, after, pad, |w| {
        // Folded: K runs over the pad too, `[x | t] · [W | B]ᵀ`.
        let k = match (folded, w.padded) {
            (true, Some(f)) if f.ld() == x_at.ld => f.ld(),
            (true, _) => bail!(
                "a folded product needs its input's rows ({}) as long as the padded weight's",
                x_at.ld
            ),
            (false, _) => d.in_f,
        };
        product(
            be,
            &start,
            (d.n, d.out_f, k),
            (x, x_at),
            (w.w, w.w_at(d.in_f)),
            y,
        )
    })?;
    if let (Some(_), Onto::Residual(r)) = (&frozen.bias, onto) {
        be.axpy(1.0, r, y)?;
    }
    Ok(())
}

/// One projection of a group in [`backward`]: its shapes, output gradient, frozen weight, and its
/// LoRA slot when adapted.
pub struct MemberGrad<'a, B: Backend> {
    pub d: Dims,
    pub dy: &'a B::Tensor,
    pub w: &'a ProjWeight<B>,
    pub slot: Option<LoraSlot>,
}

/// An adapted group in [`backward`]: the parameters, the group's stacked A, its forward's `t`,
/// and f32 `[n, width]` zeros for its `u` sums (a layer's groups' are zeroed in one launch).
pub struct GroupGrad<'a, B: Backend> {
    pub params: &'a mut LoraParams<B>,
    pub group: GroupSlot,
    pub t: &'a B::Tensor,
    pub u_sum: B::Tensor,
}

/// What [`backward_to_input`] leaves of an adapted group's backward for when its input `x` is
/// there: `u` stacked `[n, members · r]`, the parameters and the group, for [`lora_a_grads`].
pub struct PendingAGrads<'a, B: Backend> {
    u: B::Tensor,
    params: &'a mut LoraParams<B>,
    group: GroupSlot,
}

impl<B: Backend> PendingAGrads<'_, B> {
    /// The members' `dA` from the group's input `x` ([`lora_a_grads`]).
    pub fn add(self, be: &B, members: &[MemberGrad<'_, B>], x: &B::Tensor) -> Result<()> {
        lora_a_grads(be, members, self.params, self.group, &self.u, x)
    }
}

/// Writes `dL/dx` of every member of a group that reads `x` into `dx` (where one is wanted) and
/// adds the members' LoRA gradients into the adapter (`lora`): [`backward_to_input`], then
/// [`lora_a_grads`].
pub fn backward<B: Backend>(
    be: &B,
    members: &[MemberGrad<'_, B>],
    x: &B::Tensor,
    lora: Option<GroupGrad<'_, B>>,
    dx: Option<&mut B::Tensor>,
) -> Result<()> {
    match backward_to_input(be, members, lora, dx)? {
        Some(pending) => pending.add(be, members, x),
        None => Ok(()),
    }
}

/// The part of [`backward`] that does not read the input `x`: every member's `dB` and `u_p = dy B`
/// (stacked as `u [n, members · r]`, returned for [`lora_a_grads`] when the group is adapted) and
/// `dL/dx` where one is wanted (`dx`). As in [`forward`], the LoRA term `s · u A_g` goes into `dx`
/// first and the frozen GEMMs add onto it. [`PendingAGrads::add`] then takes `x`, which the caller
/// may make only now (the MLP's SwiGLU output comes out of its backward).
pub fn backward_to_input<'a, B: Backend>(
    be: &B,
    members: &[MemberGrad<'_, B>],
    lora: Option<GroupGrad<'a, B>>,
    dx: Option<&mut B::Tensor>,
) -> Result<Option<PendingAGrads<'a, B>>> {
    let Some(lora) = lora else {
        if let Some(dx) = dx {
            frozen_backward_to_input(be, members, dx, false)?;
        }
        return Ok(None);
    };
    let GroupGrad {
        params: lp,
        group,
        t,
        mut u_sum,
    } = lora;
    let Some(first) = members.first() else {
        bail!("an adapted input group without members");
    };
    let (n, in_f) = (first.d.n, first.d.in_f);
    let (r, s, width) = (group.rank, group.scaling, group.width());
    if be.len(&u_sum) != n * width {
        bail!(
            "the group's u sums hold {} values, not n · width = {n} · {width}",
            be.len(&u_sum)
        );
    }
    for m in members {
        let Some(slot) = m.slot else { continue };
        let cols = MatAt::at(slot.member * r, width);
        let (compute, grads) = lp.compute_and_grads();
        // dB [out, r] += dyᵀ [out, n] · t_p [n, r] (t is scaled by s) and
        // u_p [n, r] = dy [n, out] · B [out, r], both from one read of dy
        be.lora_dy_products(
            n,
            m.d.out_f,
            r,
            m.dy,
            (t, cols),
            (compute, MatAt::at(slot.b_at, r)),
            &mut grads[slot.a + 1],
            (&mut u_sum, cols),
        )?;
    }
    // u in the compute dtype, rounded once from its f32 sums as a GEMM's output is
    let mut u = be.empty(n * width, be.compute_dtype())?;
    be.copy(&u_sum, &mut u)?;
    drop(u_sum);
    if let Some(dx) = dx {
        // dx [n, in] = s · u [n, members · r] · A_g [members · r, in]
        be.gemm_at(
            n,
            in_f,
            width,
            s,
            (&u, MatAt::dense(width)),
            false,
            (lp.compute(), MatAt::at(group.a_at, in_f)),
            false,
            0.0,
            (dx, MatAt::dense(in_f)),
        )?;
        frozen_backward_to_input(be, members, dx, true)?;
    }
    Ok(Some(PendingAGrads {
        u,
        params: lp,
        group,
    }))
}

/// `dx (+)= Σ_p dy_p W_p` over the members' frozen weights (written first when not `accumulate`).
fn frozen_backward_to_input<B: Backend>(
    be: &B,
    members: &[MemberGrad<'_, B>],
    dx: &mut B::Tensor,
    accumulate: bool,
) -> Result<()> {
    let mut beta = if accumulate { 1.0 } else { 0.0 };
    let Some(first) = members.first() else {
        return Ok(());
    };
    let (n, in_f) = (first.d.n, first.d.in_f);
    for m in members {
        m.w.with_dense(be, Dequantized::Dropped, None, |w| {
            Ok(be.gemm_at(
                n,
                in_f,
                m.d.out_f,
                1.0,
                (m.dy, MatAt::dense(m.d.out_f)),
                false,
                (w.w, w.w_at(in_f)),
                false,
                beta,
                (dx, MatAt::dense(in_f)),
            )?)
        })?;
        beta = 1.0;
    }
    Ok(())
}

/// `dA_p [r, in] += s · u_pᵀ [r, n] · x [n, in]` for every adapted member, as one product
/// `s · uᵀ x [members · r, in]` (x read once, not once per member): straight into the gradient of
/// a lone member, else into a stacked result whose row blocks are added into the members'
/// gradients. `u` is [`backward_to_input`]'s ([`PendingAGrads`]).
fn lora_a_grads<B: Backend>(
    be: &B,
    members: &[MemberGrad<'_, B>],
    lp: &mut LoraParams<B>,
    group: GroupSlot,
    u: &B::Tensor,
    x: &B::Tensor,
) -> Result<()> {
    let Some(first) = members.first() else {
        return Ok(());
    };
    let (n, in_f) = (first.d.n, first.d.in_f);
    let (r, width) = (group.rank, group.width());
    let mut stacked = match group.members {
        1 => None,
        _ => Some(be.empty(width * in_f, DType::F32)?),
    };
    let (da, beta_da) = match &mut stacked {
        Some(st) => (st, 0.0),
        None => {
            let Some(slot) = members.iter().find_map(|m| m.slot) else {
                bail!("an adapted input group without an adapted member");
            };
            (&mut lp.grads[slot.a], 1.0)
        }
    };
    be.gemm_at(
        width,
        in_f,
        n,
        group.scaling,
        (u, MatAt::dense(width)),
        true,
        (x, input_at(be, n, x)),
        false,
        beta_da,
        (da, MatAt::dense(in_f)),
    )?;
    if let Some(st) = stacked {
        let offsets: Vec<(usize, usize)> = members
            .iter()
            .filter_map(|m| m.slot)
            .map(|slot| (slot.a, slot.member * r * in_f))
            .collect();
        let mut dsts: Vec<(usize, &mut B::Tensor)> = lp
            .grads
            .iter_mut()
            .enumerate()
            .filter_map(|(i, g)| {
                let (_, offset) = offsets.iter().find(|(a, _)| *a == i)?;
                Some((*offset, g))
            })
            .collect();
        be.axpy_from_many(1.0, &st, &mut dsts)?;
    }
    Ok(())
}
