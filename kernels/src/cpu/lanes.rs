//! Loops the compiler turns into SIMD on stable Rust (no `std::simd`): reductions keep `LANES`
//! independent partial sums that are combined in one fixed order at the end, and `exp` is a
//! branch-free polynomial instead of a libm call. The order of every sum depends only on the
//! slice length, so results are the same bits on every run and for any thread count.

/// Runs `f` compiled for AVX-512, or for AVX2 and FMA, when the CPU has them (as `gemm` picks
/// its kernels at run time), else as built (SSE2): the loops inlined into `f` then use 16- or
/// 8-wide registers. The results are the same bits on every path: Rust never fuses `a * b + c`
/// into an FMA by itself, and each reduction's order is written out in the loop, so the width
/// changes only the speed. Mark the closure `#[inline(always)]` (and what it calls, as the
/// functions here are): code that is not inlined into the wrapper is compiled without the
/// features.
#[inline(always)]
pub fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::is_x86_feature_detected as has;
        // SAFETY (both calls): the CPU has the features the callee is compiled for.
        if has!("avx512f") {
            return unsafe { avx512(f) };
        }
        if has!("avx2") && has!("fma") {
            return unsafe { avx2_fma(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Independent accumulators per reduction: wide enough for two AVX-512 registers.
const LANES: usize = 16;

/// `log2(e)`, and `ln 2` split in a short high part (exact in `n · LN2_HI`) and the rest.
const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// Adding 1.5·2²³ rounds to the nearest integer and leaves it in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
/// Below this `e^x` is under the smallest normal f32 and flushed to 0; above the other, +∞.
const EXP_MIN: f32 = -87.0;
const EXP_MAX: f32 = 88.0;

/// `e^x` within 2 ulp of the exact value for `x` in [−87, 88] (Cephes' `expf`):
/// `x = n·ln2 + r` with `|r| ≤ ln2/2`, `e^r ≈ 1 + r + r²·p(r)` (degree-5 minimax `p`), and
/// `2ⁿ` written into the exponent bits. `e^x = 0` below −87 (so `exp(−∞) = 0`), `+∞` above 88,
/// NaN stays NaN.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // NaN flows through the clamp (and the comparisons below) to the result.
    let xc = x.clamp(EXP_MIN, EXP_MAX);
    let t = xc * LOG2E + ROUND;
    let n = t - ROUND;
    let r = (xc - n * LN2_HI) - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    // The integer n sits in t's low bits: 2ⁿ has the biased exponent n + 127.
    let n_int = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let two_n = f32::from_bits((n_int.wrapping_add(127) << 23) as u32);
    if x < EXP_MIN {
        0.0
    } else if x > EXP_MAX {
        f32::INFINITY
    } else {
        er * two_n
    }
}

/// `σ(g) = 1/(1 + e^−g)`.
#[inline(always)]
pub fn sigmoid(g: f32) -> f32 {
    1.0 / (1.0 + exp(-g))
}

/// Adds the lanes pairwise: a fixed tree, the same for every call.
#[inline(always)]
fn combine(mut acc: [f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    while width > 0 {
        for i in 0..width {
            acc[i] += acc[i + width];
        }
        width /= 2;
    }
    acc[0]
}

/// `Σᵢ f(i)` over `0..len` in `LANES` interleaved partial sums.
#[inline(always)]
fn lane_sum(len: usize, f: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let full = len / LANES * LANES;
    for base in (0..full).step_by(LANES) {
        for (l, a) in acc.iter_mut().enumerate() {
            *a += f(base + l);
        }
    }
    for (a, i) in acc.iter_mut().zip(full..len) {
        *a += f(i);
    }
    combine(acc)
}

/// `Σ xᵢ`.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    lane_sum(x.len(), |i| x[i])
}

/// `Σ aᵢ bᵢ` over the shorter of the two.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    lane_sum(n, |i| a[i] * b[i])
}

/// `Σ aᵢ bᵢ cᵢ` over the shortest of the three.
#[inline(always)]
pub fn dot3(a: &[f32], b: &[f32], c: &[f32]) -> f32 {
    let n = a.len().min(b.len()).min(c.len());
    let (a, b, c) = (&a[..n], &b[..n], &c[..n]);
    lane_sum(n, |i| a[i] * b[i] * c[i])
}

/// `max xᵢ` (−∞ for an empty slice; NaN entries are skipped, as by `f32::max`).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = if v > *a { v } else { *a };
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v))
}

/// `xᵢ ← e^(xᵢ − shift)`, returning `Σᵢ e^(xᵢ − shift)`.
#[inline(always)]
pub fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
    for v in x.iter_mut() {
        *v = exp(*v - shift);
    }
    sum(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testing::random;

    #[test]
    fn exp_is_within_two_ulp_of_the_exact_value() {
        let mut worst = 0.0f64;
        for i in 0..=200_000 {
            let x = -87.0 + 175.0 * (i as f32 / 200_000.0);
            let exact = (x as f64).exp();
            let ulp = f32::EPSILON as f64 * exact;
            worst = worst.max((exp(x) as f64 - exact).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn reductions_match_f64_sums() {
        for len in [0, 1, 15, 16, 17, 100, 1000] {
            let a = random(len, 1);
            let b = random(len, 2);
            let c = random(len, 3);
            let s: f64 = a.iter().map(|&v| v as f64).sum();
            let d: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
            let d3: f64 = (0..len)
                .map(|i| a[i] as f64 * b[i] as f64 * c[i] as f64)
                .sum();
            assert!((sum(&a) as f64 - s).abs() < 1e-4, "len {len}");
            assert!((dot(&a, &b) as f64 - d).abs() < 1e-4, "len {len}");
            assert!((dot3(&a, &b, &c) as f64 - d3).abs() < 1e-4, "len {len}");
            let m = a.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
            assert_eq!(max(&a), m, "len {len}");
        }
    }

    #[test]
    fn wide_registers_give_the_same_bits() {
        let x: Vec<f32> = random(1003, 5).iter().map(|v| 40.0 * v).collect();
        let run = |x: &[f32]| {
            let mut e = x.to_vec();
            let total = exp_shifted_in_place(&mut e, 1.5);
            let sig: Vec<u32> = x.iter().map(|&v| sigmoid(v).to_bits()).collect();
            let e: Vec<u32> = e.iter().map(|v| v.to_bits()).collect();
            (
                e,
                sig,
                total.to_bits(),
                dot3(x, x, x).to_bits(),
                max(x).to_bits(),
            )
        };
        assert_eq!(
            wide(
                #[inline(always)]
                || run(&x)
            ),
            run(&x)
        );
    }

    #[test]
    fn shifted_exp_returns_the_sum_of_what_it_wrote() {
        let mut x = random(37, 4);
        let orig = x.clone();
        let total = exp_shifted_in_place(&mut x, 0.5);
        for (e, o) in x.iter().zip(&orig) {
            assert!((e - (o - 0.5).exp()).abs() <= 2.0 * f32::EPSILON * e);
        }
        assert_eq!(total, sum(&x));
    }
}
