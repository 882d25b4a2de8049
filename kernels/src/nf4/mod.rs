//! bitsandbytes' NF4 4-bit format (`quant_type="nf4"`, `blocksize=64`), host side and bit-exact.
//!
//! A weight `W [out, in]` is read row-major as one flat array `x[0..n)`; element `i` belongs to
//! block `i / 64` whatever the row (tests/fixtures/README.md §8.1).
//!
//! - quantize: `absmax[b] = max |x|` over the block; `v = clamp(x · f32(1/a), −1, 1)` with
//!   `a = max(absmax, 1e−38)` (a division `x / a` in a final partial block); `code = #{j : m[j] < v}`
//!   over the 15 midpoints `m[j] = (c[j] + c[j+1]) / 2` of the NF4 table `c` (ties take the lower code);
//! - pack: `byte[k] = code[2k] << 4 | code[2k+1]`, an odd `n` padded with code 7 (the value 0);
//! - dequantize: `W'[i] = c[code[i]] · absmax[i / 64]`, one f32 product;
//! - double quantization ([`double_quant`]) stores the absmax itself in 8 bits.
//!
//! The same quantization and dequantization run on a backend through
//! [`crate::Backend::quantize_nf4`] and [`crate::Backend::dequantize_nf4`], which hold the packed
//! bytes as little-endian i32 words ([`bytes_to_words`]) in an [`Nf4Buffers`].

mod buffers;
pub mod double_quant;
mod tables;

#[cfg(test)]
mod fixture_tests;

pub use buffers::{AbsmaxBuffers, Nf4Buffers};
pub use double_quant::DoubleQuantAbsmax;
pub use tables::{DYNAMIC_MAP, NF4_CODE};

/// Elements per quantization block.
pub const BLOCK: usize = 64;
/// The 4-bit code of the value 0.0, used to pad an odd element count.
pub const ZERO_CODE: u8 = 7;

/// Number of 64-element blocks of `n` elements.
pub fn n_blocks(n: usize) -> usize {
    n.div_ceil(BLOCK)
}

/// The 15 decision midpoints `m[j] = f32((c[j] + c[j+1]) / 2)`.
pub fn nf4_midpoints() -> [f32; 15] {
    std::array::from_fn(|j| (NF4_CODE[j] + NF4_CODE[j + 1]) / 2.0)
}

/// The 4-bit codes of `x` (one per element, unpacked) and the f32 absmax of every block.
pub fn quantize(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let mid = nf4_midpoints();
    let partial_last = !x.len().is_multiple_of(BLOCK);
    let n_full = x.len() / BLOCK;
    let mut codes = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(n_blocks(x.len()));
    for (b, block) in x.chunks(BLOCK).enumerate() {
        let m = block.iter().fold(0.0f32, |acc, v| acc.max(v.abs()));
        absmax.push(m);
        let a = m.max(1e-38);
        let r = 1.0 / a;
        let divide = partial_last && b == n_full;
        codes.extend(block.iter().map(|&v| {
            let scaled = if divide { v / a } else { v * r };
            let v = scaled.clamp(-1.0, 1.0);
            mid.iter().filter(|&&m| m < v).count() as u8
        }));
    }
    (codes, absmax)
}

/// Two codes per byte, element `2k` in the high nibble; an odd count is padded with [`ZERO_CODE`].
pub fn pack(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(ZERO_CODE))
        .collect()
}

/// The first `n` codes of packed bytes.
pub fn unpack(packed: &[u8], n: usize) -> Vec<u8> {
    packed
        .iter()
        .flat_map(|&b| [b >> 4, b & 0x0f])
        .take(n)
        .collect()
}

/// `W'[i] = c[code[i]] · absmax[i / 64]` for the `n` elements of `packed`.
pub fn dequantize(packed: &[u8], absmax: &[f32], n: usize) -> Vec<f32> {
    let mut out = vec![0.0; n];
    dequantize_into(packed, absmax, &mut out);
    out
}

