//! The deterministic uniform fill of `Backend::fill_random`:
//! `t[i] = scale · (2u − 1)`, `u = (splitmix64(seed + splitmix64(i)) >> 40) · 2⁻²⁴ ∈ [0, 1)`.
//! A pure function of `(seed, i)`, identical to `cuda/random.cu`.

use rayon::prelude::*;

/// Sebastiano Vigna's splitmix64 finaliser.
pub fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The value at index `i`.
pub fn uniform_at(seed: u64, i: u64, scale: f32) -> f32 {
    let u = (splitmix64(seed.wrapping_add(splitmix64(i))) >> 40) as f32 * (1.0 / 16_777_216.0);
    scale * (2.0 * u - 1.0)
}

/// Fills `t` with [`uniform_at`] values.
pub fn fill(t: &mut [f32], seed: u64, scale: f32) {
    t.par_iter_mut()
        .enumerate()
        .for_each(|(i, x)| *x = uniform_at(seed, i as u64, scale));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_uniform_in_range_with_the_expected_moments() {
        let mut t = vec![0.0; 200_000];
        fill(&mut t, 7, 0.5);
        assert!(t.iter().all(|&x| (-0.5..0.5).contains(&x)));
        let mean = t.iter().map(|&x| x as f64).sum::<f64>() / t.len() as f64;
        let var = t.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / t.len() as f64;
        assert!(mean.abs() < 3e-3, "mean {mean}");
        // Uniform on [−s, s): variance s²/3.
        assert!((var - 0.25 / 3.0).abs() < 1e-3, "variance {var}");
    }

    #[test]
    fn the_fill_depends_on_seed_and_index_only() {
        let mut a = vec![0.0; 1000];
        let mut b = vec![0.0; 10];
        fill(&mut a, 3, 1.0);
        fill(&mut b, 3, 1.0);
        assert_eq!(&a[..10], &b[..]);
        let mut c = vec![0.0; 10];
        fill(&mut c, 4, 1.0);
        assert_ne!(b, c);
        assert_eq!(splitmix64(0), 0xe220_a839_7b1d_cdaf);
    }
}
