//! Fused LM head + cross-entropy, chunked over rows so that only `[chunk, vocab]` logits exist.
//! Per row: `z = h Wᵀ`, `lse = log Σ exp z`, `logp = z_t − lse`. With a gradient weight `w`,
//! `dz = w · (softmax(z) − onehot(t))` (the derivative of `−w·logp`), then `dh = dz W`.

use super::lanes;
use super::matmul::gemm_f32;
use crate::{lm_head_chunk_rows, CeGrad, Result, IGNORE_INDEX};
use rayon::prelude::*;

#[allow(clippy::too_many_arguments)]
pub fn lm_head_cross_entropy(
    hidden: &[f32],
    weight: &[f32],
    targets: &[i32],
    hidden_dim: usize,
    vocab: usize,
    grad: CeGrad<'_, Vec<f32>>,
    logp: &mut [f32],
    mut dhidden: Option<&mut Vec<f32>>,
) -> Result<()> {
    let rows = targets.len();
    if let Some(&t) = targets
        .iter()
        .find(|&&t| t != IGNORE_INDEX && (t < 0 || t as usize >= vocab))
    {
        return Err(crate::KernelError::Unsupported(format!(
            "cross-entropy: target id {t} outside the vocabulary of {vocab}"
        )));
    }
    let chunk = lm_head_chunk_rows(rows, vocab);
    let mut logits = vec![0.0f32; chunk * vocab];
    for start in (0..rows).step_by(chunk) {
        let c = chunk.min(rows - start);
        let z = &mut logits[..c * vocab];
        gemm_f32(
            c,
            vocab,
            hidden_dim,
            1.0,
            &hidden[start * hidden_dim..][..c * hidden_dim],
            false,
            weight,
            true,
            0.0,
            z,
        );
        let weights: Vec<f32> = (start..start + c)
            .map(|r| match &grad {
                CeGrad::None => 0.0,
                CeGrad::Scale(s) => *s,
                CeGrad::PerRow(w) => w[r],
            })
            .collect();
        let want_grad = !matches!(grad, CeGrad::None);
        z.par_chunks_mut(vocab)
            .zip(logp[start..start + c].par_iter_mut())
            .enumerate()
            .for_each(|(r, (z, lp))| {
                let t = targets[start + r];
                if t == IGNORE_INDEX {
                    *lp = 0.0;
                    z.fill(0.0);
                    return;
                }
                lanes::wide(
                    #[inline(always)]
                    || {
                        let target = z[t as usize];
                        let max = lanes::max(z);
                        // z becomes exp(z − max); the softmax is that over its sum.
                        let sum = lanes::exp_shifted_in_place(z, max);
                        let lse = max + sum.ln();
                        *lp = target - lse;
                        if want_grad {
                            let w = weights[r] / sum;
                            z.iter_mut().for_each(|x| *x *= w);
                            z[t as usize] -= weights[r];
                        }
                    },
                )
            });
        if let Some(dh) = dhidden.as_deref_mut() {
            gemm_f32(
                c,
                hidden_dim,
                vocab,
                1.0,
                z,
                false,
                weight,
                false,
                0.0,
                &mut dh[start * hidden_dim..][..c * hidden_dim],
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::{check_gradient, random};

    #[test]
    fn gradient_matches_finite_differences_and_ignores_masked_rows() {
        let (rows, h, v) = (5, 6, 11);
        let hidden = random(rows * h, 1);
        let w = random(v * h, 2);
        let targets = vec![3, IGNORE_INDEX, 0, 10, 7];
        let row_w = vec![0.5, 9.0, 1.0, 2.0, 0.25];
        let loss = |x: &[f32]| {
            let mut lp = vec![0.0; rows];
            lm_head_cross_entropy(x, &w, &targets, h, v, CeGrad::None, &mut lp, None).unwrap();
            -lp.iter()
                .zip(&row_w)
                .map(|(a, b)| (*a as f64) * (*b as f64))
                .sum::<f64>()
        };
        let mut lp = vec![0.0; rows];
        let mut dh = vec![0.0; rows * h];
        lm_head_cross_entropy(
            &hidden,
            &w,
            &targets,
            h,
            v,
            CeGrad::PerRow(&row_w),
            &mut lp,
            Some(&mut dh),
        )
        .unwrap();
        assert_eq!(lp[1], 0.0);
        assert!(dh[h..2 * h].iter().all(|&g| g == 0.0));
        check_gradient(&hidden, &dh, 1e-2, 1e-3, loss);
    }

    #[test]
    fn log_probs_of_a_row_sum_to_one() {
        let (h, v) = (4, 7);
        let hidden = random(h, 3);
        let w = random(v * h, 4);
        let total: f64 = (0..v as i32)
            .map(|t| {
                let mut lp = vec![0.0];
                lm_head_cross_entropy(&hidden, &w, &[t], h, v, CeGrad::None, &mut lp, None)
                    .unwrap();
                (lp[0] as f64).exp()
            })
            .sum();
        assert!((total - 1.0).abs() < 1e-5);
    }
}