/// [`dequantize`] into `out` (its length is `n`).
pub fn dequantize_into(packed: &[u8], absmax: &[f32], out: &mut [f32]) {
    for (i, o) in out.iter_mut().enumerate() {
        *o = dequantize_element(packed, absmax, i);
    }
}

/// Element `i` of the weight: `W'[i] = c[code[i]] · absmax[i / 64]`.
pub fn dequantize_element(packed: &[u8], absmax: &[f32], i: usize) -> f32 {
    let byte = packed[i / 2];
    let code = if i.is_multiple_of(2) {
        byte >> 4
    } else {
        byte & 0x0f
    };
    NF4_CODE[code as usize] * absmax[i / BLOCK]
}

/// Bytes as little-endian i32 words (byte `4w + j` in bits `8j..8j+8` of word `w`), zero padded:
/// how packed codes travel in a backend's `Indices` buffer.
pub fn bytes_to_words(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks(4)
        .map(|c| {
            let mut w = [0u8; 4];
            w[..c.len()].copy_from_slice(c);
            i32::from_le_bytes(w)
        })
        .collect()
}

/// The first `n` bytes of little-endian i32 words (the inverse of [`bytes_to_words`]).
pub fn words_to_bytes(words: &[i32], n: usize) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).take(n).collect()
}

/// A weight in NF4: packed codes plus the absmax, plain or double-quantized.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Weight {
    /// Number of elements (`out · in`).
    pub n: usize,
    /// `ceil(n / 2)` bytes, two codes each.
    pub packed: Vec<u8>,
    pub absmax: Absmax,
}

/// How a weight's per-block absmax is stored.
#[derive(Clone, Debug, PartialEq)]
pub enum Absmax {
    /// One f32 per block (`compress_statistics=False`).
    Plain(Vec<f32>),
    /// 8-bit codes over the dynamic map (`compress_statistics=True`).
    Double(DoubleQuantAbsmax),
}

impl Nf4Weight {
    /// Quantizes `x`, with the absmax double-quantized when `double` (its offset the f32 mean).
    pub fn quantize(x: &[f32], double: bool) -> Self {
        let (codes, absmax) = quantize(x);
        let absmax = if double {
            let offset = double_quant::absmax_mean(&absmax);
            Absmax::Double(DoubleQuantAbsmax::quantize(&absmax, offset))
        } else {
            Absmax::Plain(absmax)
        };
        Nf4Weight {
            n: x.len(),
            packed: pack(&codes),
            absmax,
        }
    }

    /// The f32 absmax of every block (decoded when double-quantized).
    pub fn block_absmax(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(a) => a.clone(),
            Absmax::Double(d) => d.decode(),
        }
    }

    /// The dequantized weight `W'`, flat row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize(&self.packed, &self.block_absmax(), self.n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_puts_the_even_element_high_and_pads_odd_counts_with_zero_code() {
        assert_eq!(pack(&[1, 2, 15, 0, 3]), vec![0x12, 0xf0, 0x37]);
        assert_eq!(unpack(&[0x12, 0xf0, 0x37], 5), vec![1, 2, 15, 0, 3]);
    }

    #[test]
    fn words_round_trip_little_endian() {
        let bytes = [1u8, 2, 3, 4, 5];
        let words = bytes_to_words(&bytes);
        assert_eq!(words, vec![0x0403_0201, 5]);
        assert_eq!(words_to_bytes(&words, 5), bytes.to_vec());
    }

    #[test]
    fn table_values_quantize_to_their_own_code_and_midpoints_to_the_lower() {
        let mut x = NF4_CODE.to_vec();
        x.extend(nf4_midpoints());
        x.resize(BLOCK, 0.0);
        let (codes, absmax) = quantize(&x);
        assert_eq!(absmax, vec![1.0]);
        assert_eq!(&codes[..16], &(0..16).collect::<Vec<u8>>()[..]);
        assert_eq!(&codes[16..31], &(0..15).collect::<Vec<u8>>()[..]);
        assert_eq!(dequantize(&pack(&codes), &absmax, 16), NF4_CODE.to_vec());
    }
}
