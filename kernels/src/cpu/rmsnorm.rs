//! RMSNorm (Zhang & Sennrich 2019), as transformers' `LlamaRMSNorm`:
//! `y = w ⊙ x · r` with `r = 1/sqrt(mean(x²) + eps)` per row.
//! Backward (w frozen): with `x̂ = x·r` and `g = w ⊙ dy`, `dx = r · (g − x̂ · mean(g ⊙ x̂))`.

use super::lanes;
use rayon::prelude::*;

pub fn forward(x: &[f32], w: &[f32], hidden: usize, eps: f32, y: &mut [f32], rstd: &mut [f32]) {
    y.par_chunks_mut(hidden)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(hidden))
        .for_each(|((y, r), x)| {
            lanes::wide(
                #[inline(always)]
                || {
                    let mean_sq = lanes::dot(x, x) / hidden as f32;
                    *r = 1.0 / (mean_sq + eps).sqrt();
                    for ((yi, xi), wi) in y.iter_mut().zip(x).zip(w) {
                        *yi = wi * (xi * *r);
                    }
                },
            )
        });
}

pub fn backward(dy: &[f32], x: &[f32], w: &[f32], rstd: &[f32], hidden: usize, dx: &mut [f32]) {
    dx.par_chunks_mut(hidden)
        .zip(dy.par_chunks(hidden))
        .zip(x.par_chunks(hidden))
        .zip(rstd.par_iter())
        .for_each(|(((dx, dy), x), &r)| {
            lanes::wide(
                #[inline(always)]
                || {
                    // mean(g ⊙ x̂) = r · Σ(dy ⊙ w ⊙ x) / hidden
                    let mean_gx = r * lanes::dot3(dy, w, x) / hidden as f32;
                    for (((dx, dy), w), x) in dx.iter_mut().zip(dy).zip(w).zip(x) {
                        *dx += r * (w * dy - x * r * mean_gx);
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
        let (rows, hidden) = (3, 16);
        let x = random(rows * hidden, 1);
        let w: Vec<f32> = random(hidden, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
        let probe = random(rows * hidden, 3);
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            let mut r = vec![0.0; rows];
            forward(x, &w, hidden, 1e-5, &mut y, &mut r);
            dot(&y, &probe)
        };
        let mut y = vec![0.0; x.len()];
        let mut r = vec![0.0; rows];
        forward(&x, &w, hidden, 1e-5, &mut y, &mut r);
        let mut dx = vec![0.0; x.len()];
        backward(&probe, &x, &w, &r, hidden, &mut dx);
        check_gradient(&x, &dx, 1e-2, 2e-3, loss);
    }

    #[test]
    fn backward_adds_into_dx() {
        let x = random(8, 1);
        let w = vec![1.0; 8];
        let mut y = vec![0.0; 8];
        let mut r = vec![0.0; 1];
        forward(&x, &w, 8, 1e-5, &mut y, &mut r);
        let mut once = vec![0.0; 8];
        backward(&y, &x, &w, &r, 8, &mut once);
        let mut twice = once.clone();
        backward(&y, &x, &w, &r, 8, &mut twice);
        for i in 0..8 {
            assert!((twice[i] - 2.0 * once[i]).abs() < 1e-6);
        }
    }
}
