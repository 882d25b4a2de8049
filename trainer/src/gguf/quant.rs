//! f32 → ggml tensor types. F16/BF16 and the legacy 32-value types are bit-exact with gguf-py's
//! reference quantizers (`gguf.quants.quantize`, gguf 0.19), which are written to match
//! `quantize_row_*_ref` of ggml-quants.c; the K-quants ([`super::kquant`]) follow ggml-quants.c itself.
//!
//! Every step is done in f32 in the same order as there (one rounding per operation, no fused
//! multiply-add), and scales are rounded to f16 with round-to-nearest-even like numpy's `astype`.
//! The block layouts are the ones [`super::dequant`] reads.

use super::kquant::{self, QK_K};
use half::{bf16, f16};
use rayon::prelude::*;

/// A ggml type `export-gguf` can write a tensor in (ggml's names).
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantType {
    F32,
    F16,
    Bf16,
    Q8_0,
    Q4_0,
    Q4_1,
    Q5_0,
    Q5_1,
    Q4_K,
    Q5_K,
    Q6_K,
}

impl QuantType {
    /// The ggml type id (ggml.h `enum ggml_type`).
    pub fn ggml_id(self) -> u32 {
        match self {
            QuantType::F32 => 0,
            QuantType::F16 => 1,
            QuantType::Q4_0 => 2,
            QuantType::Q4_1 => 3,
            QuantType::Q5_0 => 6,
            QuantType::Q5_1 => 7,
            QuantType::Q8_0 => 8,
            QuantType::Q4_K => 12,
            QuantType::Q5_K => 13,
            QuantType::Q6_K => 14,
            QuantType::Bf16 => 30,
        }
    }

    /// Values per block (1 for the float types): a row must hold whole blocks.
    pub fn block_elements(self) -> usize {
        match self {
            QuantType::F32 | QuantType::F16 | QuantType::Bf16 => 1,
            QuantType::Q4_K | QuantType::Q5_K | QuantType::Q6_K => QK_K,
            _ => 32,
        }
    }

    /// Whether it is a block-quantized type (files of those carry `general.quantization_version`).
    pub fn is_quantized(self) -> bool {
        self.block_elements() > 1
    }

    /// Encodes `values` (whole blocks) as this type's little-endian bytes.
    pub fn quantize(self, values: &[f32]) -> Vec<u8> {
        match self {
            QuantType::F32 => values.iter().flat_map(|x| x.to_le_bytes()).collect(),
            QuantType::F16 => values
                .iter()
                .flat_map(|&x| f16::from_f32(x).to_le_bytes())
                .collect(),
            QuantType::Bf16 => values
                .iter()
                .flat_map(|&x| bf16::from_f32(x).to_le_bytes())
                .collect(),
            QuantType::Q8_0 => blocks(values, 32, 34, q8_0_block),
            QuantType::Q4_0 => blocks(values, 32, 18, q4_0_block),
            QuantType::Q4_1 => blocks(values, 32, 20, q4_1_block),
            QuantType::Q5_0 => blocks(values, 32, 22, q5_0_block),
            QuantType::Q5_1 => blocks(values, 32, 24, q5_1_block),
            QuantType::Q4_K => blocks(values, QK_K, kquant::Q4_K_BYTES, kquant::q4_k_block),
            QuantType::Q5_K => blocks(values, QK_K, kquant::Q5_K_BYTES, kquant::q5_k_block),
            QuantType::Q6_K => blocks(values, QK_K, kquant::Q6_K_BYTES, kquant::q6_k_block),
        }
    }
}

/// Quantizes every `block_elements`-value block of `values` with `block`, in parallel.
fn blocks(
    values: &[f32],
    block_elements: usize,
    block_bytes: usize,
    block: fn(&[f32], &mut [u8]),
) -> Vec<u8> {
    assert!(
        values.len().is_multiple_of(block_elements),
        "{} values are not whole blocks of {block_elements}",
        values.len()
    );
    let mut out = vec![0u8; values.len() / block_elements * block_bytes];
    out.par_chunks_mut(block_bytes)
        .zip(values.par_chunks(block_elements))
        .for_each(|(y, x)| block(x, y));
    out
}

