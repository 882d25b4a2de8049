//! K-quants: f32 → Q4_K, Q5_K, Q6_K super-blocks of 256 values, byte for byte as llama.cpp's
//! reference quantizers write them (ggml-quants.c `quantize_row_q{4,5,6}_K_ref`, which
//! `llama-quantize` runs when it has no importance matrix).
//!
//! Layouts (ggml-common.h; f16 little-endian), and what [`super::dequant`] decodes:
//!
//! ```text
//! block_q4_K { f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }            144 B = 4.5 bits a value
//! block_q5_K { f16 d; f16 dmin; u8 scales[12]; u8 qh[32]; u8 qs[128]; }  176 B = 5.5 bits
//! block_q6_K { u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }            210 B = 6.5625 bits
//! ```
//!
//! **Q4_K, Q5_K** (b = 4, 5 bits): 8 sub-blocks of 32 values, each affine,
//! `x ≈ (d·sc_j)·q − dmin·m_j`, `q ∈ [0, 2^b − 1]`, with 6-bit `sc_j`, `m_j`.
//! 1. Per sub-block, [`fit_affine`] (ggml `make_qkx2_quants`) looks for the scale `s` and offset
//!    `m ≥ 0` minimising `Σ w_i (s·q_i − m − x_i)²` with `w_i = rms(x) + |x_i|`: it starts from the
//!    min–max grid, then tries the grids of `(nmax + rmin + 0.1k) / (max − min)` steps, k = 0..=nstep,
//!    each with the least-squares `s, m` of its levels (the 2×2 normal equations), and keeps the best.
//! 2. The eight `s_j` are stored as `sc_j = round(63 s_j / max s)` against `d = f16(max s / 63)`,
//!    the `m_j` likewise against `dmin`.
//! 3. Every value is quantized again against the scale and offset it will be decoded with:
//!    `q = clamp(round((x + dmin·m_j) / (d·sc_j)), 0, 2^b − 1)`.
//!
//! **Q6_K**: 16 sub-blocks of 16 values, symmetric, `x ≈ (d·sc_j)·(q − 32)`, `q ∈ [0, 63]`, `sc_j`
//! an i8. Per sub-block [`fit_symmetric`] (ggml `make_qx_quants`, rmse_type 1) tries the 19 grids
//! `−(32 + 0.1k) / max`, k = −9..=9 (`max`: the value of largest magnitude), with weights `x_i²`,
//! and keeps the least-squares scale of the best; the scales are stored as i8 against
//! `d = f16(−s_max / 128)` (`s_max`: the scale of largest magnitude), and the values requantized.
//!
//! Rounding is ggml's `nearest_int` (to nearest, ties to even), sums run in f32 in ggml's order with
//! no fused multiply-add (ggml-base is built without FMA on x86-64), and f16 conversions round to
//! nearest even: the bytes equal the C reference's, which the fixture test checks.

use half::f16;

/// Values per super-block (ggml `QK_K`).
pub const QK_K: usize = 256;
pub const Q4_K_BYTES: usize = 144;
pub const Q5_K_BYTES: usize = 176;
pub const Q6_K_BYTES: usize = 210;

/// Below this largest magnitude a group counts as all zero (ggml `GROUP_MAX_EPS`).
const GROUP_MAX_EPS: f32 = 1e-15;

/// ggml `nearest_int`: `x + 1.5·2²³` rounds to an integer, ties to even, for |x| < 2²²; the same
/// as `round_ties_even` there.
fn nearest_int(x: f32) -> i32 {
    x.round_ties_even() as i32
}

