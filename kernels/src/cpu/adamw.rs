//! `torch.optim.AdamW`, single-tensor path (Loshchilov & Hutter 2019, decoupled weight decay):
//! `p ← p(1 − lr·wd)`, `m ← m + (1−β1)(g − m)` (torch's `lerp_`), `v ← β2 v + (1−β2) g²`,
//! `p ← p − (lr/(1−β1ᵗ)) · m / (sqrt(v)/sqrt(1−β2ᵗ) + eps)`. Scalars in f64 as Python computes them.

use crate::AdamWParams;

pub fn step(
    p: &mut [f32],
    g: &[f32],
    m: &mut [f32],
    v: &mut [f32],
    hp: &AdamWParams,
    t: u64,
    grad_scale: f32,
) {
    // Every scalar is formed in f64 and rounded once to f32, as torch does with Python floats.
    let bias1 = 1.0 - hp.beta1.powi(t as i32);
    let bias2_sqrt = (1.0 - hp.beta2.powi(t as i32)).sqrt() as f32;
    let step_size = (hp.lr / bias1) as f32;
    let decay = (1.0 - hp.lr * hp.weight_decay) as f32;
    let (one_minus_b1, b2, one_minus_b2) = (
        (1.0 - hp.beta1) as f32,
        hp.beta2 as f32,
        (1.0 - hp.beta2) as f32,
    );
    let eps = hp.eps as f32;
    for i in 0..p.len() {
        let gi = g[i] * grad_scale;
        p[i] *= decay;
        m[i] += one_minus_b1 * (gi - m[i]);
        v[i] = b2 * v[i] + one_minus_b2 * gi * gi;
        let denom = v[i].sqrt() / bias2_sqrt + eps;
        p[i] -= step_size * m[i] / denom;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_step_moves_each_weight_by_about_lr_against_its_gradient() {
        let hp = AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut p = vec![1.0, -1.0];
        let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
        step(&mut p, &[0.5, -2.0], &mut m, &mut v, &hp, 1, 1.0);
        assert!((p[0] - (1.0 - 1e-3)).abs() < 1e-6);
        assert!((p[1] - (-1.0 + 1e-3)).abs() < 1e-6);
    }

    /// `Backend::adamw` with its compute copies and zeroing equals the step, then
    /// `copy_many_into` and `fill_zero_many`.
    #[test]
    fn the_backend_step_writes_the_copies_and_zeroes_as_the_separate_calls_do() {
        use crate::{AfterUpdate, Backend};
        let be = crate::cpu::CpuBackend::new();
        let hp = AdamWParams {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let fresh = || {
            let p = vec![vec![1.0, -2.0, 0.5], vec![0.25; 5]];
            let g = vec![vec![0.3, -0.1, 0.2], vec![-0.5; 5]];
            let moments = vec![vec![0.0; 3], vec![0.0; 5]];
            (p, g, moments.clone(), moments)
        };
        let at = [1, 6];
        let (mut p, mut g, mut m, mut v) = fresh();
        let mut copies = vec![9.0; 11];
        let after = AfterUpdate {
            compute: Some((&mut copies, &at[..])),
            zero_grads: true,
        };
        be.adamw(&mut p, &mut g, &mut m, &mut v, &hp, 2, 0.5, after)
            .unwrap();
        let (mut p2, mut g2, mut m2, mut v2) = fresh();
        let nothing = AfterUpdate::nothing();
        be.adamw(&mut p2, &mut g2, &mut m2, &mut v2, &hp, 2, 0.5, nothing)
            .unwrap();
        let mut copies2 = vec![9.0; 11];
        be.copy_many_into(&p2, &mut copies2, &at).unwrap();
        be.fill_zero_many(&mut g2).unwrap();
        assert_eq!((p, m, v), (p2, m2, v2));
        assert_eq!(copies, copies2);
        assert_eq!(copies[0], 9.0, "outside the places stays");
        assert_eq!(g, g2);
        assert!(g.iter().flatten().all(|&x| x == 0.0));
    }

    #[test]
    fn weight_decay_is_decoupled_from_the_gradient() {
        let hp = AdamWParams {
            lr: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.5,
        };
        let mut p = vec![2.0];
        let (mut m, mut v) = (vec![0.0], vec![0.0]);
        step(&mut p, &[0.0], &mut m, &mut v, &hp, 1, 1.0);
        assert!((p[0] - 2.0 * 0.95).abs() < 1e-7);
    }
}
