//! SwiGLU (Shazeer 2020): `out = silu(g) ⊙ u`, `silu(g) = g·σ(g)`.
//! Backward: `du = dout ⊙ silu(g)`, `dg = dout ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`, and the forward's
//! `out` again (same arithmetic, so the same bits) in `dout`'s place.
//! With the down projection's LoRA input term, `dout + s · u A` in `dout`'s place first.

use super::lanes::{sigmoid, wide};
use crate::{LoraInputTerm, MatAt};
use rayon::prelude::*;

/// Elements per parallel task.
const CHUNK: usize = 4096;

pub fn forward(gate: &[f32], up: &[f32], out: &mut [f32]) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((o, g), u)| {
            wide(
                #[inline(always)]
                || {
                    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                        *o = g * sigmoid(g) * u;
                    }
                },
            )
        });
}

pub fn backward(dout: &mut [f32], gate: &mut [f32], up: &mut [f32]) {
    gate.par_chunks_mut(CHUNK)
        .zip(up.par_chunks_mut(CHUNK))
        .zip(dout.par_chunks_mut(CHUNK))
        .for_each(|((gate, up), dout)| {
            wide(
                #[inline(always)]
                || {
                    for ((g, u), d) in gate.iter_mut().zip(up.iter_mut()).zip(dout.iter_mut()) {
                        let s = sigmoid(*g);
                        let (dg, du) = (*d * *u * s * (1.0 + *g * (1.0 - s)), *d * *g * s);
                        *d = *g * s * *u;
                        *g = dg;
                        *u = du;
                    }
                },
            )
        });
}

/// `dout [n, inter] += scale · u [n, rank] · A [rank, inter]`: per row, `Σ_k u[i, k] · A[k, :]`
/// summed over k in order, then scaled and added (the term [`backward`] then reads as `dout`).
/// The layouts are checked by the caller.
pub fn add_lora_input_term(dout: &mut [f32], term: &LoraInputTerm<'_, Vec<f32>>) {
    let (rank, inter) = (term.rank, term.inter);
    dout.par_chunks_mut(inter).enumerate().for_each_init(
        || vec![0.0f32; inter],
        |sum, (i, d)| {
            wide(
                #[inline(always)]
                || {
                    sum.fill(0.0);
                    for (k, &u) in row(term.u, term.u_at, i, rank).iter().enumerate() {
                        for (s, &a) in sum.iter_mut().zip(row(term.a, term.a_at, k, inter)) {
                            *s += u * a;
                        }
                    }
                    for (d, &s) in d.iter_mut().zip(sum.iter()) {
                        *d += term.scale * s;
                    }
                },
            )
        },
    );
}

