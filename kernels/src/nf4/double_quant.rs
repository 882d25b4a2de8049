//! Double quantization of the NF4 absmax (bitsandbytes `compress_statistics=True`): the per-block
//! absmax is stored as 8-bit codes over the signed dynamic map `d` (tests/fixtures/README.md §8.1).
//!
//! ```text
//! offset = mean(absmax);  y[b] = absmax[b] − offset
//! nested_absmax[g] = max |y| over groups of 256 blocks
//! code[b] = code8(clamp(y[b] · f32(1/nested_absmax[g]), −1, 1))     (all codes 0 when nested_absmax = 0)
//! A[b] = f32(d[code[b]] · nested_absmax[g]) + offset                  (two roundings, no fused multiply-add)
//! ```
//!
//! `code8` is bitsandbytes' 65536-point grid lookup, not the exact nearest value:
//! `dm[j] = 0.5·(d[j] + d[j+1])`, `g[i] = −1 + 2i/65535`, `lut[i] = #{j : dm[j] < g[i]}`,
//! `code8(u) = lut[trunc(((u + 1)·0.5)·65535 + 0.5)]`, every step rounded to f32 in that order.

use super::DYNAMIC_MAP;
use std::sync::OnceLock;

/// Absmax blocks per nested group.
pub const NESTED_BLOCK: usize = 256;
/// Points of the uniform grid `code8` looks values up on.
const GRID: usize = 65536;

/// A weight's absmax in 8 bits.
#[derive(Clone, Debug, PartialEq)]
pub struct DoubleQuantAbsmax {
    /// One code per 64-element block, an index into [`DYNAMIC_MAP`].
    pub codes: Vec<u8>,
    /// One f32 scale per group of [`NESTED_BLOCK`] blocks.
    pub nested_absmax: Vec<f32>,
    /// The mean absmax subtracted before quantizing.
    pub offset: f32,
}

/// The f32 mean of the absmax: an f64 sum rounded once. bitsandbytes' pairwise f32 sum can land
/// one ulp away (the fixtures say so); checkpoints store their offset, so loading never recomputes it.
pub fn absmax_mean(absmax: &[f32]) -> f32 {
    let sum: f64 = absmax.iter().map(|&a| a as f64).sum();
    (sum / absmax.len().max(1) as f64) as f32
}

/// `lut[i]`: the dynamic-map code of grid point `g[i] = −1 + 2i/65535`.
pub fn code8_lut() -> &'static [u8] {
    static LUT: OnceLock<Vec<u8>> = OnceLock::new();
    LUT.get_or_init(|| {
        let mid: Vec<f32> = DYNAMIC_MAP
            .windows(2)
            .map(|p| 0.5 * (p[0] + p[1]))
            .collect();
        (0..GRID)
            .map(|i| {
                let g = -1.0 + (2 * i) as f32 / 65535.0;
                mid.iter().filter(|&&m| m < g).count() as u8
            })
            .collect()
    })
}

/// The 8-bit code of `u ∈ [−1, 1]` through the grid.
pub fn code8(u: f32) -> u8 {
    let t = ((u + 1.0) * 0.5) * 65535.0 + 0.5;
    code8_lut()[(t as usize).min(GRID - 1)]
}

/// `A[b] = f32(map[codes[b]] · nested_absmax[b / 256]) + offset`, two roundings.
pub fn decode_absmax(codes: &[u8], nested_absmax: &[f32], map: &[f32], offset: f32) -> Vec<f32> {
    codes
        .iter()
        .enumerate()
        .map(|(b, &c)| {
            let scaled = map[c as usize] * nested_absmax[b / NESTED_BLOCK];
            scaled + offset
        })
        .collect()
}

/// The exact nearest dynamic-map code `#{j : dm[j] < u}` (ties to the lower code). It differs
/// from [`code8`] only within about 1.5e−5 of a midpoint or for `|u| < 3e−5`.
pub fn nearest_code8(u: f32) -> u8 {
    DYNAMIC_MAP
        .windows(2)
        .filter(|p| 0.5 * (p[0] + p[1]) < u)
        .count() as u8
}

impl DoubleQuantAbsmax {
    /// Quantizes `absmax` around `offset` (take it from the checkpoint when re-quantizing one).
    pub fn quantize(absmax: &[f32], offset: f32) -> Self {
        Self::quantize_with(absmax, offset, code8)
    }

    /// [`DoubleQuantAbsmax::quantize`] with another 8-bit coder (e.g. [`nearest_code8`]).
    pub fn quantize_with(absmax: &[f32], offset: f32, code: fn(f32) -> u8) -> Self {
        let mut codes = Vec::with_capacity(absmax.len());
        let mut nested_absmax = Vec::with_capacity(absmax.len().div_ceil(NESTED_BLOCK));
        for group in absmax.chunks(NESTED_BLOCK) {
            let y: Vec<f32> = group.iter().map(|&a| a - offset).collect();
            let scale = y.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            nested_absmax.push(scale);
            if scale == 0.0 {
                codes.extend(std::iter::repeat_n(0, y.len()));
                continue;
            }
            let r = 1.0 / scale;
            codes.extend(y.iter().map(|&v| code((v * r).clamp(-1.0, 1.0))));
        }
        DoubleQuantAbsmax {
            codes,
            nested_absmax,
            offset,
        }
    }

    /// The decoded absmax `A[b]` of every block.
    pub fn decode(&self) -> Vec<f32> {
        decode_absmax(&self.codes, &self.nested_absmax, &DYNAMIC_MAP, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_ends_map_to_the_ends_of_the_dynamic_map() {
        assert_eq!(code8(-1.0), 0);
        assert_eq!(code8(1.0), 255);
        assert_eq!(DYNAMIC_MAP[127], 0.0);
    }

    #[test]
    fn a_constant_absmax_gets_zero_codes_and_decodes_to_the_offset() {
        let q = DoubleQuantAbsmax::quantize(&[0.5; 3], 0.5);
        assert_eq!(q.codes, vec![0, 0, 0]);
        assert_eq!(q.nested_absmax, vec![0.0]);
        assert_eq!(q.decode(), vec![0.5; 3]);
    }
}