fn f16_bits(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

/// The value of `x` after storing it as f16.
fn through_f16(x: f32) -> f32 {
    f16::from_f32(x).to_f32()
}

/// `block_q4_K`: 8 affine sub-blocks of 32 4-bit values.
pub fn q4_k_block(x: &[f32], y: &mut [u8]) {
    let b = affine_super_block(x, 15, -1.0, 20);
    y[0..2].copy_from_slice(&b.d);
    y[2..4].copy_from_slice(&b.dmin);
    y[4..16].copy_from_slice(&b.scales);
    pack_nibbles(&b.q, &mut y[16..144]);
}

/// `block_q5_K`: as Q4_K with 5-bit values; bit 4 of value `32j + l` is bit `j` of `qh[l]`.
pub fn q5_k_block(x: &[f32], y: &mut [u8]) {
    let b = affine_super_block(x, 31, -0.5, 15);
    y[0..2].copy_from_slice(&b.d);
    y[2..4].copy_from_slice(&b.dmin);
    y[4..16].copy_from_slice(&b.scales);
    let qh = &mut y[16..48];
    qh.fill(0);
    for (v, &q) in b.q.iter().enumerate() {
        qh[v % 32] |= (q >> 4) << (v / 32);
    }
    // pack_nibbles keeps each value's low 4 bits (a u8 shift drops bit 4, stored in qh above).
    pack_nibbles(&b.q, &mut y[48..176]);
}

/// Q4_K/Q5_K's `qs`: value `64c + l` in the low nibble of `qs[32c + l]`, value `64c + 32 + l` in the
/// high one (c < 4, l < 32).
fn pack_nibbles(q: &[u8], qs: &mut [u8]) {
    for c in 0..4 {
        for l in 0..32 {
            qs[32 * c + l] = (q[64 * c + l] & 0x0F) | (q[64 * c + 32 + l] << 4);
        }
    }
}

/// A Q4_K/Q5_K super-block before its values are packed.
struct AffineSuperBlock {
    d: [u8; 2],
    dmin: [u8; 2],
    scales: [u8; 12],
    /// Levels in `[0, nmax]`, one per value.
    q: [u8; QK_K],
}

/// Steps 1–3 of the module comment for `nmax` = 15 (Q4_K) or 31 (Q5_K) and the grid search's
/// `rmin`, `nstep` (ggml: −1, 20 for Q4_K; −0.5, 15 for Q5_K).
fn affine_super_block(x: &[f32], nmax: u8, rmin: f32, nstep: usize) -> AffineSuperBlock {
    let mut q = [0u8; QK_K];
    let mut scales = [0f32; 8];
    let mut offsets = [0f32; 8];
    for (j, (xs, qs)) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).enumerate() {
        let sum_x2 = xs.iter().fold(0f32, |s, &v| s + v * v);
        let rms = (sum_x2 / 32.0).sqrt();
        let weights: [f32; 32] = std::array::from_fn(|i| rms + xs[i].abs());
        (scales[j], offsets[j]) = fit_affine(xs, &weights, nmax, rmin, nstep, qs);
    }
    // Comparisons as ggml's (`if (s > max) max = s`), from 0: negative scales never win.
    let max_scale = scales.iter().fold(0f32, |m, &s| if s > m { s } else { m });
    let max_offset = offsets.iter().fold(0f32, |m, &o| if o > m { o } else { m });
    let to_6_bits = |max: f32, v: f32| {
        let inverse = if max > 0.0 { 63.0 / max } else { 0.0 };
        // C stores the int in a uint8_t (wrapping) before MIN(63, ·).
        (nearest_int(inverse * v) as u8).min(63)
    };
    let sc: [u8; 8] = std::array::from_fn(|j| to_6_bits(max_scale, scales[j]));
    let m: [u8; 8] = std::array::from_fn(|j| to_6_bits(max_offset, offsets[j]));
    let (d, dmin) = (max_scale / 63.0, max_offset / 63.0);
    for j in 0..8 {
        let step = through_f16(d) * sc[j] as f32;
        if step == 0.0 {
            // ggml keeps the search's levels here; they decode to −dmin·m_j all the same.
            continue;
        }
        let offset = through_f16(dmin) * m[j] as f32;
        for (qi, &v) in q[32 * j..32 * j + 32].iter_mut().zip(&x[32 * j..]) {
            *qi = nearest_int((v + offset) / step).clamp(0, nmax as i32) as u8;
        }
    }
    AffineSuperBlock {
        d: f16_bits(d),
        dmin: f16_bits(dmin),
        scales: pack_scales_and_mins(&sc, &m),
        q,
    }
}

