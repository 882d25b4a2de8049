//! SwiGLU (Shazeer 2020): `out = silu(g) ⊙ u`, `silu(g) = g·σ(g)`.
//! Backward: `du = dout ⊙ silu(g)`, `dg = dout ⊙ u ⊙ σ(g)·(1 + g·(1 − σ(g)))`, and the forward's
//! `out` again (same arithmetic, so the same bits) in `dout`'s place.

use super::lanes::{sigmoid, wide};
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{check_gradient, dot, random};

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
}
