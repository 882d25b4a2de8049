//! RMSNorm (Zhang & Sennrich 2019), as transformers' `LlamaRMSNorm`:
//! `y = w ⊙ x · r` with `r = 1/sqrt(mean(x²) + eps)` per row.
//! Backward (w frozen): with `x̂ = x·r` and `g = w ⊙ dy`, `dx = r · (g − x̂ · mean(g ⊙ x̂))`.
//! `y` and `dy` may hold their rows `ld ≥ hidden` apart; only the first `hidden` columns of each
//! are touched.

use super::lanes;
use rayon::prelude::*;

/// `x [rows, hidden]` into `y` (rows `y_ld` apart, columns `hidden..y_ld` untouched), `rstd [rows]`.
pub fn forward(
    x: &[f32],
    w: &[f32],
    hidden: usize,
    eps: f32,
    (y, y_ld): (&mut [f32], usize),
    rstd: &mut [f32],
) {
    y.par_chunks_mut(y_ld)
        .zip(rstd.par_iter_mut())
        .zip(x.par_chunks(hidden))
        .for_each(|((y, r), x)| {
            lanes::wide(
                #[inline(always)]
                || {
                    let mean_sq = lanes::dot(x, x) / hidden as f32;
                    *r = 1.0 / (mean_sq + eps).sqrt();
                    for ((yi, xi), wi) in y[..hidden].iter_mut().zip(x).zip(w) {
                        *yi = wi * (xi * *r);
                    }
                },
            )
        });
}

/// Adds into `dx [rows, hidden]` from `dy [rows, hidden]`.
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
    use crate::cpu::CpuBackend;
    use crate::Backend;

    #[test]
    fn backward_matches_finite_differences() {
        let (rows, hidden) = (3, 16);
        let x = random(rows * hidden, 1);
        let w: Vec<f32> = random(hidden, 2).iter().map(|v| 1.0 + 0.3 * v).collect();
        let probe = random(rows * hidden, 3);
        let loss = |x: &[f32]| {
            let mut y = vec![0.0; x.len()];
            let mut r = vec![0.0; rows];
            forward(x, &w, hidden, 1e-5, (&mut y, hidden), &mut r);
            dot(&y, &probe)
        };
        let mut y = vec![0.0; x.len()];
        let mut r = vec![0.0; rows];
        forward(&x, &w, hidden, 1e-5, (&mut y, hidden), &mut r);
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
        forward(&x, &w, 8, 1e-5, (&mut y, 8), &mut r);
        let mut once = vec![0.0; 8];
        backward(&y, &x, &w, &r, 8, &mut once);
        let mut twice = once.clone();
        backward(&y, &x, &w, &r, 8, &mut twice);
        for i in 0..8 {
            assert!((twice[i] - 2.0 * once[i]).abs() < 1e-6);
        }
    }

    /// Rows `y_ld` apart: columns `0..hidden` hold the dense norm's bits, the pad keeps its values.
    #[test]
    fn strided_forward_writes_the_dense_norm_and_leaves_the_pad() {
        let be = CpuBackend::new();
        let (rows, hidden, y_ld) = (5, 24, 31);
        let x = random(rows * hidden, 4);
        let w: Vec<f32> = random(hidden, 5).iter().map(|v| 1.0 + 0.3 * v).collect();
        let (mut dense, mut rstd_dense) = (vec![0.0; rows * hidden], vec![0.0; rows]);
        be.rms_norm(&x, &w, hidden, 1e-5, &mut dense, hidden, &mut rstd_dense)
            .unwrap();
        let (mut y, mut rstd) = (vec![7.5; rows * y_ld], vec![0.0; rows]);
        be.rms_norm(&x, &w, hidden, 1e-5, &mut y, y_ld, &mut rstd)
            .unwrap();
        assert_eq!(rstd, rstd_dense);
        for r in 0..rows {
            assert_eq!(&y[r * y_ld..][..hidden], &dense[r * hidden..][..hidden]);
            assert!(y[r * y_ld + hidden..][..y_ld - hidden]
                .iter()
                .all(|&v| v == 7.5));
        }
    }

    #[test]
    fn overlapping_or_short_strided_rows_are_refused() {
        let be = CpuBackend::new();
        let (x, w) = (vec![1.0; 2 * 8], vec![1.0; 8]);
        let mut rstd = vec![0.0; 2];
        let e = be
            .rms_norm(&x, &w, 8, 1e-5, &mut vec![0.0; 2 * 6], 6, &mut rstd)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "rms_norm: y's rows are 6 elements apart, fewer than the 8 each holds"
        );
        let e = be
            .rms_norm(&x, &w, 8, 1e-5, &mut vec![0.0; 2 * 10 - 2], 10, &mut rstd)
            .unwrap_err();
        assert_eq!(e.to_string(), "rms_norm: y has 18 elements, expected 20");
        let e = be
            .rms_norm_backward(&vec![0.0; 2 * 12], &x, &w, &rstd, 8, &mut vec![0.0; 16])
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "rms_norm_backward: dy has 24 elements, expected 16"
        );
    }
}