/// The 12 bytes of eight 6-bit scales and mins (the inverse of ggml `get_scale_min_k4`): bytes 0–3
/// and 4–7 hold scales and mins 0–3 in their low 6 bits and the top 2 bits of scales and mins 4–7 in
/// bits 6–7; bytes 8–11 hold the low 4 bits of scale (low nibble) and min (high nibble) 4–7.
fn pack_scales_and_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    s
}

/// ggml `make_qkx2_quants` (least squares, `rdelta` 0.1): the scale `s` and offset `m ≥ 0` of
/// `x ≈ s·q − m` for levels `q ∈ [0, nmax]` (written to `q`) minimising `Σ w (s·q − m − x)²` over
/// the grids of the module comment. Returns `(s, m)`.
fn fit_affine(x: &[f32], w: &[f32], nmax: u8, rmin: f32, nstep: usize, q: &mut [u8]) -> (f32, f32) {
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for (&v, &wi) in x.iter().zip(w).skip(1) {
        if v < min {
            min = v;
        }
        if v > max {
            max = v;
        }
        sum_w += wi;
        sum_x += wi * v;
    }
    // The offset only ever lowers the grid: a block of positive values starts at 0.
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        q.fill(0);
        return (0.0, -min);
    }
    let nmax_f = nmax as f32;
    let levels = |inverse: f32, min: f32, out: &mut [u8]| {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = nearest_int(inverse * (v - min)).clamp(0, nmax as i32) as u8;
        }
    };
    let weighted_error = |scale: f32, min: f32, levels: &[u8]| {
        levels
            .iter()
            .zip(x)
            .zip(w)
            .fold(0f32, |e, ((&l, &v), &wi)| {
                let diff = scale * l as f32 + min - v;
                e + wi * (diff * diff)
            })
    };
    let inverse = nmax_f / (max - min);
    let mut scale = 1.0 / inverse;
    levels(inverse, min, q);
    let mut best_error = weighted_error(scale, min, q);
    let mut trial = [0u8; 32];
    for k in 0..=nstep {
        let inverse = (rmin + 0.1 * k as f32 + nmax_f) / (max - min);
        levels(inverse, min, &mut trial);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for ((&l, &v), &wi) in trial.iter().zip(x).zip(w) {
            let l = l as f32;
            sum_l += wi * l;
            sum_l2 += wi * l * l;
            sum_xl += wi * l * v;
        }
        // Normal equations of min Σ w (s·l + b − x)²: D = Σw·Σwl² − (Σwl)².
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let error = weighted_error(this_scale, this_min, &trial);
            if error < best_error {
                q.copy_from_slice(&trial);
                best_error = error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `block_q6_K`: 16 symmetric sub-blocks of 16 6-bit values.
pub fn q6_k_block(x: &[f32], y: &mut [u8]) {
    let mut q = [0u8; QK_K];
    let mut scales = [0f32; 16];
    for (j, (xs, qs)) in x.chunks_exact(16).zip(q.chunks_exact_mut(16)).enumerate() {
        scales[j] = fit_symmetric(xs, qs);
    }
    let (mut max_scale, mut max_abs) = (0f32, 0f32);
    for &s in &scales {
        if s.abs() > max_abs {
            max_abs = s.abs();
            max_scale = s;
        }
    }
    y.fill(0);
    if max_abs < GROUP_MAX_EPS {
        return;
    }
    let inverse = -128.0 / max_scale;
    let d = 1.0 / inverse;
    y[208..210].copy_from_slice(&f16_bits(d));
    // C assigns MIN(127, ·) to an int8_t (wrapping; −128 is the smallest it can be).
    let sc: [i8; 16] = std::array::from_fn(|j| nearest_int(inverse * scales[j]).min(127) as i8);
    for j in 0..16 {
        y[192 + j] = sc[j] as u8;
        let step = through_f16(d) * sc[j] as f32;
        if step == 0.0 {
            continue;
        }
        for (qi, &v) in q[16 * j..16 * j + 16].iter_mut().zip(&x[16 * j..]) {
            *qi = (nearest_int(v / step).clamp(-32, 31) + 32) as u8;
        }
    }
    // Half h, value 128h + 32k + l: low 4 bits in nibble k/2 of ql[64h + l + 32(k mod 2)], high 2
    // bits in bits 2k, 2k+1 of qh[32h + l].
    for h in 0..2 {
        for l in 0..32 {
            let v: [u8; 4] = std::array::from_fn(|k| q[128 * h + 32 * k + l]);
            y[64 * h + l] = (v[0] & 0x0F) | ((v[2] & 0x0F) << 4);
            y[64 * h + l + 32] = (v[1] & 0x0F) | ((v[3] & 0x0F) << 4);
            y[128 + 32 * h + l] =
                (v[0] >> 4) | ((v[1] >> 4) << 2) | ((v[2] >> 4) << 4) | ((v[3] >> 4) << 6);
        }
    }
}

/// ggml `make_qx_quants(16, 32, x, L, 1, NULL)`: the scale `s` of `x ≈ s·l`, `l ∈ [−32, 31]`
/// (written to `q` as `l + 32`), the least-squares one under weights `x²` of the best of the grids
/// `l = round(−(32 + 0.1k)·x / max)`, k = −9..=9.
fn fit_symmetric(x: &[f32], q: &mut [u8]) -> f32 {
    const NMAX: f32 = 32.0;
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        q.fill(0);
        return 0.0;
    }
    let level = |inverse: f32, v: f32| nearest_int(inverse * v).clamp(-32, 31);
    let set_levels = |inverse: f32, q: &mut [u8]| {
        for (qi, &v) in q.iter_mut().zip(x) {
            *qi = (level(inverse, v) + 32) as u8;
        }
    };
    // Σ w·x·l and Σ w·l² with w = x².
    let sums = |inverse: f32| {
        x.iter().fold((0f32, 0f32), |(sum_lx, sum_l2), &v| {
            let (l, w) = (level(inverse, v) as f32, v * v);
            (sum_lx + w * v * l, sum_l2 + w * l * l)
        })
    };
    let inverse = -NMAX / max;
    set_levels(inverse, q);
    let (sum_lx, sum_l2) = sums(inverse);
    let mut scale = if sum_l2 != 0.0 { sum_lx / sum_l2 } else { 0.0 };
    // The weighted error of a grid is Σwx² − (Σwxl)²/Σwl²: the best grid has the largest
    // (Σwxl)²/Σwl² = scale · Σwxl.
    let mut best = scale * sum_lx;
    for k in (-9..=9).filter(|&k| k != 0) {
        let inverse = -(NMAX + 0.1 * k as f32) / max;
        let (sum_lx, sum_l2) = sums(inverse);
        if sum_l2 > 0.0 && sum_lx * sum_lx > best * sum_l2 {
            set_levels(inverse, q);
            scale = sum_lx / sum_l2;
            best = scale * sum_lx;
        }
    }
    scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequant::GgmlType;
    use crate::gguf::quant::QuantType;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn round_trip(ty: QuantType, x: &[f32]) -> Vec<f32> {
        GgmlType::from_id(ty.ggml_id())
            .unwrap()
            .dequantize(&ty.quantize(x))
            .unwrap()
    }

    /// `rms(back − x) / rms(x)`.
    fn relative_rms_error(x: &[f32], back: &[f32]) -> f64 {
        let err: f64 = x
            .iter()
            .zip(back)
            .map(|(&a, &b)| (a - b) as f64 * (a - b) as f64)
            .sum();
        let norm: f64 = x.iter().map(|&a| a as f64 * a as f64).sum();
        (err / norm).sqrt()
    }

    /// A weight-like matrix, `rows` × 1024: N(0, σ²) with σ = 0.02 scaled per row by 0.5–2, one
    /// value in 128 an outlier ×10 (Box–Muller over a seeded ChaCha8).
    fn weights(rows: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut out = Vec::with_capacity(rows * 1024);
        for _ in 0..rows {
            let row_scale = 0.02 * 2f32.powf(rng.random_range(-1.0..1.0));
            for _ in 0..1024 {
                let (u, v): (f32, f32) = (rng.random_range(f32::EPSILON..1.0), rng.random());
                let normal = (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos();
                let outlier = if rng.random_range(0..128) == 0 {
                    10.0
                } else {
                    1.0
                };
                out.push(normal * row_scale * outlier);
            }
        }
        out
    }

    #[test]
    fn bytes_equal_llama_cpp_reference_quantizers() {
        // scripts/make-kquant-fixture.py: super-blocks and their bytes from ggml-quants.c.
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/gguf/kquant-reference.safetensors");
        let file = std::fs::read(&path).unwrap();
        let fixture = safetensors::SafeTensors::deserialize(&file).unwrap();
        let values: Vec<f32> = fixture
            .tensor("values")
            .unwrap()
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        assert_eq!(values.len(), 24 * QK_K);
        for (name, ty, size) in [
            ("q4_k", QuantType::Q4_K, Q4_K_BYTES),
            ("q5_k", QuantType::Q5_K, Q5_K_BYTES),
            ("q6_k", QuantType::Q6_K, Q6_K_BYTES),
        ] {
            let want = fixture.tensor(name).unwrap();
            let got = ty.quantize(&values);
            assert_eq!(got.len(), want.data().len());
            for (b, (g, w)) in got.chunks(size).zip(want.data().chunks(size)).enumerate() {
                assert_eq!(g, w, "{name} super-block {b}");
            }
        }
    }

    #[test]
    fn round_trips_stay_within_a_step_and_a_half_of_the_super_blocks_grid() {
        let x = weights(64, 7);
        // (type, levels of the widest grid over ±amax, RMS error measured / bound): the widest
        // sub-block grid has a half step of amax/levels; clipped values and 6-bit sub-block scales
        // cost up to 1.10 (Q4_K), 0.99 (Q5_K), 1.03 (Q6_K) of it here.
        for (ty, levels, rms_bound) in [
            (QuantType::Q4_K, 15.0, 0.10),
            (QuantType::Q5_K, 31.0, 0.05),
            (QuantType::Q6_K, 64.0, 0.03),
        ] {
            let back = round_trip(ty, &x);
            for (b, (xs, ys)) in x.chunks(QK_K).zip(back.chunks(QK_K)).enumerate() {
                let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (a, c) in xs.iter().zip(ys) {
                    assert!(
                        (a - c).abs() <= 1.5 * amax / levels,
                        "{ty:?} super-block {b}: {a} → {c} (amax {amax})"
                    );
                }
            }
            let rms = relative_rms_error(&x, &back);
            assert!(rms < rms_bound, "{ty:?}: RMS error {rms:.5}");
            assert_eq!(round_trip(ty, &[0.0; QK_K]), vec![0.0; QK_K], "{ty:?}");
        }
    }

    #[test]
    fn k_quants_are_no_worse_than_the_legacy_types_of_their_size() {
        // RMS errors measured on this matrix: Q4_0 0.1385, Q4_1 0.0972, Q4_K 0.0909; Q5_0 0.0708,
        // Q5_1 0.0467, Q5_K 0.0455; Q8_0 0.00882, Q6_K 0.0260.
        let x = weights(64, 7);
        let rms = |ty| relative_rms_error(&x, &round_trip(ty, &x));
        // Same size (4.5 and 5.5 bits a value): a third less error.
        assert!(rms(QuantType::Q4_K) <= 0.75 * rms(QuantType::Q4_0));
        assert!(rms(QuantType::Q5_K) <= 0.75 * rms(QuantType::Q5_0));
        // Even against the affine types of half a bit more (5 and 6 bits).
        assert!(rms(QuantType::Q4_K) < rms(QuantType::Q4_1));
        assert!(rms(QuantType::Q5_K) < rms(QuantType::Q5_1));
        // 6.5625 bits against 8.5: 2 bits fewer would be 4× the error; it is 2.95×.
        assert!(rms(QuantType::Q6_K) <= 3.2 * rms(QuantType::Q8_0));
    }

    #[test]
    fn q4_k_block_by_hand() {
        // Sub-block j holds m_j·(l mod 16), l < 32, m = 1, 2, 4, 8, 1/2, 1/4, 8, 1: every level is
        // exact, so each sub-block's scale is m_j, its offset 0, and the super-block's d = f16(8/63) =
        // 0.126953125 (0x3010). 6-bit scales round(63·m_j/8): 7.875 → 8, 15.75 → 16, 31.5 → 32 (a
        // tie, to even), 63, 3.9375 → 4, 1.96875 → 2, 63, 8.
        let m = [1.0, 2.0, 4.0, 8.0, 0.5, 0.25, 8.0, 1.0];
        let x: Vec<f32> = (0..QK_K).map(|v| m[v / 32] * (v % 16) as f32).collect();
        let y = QuantType::Q4_K.quantize(&x);
        assert_eq!(&y[0..4], &[0x10, 0x30, 0x00, 0x00]);
        // Scales 0–3 in bytes 0–3, with the top 2 bits of scales 4–7 (only 63 = 0b11_1111 has
        // any) in bits 6–7: 32 | 3 << 6 = 0xE0; mins (all 0) in bytes 4–7; the low nibbles of
        // scales 4–7 (4, 2, 15, 8) in bytes 8–11.
        assert_eq!(
            &y[4..16],
            &[0x08, 0x10, 0xE0, 0x3F, 0, 0, 0, 0, 0x04, 0x02, 0x0F, 0x08]
        );
        // Levels are l mod 16 in both nibbles.
        for (l, &q) in y[16..].iter().enumerate() {
            assert_eq!(q, (l % 16) as u8 * 0x11, "qs[{l}]");
        }
        // Decoded with step d·sc_j: 4 · 15 comes back as 0.126953125 · 32 · 15.
        assert_eq!(round_trip(QuantType::Q4_K, &x)[2 * 32 + 15], 60.9375);
    }

    #[test]
    fn q6_k_block_by_hand() {
        // One value −1, the rest 0. Group 0: max = −1, every grid gives l = −32 for it (scale
        // 1/32); the others are all zero (scale 0). d = 1/(−128/(1/32)) = −2⁻¹² (f16 0x8C00), the
        // group's scale round(−4096/32) = −128, its step d·(−128) = 1/32: −1 → level −32 + 32 = 0,
        // each 0 → 32; the zero groups keep level 0.
        let mut x = [0f32; QK_K];
        x[0] = -1.0;
        let y = QuantType::Q6_K.quantize(&x);
        assert!(
            y[..128].iter().all(|&b| b == 0),
            "ql: low nibbles of 0 and 32"
        );
        // qh[l] bits 0–1: the top 2 bits of value l's level (32 → 2) for values 1–15.
        let mut qh = [0u8; 64];
        qh[1..16].fill(2);
        assert_eq!(&y[128..192], &qh);
        assert_eq!(y[192], 0x80);
        assert!(y[193..208].iter().all(|&b| b == 0));
        assert_eq!(&y[208..210], &[0x00, 0x8C]);
        assert_eq!(round_trip(QuantType::Q6_K, &x), x);
    }
}
