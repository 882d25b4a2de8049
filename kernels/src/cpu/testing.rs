//! Helpers for the CPU ops' tests: seeded random data and central finite differences.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in [-1, 1), the same for the same seed.
pub fn random(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

/// `Σ_i weights[i] · f(x)[i]`: a scalar loss whose gradient w.r.t. f's output is `weights`.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum()
}

/// Checks an analytic gradient `grad` of the scalar `loss(x)` against central differences at
/// every coordinate of `x` (f64 loss, step `h`), with relative tolerance `tol` of the largest |grad|.
pub fn check_gradient(
    x: &[f32],
    grad: &[f32],
    h: f32,
    tol: f64,
    mut loss: impl FnMut(&[f32]) -> f64,
) {
    let scale = grad
        .iter()
        .fold(0.0f64, |m, g| m.max(g.abs() as f64))
        .max(1e-6);
    let mut xp = x.to_vec();
    for i in 0..x.len() {
        xp[i] = x[i] + h;
        let up = loss(&xp);
        xp[i] = x[i] - h;
        let down = loss(&xp);
        xp[i] = x[i];
        let numeric = (up - down) / (2.0 * h as f64);
        let err = (numeric - grad[i] as f64).abs() / scale;
        assert!(
            err < tol,
            "coordinate {i}: analytic {} vs numeric {numeric} (rel err {err:.2e})",
            grad[i]
        );
    }
}