fn put_f16(y: &mut [u8], at: usize, v: f32) {
    y[at..at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// The value of largest magnitude, with its sign (numpy `argmax` of `abs`: the first one on ties).
fn signed_absmax(x: &[f32]) -> f32 {
    let mut best = x[0];
    for &v in &x[1..] {
        if v.abs() > best.abs() {
            best = v;
        }
    }
    best
}

/// `1 / d`, or 0 for an all-zero block (gguf-py: `np.where(d == 0, 0, 1 / d)`).
fn inverse(d: f32) -> f32 {
    if d == 0.0 {
        0.0
    } else {
        1.0 / d
    }
}

/// Q8_0: `d = amax / 127`, `q = round_half_away(x / d)` (as `x · (1/d)`).
fn q8_0_block(x: &[f32], y: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    put_f16(y, 0, d);
    for (q, &v) in y[2..34].iter_mut().zip(x) {
        // f32::round rounds half away from zero, like gguf-py's np_roundf and C's roundf.
        *q = ((v * id).round() as i8) as u8;
    }
}

/// Packs 32 values of 4 bits: byte `j` holds value `j` (low nibble) and value `j + 16` (high).
fn pack_nibbles(q: &[u8; 32], qs: &mut [u8]) {
    for j in 0..16 {
        qs[j] = (q[j] & 0x0F) | (q[j + 16] << 4);
    }
}

/// Bit 4 of value `i` as bit `i` of a little-endian u32.
fn pack_high_bits(q: &[u8; 32], qh: &mut [u8]) {
    let bits = q
        .iter()
        .enumerate()
        .fold(0u32, |acc, (i, &v)| acc | (((v >> 4) as u32 & 1) << i));
    qh.copy_from_slice(&bits.to_le_bytes());
}

/// Symmetric types (Q4_0, Q5_0): `d = max / −half`, `q = trunc(x · (1/d) + half + 0.5)` clipped to
/// `[0, 2·half − 1]`, where `max` is the signed value of largest magnitude.
fn symmetric(x: &[f32], half: f32) -> (f32, [u8; 32]) {
    let d = signed_absmax(x) / -half;
    let id = inverse(d);
    let top = (2.0 * half - 1.0) as u8;
    let mut q = [0u8; 32];
    for (qi, &v) in q.iter_mut().zip(x) {
        // `as u8` saturates negatives to 0, numpy's `.clip(0, top)` after the cast does the rest.
        *qi = ((v * id + (half + 0.5)).trunc() as u8).min(top);
    }
    (d, q)
}

/// Affine types (Q4_1, Q5_1): `d = (max − min) / levels`, `q = trunc((x − min) · (1/d) + 0.5)`.
fn affine(x: &[f32], levels: f32) -> (f32, f32, [u8; 32]) {
    let max = x.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let min = x.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let d = (max - min) / levels;
    let id = inverse(d);
    let mut q = [0u8; 32];
    for (qi, &v) in q.iter_mut().zip(x) {
        *qi = (((v - min) * id + 0.5).trunc() as u8).min(levels as u8);
    }
    (d, min, q)
}

/// `block_q4_0 { f16 d; u8 qs[16]; }`
fn q4_0_block(x: &[f32], y: &mut [u8]) {
    let (d, q) = symmetric(x, 8.0);
    put_f16(y, 0, d);
    pack_nibbles(&q, &mut y[2..18]);
}

/// `block_q5_0 { f16 d; u8 qh[4]; u8 qs[16]; }`
fn q5_0_block(x: &[f32], y: &mut [u8]) {
    let (d, q) = symmetric(x, 16.0);
    put_f16(y, 0, d);
    pack_high_bits(&q, &mut y[2..6]);
    pack_nibbles(&q, &mut y[6..22]);
}

/// `block_q4_1 { f16 d; f16 m; u8 qs[16]; }`
fn q4_1_block(x: &[f32], y: &mut [u8]) {
    let (d, min, q) = affine(x, 15.0);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    pack_nibbles(&q, &mut y[4..20]);
}

/// `block_q5_1 { f16 d; f16 m; u8 qh[4]; u8 qs[16]; }`
fn q5_1_block(x: &[f32], y: &mut [u8]) {
    let (d, min, q) = affine(x, 31.0);
    put_f16(y, 0, d);
    put_f16(y, 2, min);
    pack_high_bits(&q, &mut y[4..8]);
    pack_nibbles(&q, &mut y[8..24]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gguf::dequant::GgmlType;

    fn dequantize(ty: QuantType, bytes: &[u8]) -> Vec<f32> {
        GgmlType::from_id(ty.ggml_id())
            .unwrap()
            .dequantize(bytes)
            .unwrap()
    }

    /// Deterministic values spread over a few orders of magnitude, with exact zeros and ties.
    fn sample(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let t = (i as f32 * 0.618_034).fract() - 0.5;
                match i % 97 {
                    0 => 0.0,
                    1 => 0.25,
                    _ => t * (1 + i % 7) as f32 * 0.01,
                }
            })
            .collect()
    }

    #[test]
    fn q8_0_block_by_hand() {
        // amax 127 → d = 1: each value rounds half away from zero; 2.5 → 3, −2.5 → −3.
        let mut x = [0f32; 32];
        x[0] = 127.0;
        x[1] = 2.5;
        x[2] = -2.5;
        x[3] = 0.49;
        let y = QuantType::Q8_0.quantize(&x);
        assert_eq!(&y[..2], &[0x00, 0x3C]);
        assert_eq!(&y[2..6], &[127, 3, (-3i8) as u8, 0]);
    }

    #[test]
    fn q4_0_block_by_hand() {
        // max = −8 → d = 1, id = 1: q = trunc(x + 8.5): −8 → 0, 7 → 15, 0.4 → 8, −0.6 → 7.
        let mut x = [0f32; 32];
        x[0] = -8.0;
        x[1] = 7.0;
        x[16] = 0.4;
        x[17] = -0.6;
        let y = QuantType::Q4_0.quantize(&x);
        assert_eq!(&y[..2], &[0x00, 0x3C]);
        assert_eq!((y[2], y[3]), (0x80, 0x7F));
    }

    #[test]
    fn an_all_zero_block_quantizes_to_zero_scale() {
        for ty in [
            QuantType::Q8_0,
            QuantType::Q4_0,
            QuantType::Q4_1,
            QuantType::Q5_0,
            QuantType::Q5_1,
        ] {
            let back = dequantize(ty, &ty.quantize(&[0.0; 64]));
            assert_eq!(back, vec![0.0; 64], "{ty:?}");
        }
    }

    #[test]
    fn round_trips_stay_within_half_a_step_of_each_block() {
        let x = sample(32 * 64);
        // (type, levels across a block's range): the error bound is half a step plus f16 scale rounding.
        for (ty, steps, symmetric) in [
            (QuantType::Q8_0, 127.0, true),
            (QuantType::Q4_0, 8.0, true),
            (QuantType::Q5_0, 16.0, true),
            (QuantType::Q4_1, 15.0, false),
            (QuantType::Q5_1, 31.0, false),
        ] {
            let back = dequantize(ty, &ty.quantize(&x));
            for (b, (xb, yb)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let range = if symmetric {
                    amax
                } else {
                    xb.iter().cloned().fold(f32::MIN, f32::max)
                        - xb.iter().cloned().fold(f32::MAX, f32::min)
                };
                let step = range / steps;
                for (a, c) in xb.iter().zip(yb) {
                    // Q4_0/Q5_0 put the largest value at the end of the grid (−8 d), so values of
                    // the other sign clip one step short: a full step there.
                    let bound = if symmetric && ty != QuantType::Q8_0 {
                        1.01 * step
                    } else {
                        0.51 * step + 2e-3 * amax
                    };
                    assert!(
                        (a - c).abs() <= bound,
                        "{ty:?} block {b}: {a} → {c} (step {step})"
                    );
                }
            }
        }
    }

    #[test]
    fn float_types_round_to_nearest_even() {
        let x = [1.0 + 2f32.powi(-11), 1.0 + 3.0 * 2f32.powi(-11), 65520.0];
        let f16s = QuantType::F16.quantize(&x);
        assert_eq!(
            dequantize(QuantType::F16, &f16s),
            vec![1.0, 1.0 + 2f32.powi(-9), f32::INFINITY]
        );
        let b = QuantType::Bf16.quantize(&[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)]);
        assert_eq!(
            dequantize(QuantType::Bf16, &b),
            vec![1.0, 1.0 + 2f32.powi(-6)]
        );
    }
}