/// Row `i` (its first `len` elements) of a matrix laid out in `t` as `at` says.
fn row(t: &[f32], at: MatAt, i: usize, len: usize) -> &[f32] {
    &t[at.offset + i * at.ld..][..len]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{check_gradient, dot, random};
    use crate::cpu::CpuBackend;
    use crate::Backend;

    #[test]
    fn backward_matches_finite_differences() {
        let n = 40;
        let gate: Vec<f32> = random(n, 1).iter().map(|v| 3.0 * v).collect();
        let up = random(n, 2);
        let probe = random(n, 3);
        let (mut dg, mut du, mut out) = (gate.clone(), up.clone(), probe.clone());
        backward(&mut out, &mut dg, &mut du);
        let mut forward_out = vec![0.0; n];
        forward(&gate, &up, &mut forward_out);
        assert_eq!(
            out, forward_out,
            "dout becomes the forward's output, bit for bit"
        );
        let run = |g: &[f32], u: &[f32]| {
            let mut o = vec![0.0; n];
            forward(g, u, &mut o);
            dot(&o, &probe)
        };
        check_gradient(&gate, &dg, 1e-2, 1e-3, |g| run(g, &up));
        check_gradient(&up, &du, 1e-2, 1e-3, |u| run(&gate, u));
    }

    /// `[n, inter]` inputs and a LoRA input term whose u and A lie inside larger tensors (behind
    /// an offset, rows wider than they hold).
    struct TermCase {
        n: usize,
        inter: usize,
        rank: usize,
        scale: f32,
        u: Vec<f32>,
        u_at: MatAt,
        a: Vec<f32>,
        a_at: MatAt,
    }

    impl TermCase {
        fn new(n: usize, inter: usize, rank: usize) -> Self {
            let (u_at, a_at) = (MatAt::at(3, rank + 2), MatAt::at(5, inter + 7));
            TermCase {
                n,
                inter,
                rank,
                scale: 0.75,
                u: random(u_at.extent(n, rank) + 4, 11),
                u_at,
                a: random(a_at.extent(rank, inter) + 1, 12),
                a_at,
            }
        }

        fn term(&self) -> LoraInputTerm<'_, Vec<f32>> {
            LoraInputTerm {
                u: &self.u,
                u_at: self.u_at,
                a: &self.a,
                a_at: self.a_at,
                rank: self.rank,
                inter: self.inter,
                scale: self.scale,
            }
        }

        /// `dout + scale · u A` written out in f64.
        fn naive_dout(&self, dout: &[f32]) -> Vec<f64> {
            let (u, a) = (&self.u, &self.a);
            let (u_at, a_at) = (self.u_at, self.a_at);
            (0..self.n * self.inter)
                .map(|e| {
                    let (i, j) = (e / self.inter, e % self.inter);
                    let sum: f64 = (0..self.rank)
                        .map(|k| {
                            let u_ik = u[u_at.offset + i * u_at.ld + k] as f64;
                            u_ik * a[a_at.offset + k * a_at.ld + j] as f64
                        })
                        .sum();
                    dout[e] as f64 + self.scale as f64 * sum
                })
                .collect()
        }
    }

    fn assert_close(got: &[f32], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}");
        for (e, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g as f64 - w).abs() <= tol * (1.0 + w.abs()),
                "{what} [{e}]: {g} against {w}"
            );
        }
    }

    /// The gradients with the term against the backward's formulas written out in f64 on
    /// `dout + s · u A`; the output is still the forward's, bit for bit.
    #[test]
    fn the_lora_input_term_is_added_to_dout_before_the_backward() {
        let be = CpuBackend::new();
        let case = TermCase::new(37, 21, 5);
        let len = case.n * case.inter;
        let gate: Vec<f32> = random(len, 1).iter().map(|v| 3.0 * v).collect();
        let up = random(len, 2);
        let dout = random(len, 3);
        let (mut dg, mut du, mut out) = (gate.clone(), up.clone(), dout.clone());
        be.swiglu_backward(&mut out, &mut dg, &mut du, Some(case.term()))
            .unwrap();
        let d = case.naive_dout(&dout);
        let sigmoid64 = |g: f64| 1.0 / (1.0 + (-g).exp());
        let (want_dg, want_du): (Vec<f64>, Vec<f64>) = (0..len)
            .map(|e| {
                let (g, u) = (gate[e] as f64, up[e] as f64);
                let s = sigmoid64(g);
                (d[e] * u * s * (1.0 + g * (1.0 - s)), d[e] * g * s)
            })
            .unzip();
        assert_close(&dg, &want_dg, 1e-5, "dgate");
        assert_close(&du, &want_du, 1e-5, "dup");
        let mut forward_out = vec![0.0; len];
        forward(&gate, &up, &mut forward_out);
        assert_eq!(out, forward_out, "dout becomes the forward's output");
    }

    /// The term inside the kernel equals the two steps it replaces: `dout += s · u A` by a
    /// product with `beta = 1`, then the plain backward (up to the sums' f32 order).
    #[test]
    fn the_lora_input_term_equals_a_product_into_dout_then_the_backward() {
        let be = CpuBackend::new();
        let case = TermCase::new(64, 136, 16);
        let len = case.n * case.inter;
        let gate: Vec<f32> = random(len, 4).iter().map(|v| 3.0 * v).collect();
        let (up, dout) = (random(len, 5), random(len, 6));
        let (mut dg, mut du, mut out) = (gate.clone(), up.clone(), dout.clone());
        be.swiglu_backward(&mut out, &mut dg, &mut du, Some(case.term()))
            .unwrap();
        let (mut dg2, mut du2, mut out2) = (gate, up, dout);
        be.gemm_at(
            case.n,
            case.inter,
            case.rank,
            case.scale,
            (&case.u, case.u_at),
            false,
            (&case.a, case.a_at),
            false,
            1.0,
            (&mut out2, MatAt::dense(case.inter)),
        )
        .unwrap();
        be.swiglu_backward(&mut out2, &mut dg2, &mut du2, None)
            .unwrap();
        let widen = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert_close(&dg, &widen(&dg2), 1e-5, "dgate");
        assert_close(&du, &widen(&du2), 1e-5, "dup");
        assert_eq!(
            out, out2,
            "the forward's output, which the term does not touch"
        );
    }

    #[test]
    fn a_lora_input_term_that_does_not_fit_is_refused() {
        let be = CpuBackend::new();
        let case = TermCase::new(4, 8, 2);
        let len = case.n * case.inter;
        let err = |mut term: LoraInputTerm<'_, Vec<f32>>,
                   edit: fn(&mut LoraInputTerm<'_, Vec<f32>>)| {
            edit(&mut term);
            let (mut d, mut g, mut u) = (vec![0.0; len], vec![0.0; len], vec![0.0; len]);
            be.swiglu_backward(&mut d, &mut g, &mut u, Some(term))
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(case.term(), |t| t.inter = 6),
            "swiglu_backward: dout (whole rows of the LoRA input term's inter elements) has 32 \
             elements, expected 36"
        );
        assert_eq!(
            err(case.term(), |t| t.inter = 0),
            "swiglu_backward: the LoRA input term's inter is 0; pass the row length of dout, \
             gate and up"
        );
        assert_eq!(
            err(case.term(), |t| t.u_at = MatAt::at(8, 4)),
            "swiglu_backward: LoRA u [4×2] at element 8 with rows 4 apart does not fit its \
             tensor of 21 elements"
        );
        assert_eq!(
            err(case.term(), |t| t.rank = 3),
            "swiglu_backward: LoRA A [3×8] at element 5 with rows 15 apart does not fit its \
             tensor of 29 elements"
        );
    }
}
